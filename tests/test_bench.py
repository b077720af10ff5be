"""bench.py's GPU section wired end to end on the CPU: the same train_sft.py flags as on a GPU (bf16, packing,
FSDP2, compile, activation checkpointing) on a tiny Llama-3.2-shaped model."""

import bench


def test_gpu_section_runs_on_cpu_with_every_flag(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = bench.main(["--gpu_shapes", "tiny", "--gpu_nproc", "1", "--gpu_steps", "4", "--gpu_seq", "256",
                    "--gpu_micro", "1"])["tiny"]
    # dim 128, 4 query heads and 2 key/value heads of 32; FFN 4 * 128 * 2/3 = 341 rounded up to 512
    assert bench.GPU_SHAPES["tiny"] == dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.0)
    per_layer = 2 * 128 + 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 512  # norms, q, k+v, o, w1 w2 w3
    assert r["params"] == 128256 * 128 + 2 * per_layer + 128  # tied embeddings count once; final norm
    assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["mfu"] is None  # no peak flops known for a CPU
