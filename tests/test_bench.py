"""bench.py's GPU section wired end to end on the CPU: the same train_sft.py flags as on a GPU (bf16, packing,
FSDP2, compile, activation checkpointing) on a tiny Llama-3.2-shaped model."""

from dev import bench


def test_gpu_section_runs_on_cpu_with_every_flag(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = bench.main(["--gpu_shapes", "tiny", "--gpu_nproc", "1", "--gpu_steps", "4", "--gpu_seq", "256",
                    "--gpu_micro", "1"])["tiny"]
    # dim 128, 4 query heads and 2 key/value heads of 32; FFN 4 * 128 * 2/3 = 341 rounded up to 512
    assert bench.GPU_SHAPES["tiny"] == dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.0)
    per_layer = 2 * 128 + 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 512  # norms, q, k+v, o, w1 w2 w3
    assert r["params"] == 128256 * 128 + 2 * per_layer + 128  # tied embeddings count once; final norm
    assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["mfu"] is None  # no peak flops known for a CPU


def test_training_flops_equal_torch_flop_counter(tmp_path):
    """The FLOPs bench.py divides by the matmul peak: every matmul of one epoch's forward and backward (weights
    and output projection) counted by torch's FlopCounterMode over packed, shared-prompt preference batches
    equals training_flops with the attention term left out; the attention term is causal pairs x 4 d x 3
    (QK^T and AV, forward and twice that backward) by construction."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train_common as tc
    from data import Loader, prepare_dataset
    from model import Transformer
    from tokenize_chat import load_template, load_tokenizer

    bench.make_bench_model(tmp_path, dim=64, layers=2, vocab=1024)
    data = bench.write_bench_pairs(tmp_path / "pairs.jsonl", 6)
    job = {"algo": "dpo", "native": str(tmp_path / "native"), "data": str(data), "cache": str(tmp_path / "cache"),
           "max_seq_len": 256}
    tok = load_tokenizer(tmp_path / "native")
    ds = prepare_dataset([f"jsonl:{data}"], tok, load_template("smollm2_chat", tok), 256, kind="preference",
                         cache_dir=tmp_path / "cache", progress=False)
    model = Transformer.from_pretrained(tmp_path / "native")
    counter = FlopCounterMode(display=False)
    positions = real = 0
    with counter:
        for batch in Loader(ds, 1, pack=True, share_prompt=True, shuffle=False):
            tc.response_logps(model, batch, "cpu")[0].sum().backward()
            positions += batch["input_ids"].numel()
            real += int((batch["document_ids"] >= 0).sum())
    counted = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counted.items() if "mm" in str(op))
    work = bench.epoch_work(job, shared=True, head="trained")
    # the work counts real positions only (the shared prompts once), not the rows' padding the model also ran
    assert work["positions"] == real < ds.doc_lengths.sum()
    padded_work = {**work, "positions": positions, "pairs_qk": 0}
    assert matmuls == bench.training_flops(job["native"], padded_work, lora=False, reference=False)
