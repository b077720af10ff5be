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


def test_grpo_flops_equal_torch_flop_counter(tmp_path):
    """grpo_work's count of what a GRPO training forward computes, through training_flops: every matmul of the
    forward and backward of train_grpo.group_batch's packed rows (a prompt once, its G completions after it) and
    of one causal row per completion (prompt + completion), counted by torch's FlopCounterMode, equals it with the
    attention term left out (prompts and completions of equal lengths: no padding is computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train_grpo
    from model import Transformer

    bench.make_bench_model(tmp_path, dim=64, layers=2, vocab=1024)
    native = str(tmp_path / "native")
    model = Transformer.from_pretrained(native)
    P, G, Lp, N = 2, 3, 7, 5
    prompts = [[10 + i + k for k in range(Lp)] for i in range(P)]
    completions = [[100 + j + k for k in range(N)] for j in range(P * G)]
    repeated = [p for p in prompts for _ in range(G)]
    unshared = {"input_ids": torch.tensor([p + c[:-1] for p, c in zip(repeated, completions)]),
                "labels": torch.tensor([[-100] * (Lp - 1) + c for c in completions]),
                "completion": torch.tensor([[-1] * (Lp - 1) + [k] * N for k in range(P * G)]),
                "position_ids": torch.arange(Lp + N - 1).expand(P * G, -1)}
    for shared, batch in ((True, train_grpo.group_batch(prompts, completions, G, 2)), (False, unshared)):
        counter = FlopCounterMode(display=False)
        with counter:
            logps, _ = train_grpo.completion_logprobs(model, batch, "cpu")
            logps.sum().backward()
        matmuls = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
        work = bench.grpo_work([Lp] * P, [N] * (P * G), G, shared)
        assert len(logps) == work["head_positions"] == P * G * N
        assert batch["input_ids"].numel() == work["positions"]
        assert matmuls == bench.training_flops(native, {**work, "pairs_qk": 0}, lora=False, reference=False)


def test_filled_vocabulary_encodes_as_before_and_decodes_every_id(tmp_path):
    """The GRPO bench model's tokenizer: the bench BPE padded to the model's rows encodes text (chat template
    included) to the same ids as before, in transformers and in tokenize_chat, and decodes every id."""
    import shutil

    from transformers import AutoTokenizer

    from tokenize_chat import load_template, load_tokenizer, tokenize_conversation

    plain = bench.bench_tokenizer(tmp_path / "plain")
    filled = tmp_path / "filled"
    shutil.copytree(plain, filled)
    bench.fill_vocabulary(filled / "tokenizer.json", 1024)
    conversations = [c["messages"] for c in bench.ultrachat_like(5)]
    ids = {}
    for name in ("plain", "filled"):
        hf, tok = AutoTokenizer.from_pretrained(str(tmp_path / name)), load_tokenizer(tmp_path / name)
        template = load_template("smollm2_chat", tok)
        ids[name] = [(list(hf.apply_chat_template(m, tokenize=True, return_dict=False)),
                      tokenize_conversation(m, tok, template)[0]) for m in conversations]
        assert all(a == b for a, b in ids[name])
    assert ids["plain"] == ids["filled"] and len(hf) == 1024
    assert len(tok.decode(list(range(1024)))) > 0
