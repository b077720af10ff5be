"""The CUDA paths in one command, a few minutes on one GPU: each check prints PASS, FAIL or SKIP with its numbers,
and the exit code is the number of failures.

    python dev/gpu_check.py                  # on a GPU machine (then: python -m dev.bench --device cuda)
    python dev/gpu_check.py --device cpu     # what the CPU can run of it (tests/test_gpu_check.py runs this)

1. flex: FlexAttention (compiled) against SDPA with the same rule as a dense mask, at awkward shapes: 3 rows of
   300 tokens (documents, a shared-prompt pair, padding), a sliding window, GQA, head dims 64/128/256; fp32 within
   1e-4 and bf16 within 2e-2 of the reference, gradients finite and close, padding rows exactly 0. The CPU has no
   FlexAttention backward: there, forward only.
2. block_mask: the memory of building a block mask for 2 rows of 8,192 tokens with a window (< 64 MB).
   (graphs, within 3: the compiled run recompiles a few times at most and never reaches torch's recompile limit;
   tests/test_packing.py counts the graphs per compiled function on the CPU.)
3. dpo: a 3-step packed DPO run (train_dpo.py) with --compile --activation_checkpointing --gradient_accum_steps 2
   --val_freq 1 --save_freq 2 against the same run eager (each step's loss within 1e-2 relative), then --resume from its
   step-2 checkpoint: step 3 equals the uninterrupted run's.
4. adamw: fused AdamW on FSDP2 DTensors against foreach (within 1e-6 after 3 steps), then a DCP save and load that
   continues identically (a process group of one).
5. grpo: a 4-step GRPO run (train_grpo.py, --num_iterations 2, --beta, validation) with --compile
   --activation_checkpointing against the same run eager: the rollouts decode eagerly and sample the same first
   batch (same rewards), its two steps' losses within 1e-2 relative, few recompiles and never the limit.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = []


def report(name: str, ok: bool | None, detail: str):
    status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    RESULTS.append((name, status))
    print(f"{status} {name}: {detail}", flush=True)


# -- 1. FlexAttention against the dense reference ----------------------------------------------------------------
def packed_layout(T: int = 300):
    """3 rows of T tokens: documents of awkward lengths with padding after them, a shared-prompt pair (the
    rejected response sees the prompt, not the chosen one), and a row that ends in padding."""
    segments = [(0, 0, 129, 0, 0), (0, 129, 130, 129, 129), (0, 130, 257, 130, 130),  # 257..299: padding
                (1, 0, 100, 0, 0), (1, 100, 180, 0, 40),  # prompt 0..40 + chosen 40..100, rejected 100..180
                (1, 180, T, 180, 180),
                (2, 0, 37, 0, 0)]  # the rest of row 2 is padding
    return torch.tensor(segments)


def check_flex(device: str):
    from torch.nn.attention.flex_attention import create_mask

    from model import compiled_flex_attention, segment_block_mask, segment_mask_mod

    T, rows, grads = 300, 3, device == "cuda"
    segments = packed_layout(T)
    flex = compiled_flex_attention()
    # Each case compiles anew (head dim, dtype, mask rule): each head dim once per dtype, windows alternating.
    cases = [(64, torch.float32, None), (128, torch.float32, 50), (256, torch.float32, None),
             (64, torch.bfloat16, 50), (128, torch.bfloat16, None), (256, torch.bfloat16, 50)]
    for head_dim, dtype, window in cases:
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch._dynamo.reset()  # the cases differ on purpose: no recompile limit across them
        g = torch.Generator().manual_seed(head_dim)
        q = torch.randn(rows, 8, T, head_dim, generator=g).to(device, dtype)  # 8 query heads over 2: GQA
        k, v = (torch.randn(rows, 2, T, head_dim, generator=g).to(device, dtype) for _ in range(2))
        mask = create_mask(segment_mask_mod(segments, rows, T, window, device), rows, 1, T, T, device=device)
        real = mask.any(-1)[:, 0]  # queries in some segment
        dense = mask | torch.eye(T, dtype=torch.bool, device=device)  # padding sees itself: no NaN row
        inputs = [t.detach().requires_grad_(grads) for t in (q, k, v)]
        out = flex(*inputs, block_mask=segment_block_mask(segments, rows, T, window, device),
                   enable_gqa=True)
        ref_inputs = [t.detach().float().requires_grad_(grads) for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_inputs, attn_mask=dense.expand(-1, 8, -1, -1),
                                             enable_gqa=True)
        diff = (out.float() - ref).transpose(1, 2)[real].abs().max().item()
        padding = out.transpose(1, 2)[~real].abs().max().item() if (~real).any() else 0.0
        detail = f"head_dim {head_dim}, {str(dtype)[6:]}, window {window}: max diff {diff:.1e}"
        ok = diff <= tol and padding == 0.0
        if grads:
            w = torch.randn(out.shape, generator=g).to(device) * real[:, None, :, None]
            (out.float() * w).sum().backward()
            (ref * w).sum().backward()
            gdiff = max((a.grad.float() - b.grad).abs().max().item() / b.grad.abs().max().clamp(min=1e-12)
                        .item() for a, b in zip(inputs, ref_inputs))
            finite = all(torch.isfinite(a.grad).all() for a in inputs)
            ok = ok and finite and gdiff <= tol * 10
            detail += f", gradients max rel. diff {gdiff:.1e}, finite {finite}"
        report("flex", ok, detail + f", padding rows max {padding:.1e}")
    if not grads:
        report("flex gradients", None, "the CPU has no FlexAttention backward (torch 2.13)")


# -- 2. block mask memory ----------------------------------------------------------------------------------------
def check_block_mask(device: str):
    from model import segment_block_mask, segment_mask_mod

    T, rows, window, segments = 8192, 2, 1024, []
    for r in range(rows):
        p = 0
        for length in (3000, 1, 2500, 2691):
            segments.append((r, p, p + length, p, p))
            p += length
    segments = torch.tensor(segments)
    if device != "cuda":
        report("block_mask", None, "CUDA memory only; tests/test_block_mask.py bounds it on the CPU")
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    segment_block_mask(segments, rows, T, window, device)
    segment_mask_mod(segments, rows, T, window, device)
    torch.cuda.synchronize()
    used = (torch.cuda.max_memory_allocated() - before) / 2**20
    report("block_mask", used < 64, f"2 x {T} tokens, window {window}: {used:.1f} MB of GPU memory")


# -- 3. a compiled packed DPO run, then resume -------------------------------------------------------------------
def check_dpo(device: str, root: Path):
    from dev.bench import bench_native, write_bench_pairs

    native = bench_native(root / "model", dim=256, n_layers=4)
    train, val = write_bench_pairs(root / "train.jsonl", 24), write_bench_pairs(root / "val.jsonl", 6, seed=1)
    common = ["--ckpt_paths", native, "--template_config", "smollm2_chat", "--train_data_paths", f"jsonl:{train}",
              "--val_data_paths", f"jsonl:{val}", "--max_seq_len", 256, "--pack_samples", "--micro_batch_size_per_gpu",
              2, "--gradient_accum_steps", 2, "--train_steps", 3, "--val_freq", 1, "--save_freq", 2, "--lr", 1e-4,
              "--lr_scheduler", "constant", "--data_cache_dir", root / "cache", "--dp", "fsdp"]

    logs = {}

    def run(out: Path, *flags) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(REPO / "train_dpo.py"),
               *map(str, common), "--output_dir", str(out), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_LOGS": "recompiles"})
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        logs[out.name] = proc.stderr
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    t = time.perf_counter()
    eager = run(root / "eager")
    compiled = run(root / "compiled", "--compile", "--activation_checkpointing")
    # Packed batches of one shape under --compile: a few graphs per compiled function (training, no-grad passes
    # of validation and the reference), never torch's recompile limit and its uncompiled FlexAttention fallback.
    recompiles, limit = logs["compiled"].count("Recompiling function"), "recompile_limit" in logs["compiled"]
    report("graphs", recompiles <= 8 and not limit, f"{recompiles} recompiles over 3 steps of varied packed "
           f"batches with validation and the reference pass; recompile limit hit: {limit}")
    # Step 1 is ln 2 by construction (the reference is the initial policy): steps 2 and 3 show the updates agree.
    rel = max(abs(c["loss"] - e["loss"]) / abs(e["loss"]) for c, e in zip(compiled, eager))
    report("dpo compiled", rel <= 1e-2, f"losses {[round(m['loss'], 6) for m in compiled]} compiled, "
           f"{[round(m['loss'], 6) for m in eager]} eager (max {rel:.1e} relative); val/loss logged "
           f"{sum('val/loss' in m for m in compiled)} times")
    resumed_dir = root / "resumed"  # the compiled run as if stopped after its step-2 checkpoint
    shutil.copytree(root / "compiled", resumed_dir)
    (resumed_dir / "consolidated.00.pth").unlink()
    resumed = run(resumed_dir, "--compile", "--activation_checkpointing", "--resume")
    a, b = resumed[-1]["loss"], compiled[-1]["loss"]
    report("dpo resume", a == b and len(resumed) == 3,
           f"step 3 loss {a:.8f} resumed, {b:.8f} uninterrupted ({time.perf_counter() - t:.0f} s for the runs)")


# -- 5. a compiled GRPO run ---------------------------------------------------------------------------------------
def check_grpo(device: str, root: Path):
    from dev.bench import bench_native, write_bench_pairs

    native = bench_native(root / "model", dim=256, n_layers=4)
    prompts = write_bench_pairs(root / "prompts.jsonl", 16)  # {"prompt": ...}; chosen, rejected: unused columns
    rewards = root / "rewards.py"
    rewards.write_text("def mod7(completion_ids, **kw):\n    return [float(sum(c) % 7) for c in completion_ids]\n")
    common = ["--ckpt_paths", native, "--template_config", "smollm2_chat", "--train_data_paths", f"jsonl:{prompts}",
              "--val_data_paths", f"jsonl:{prompts}", "--val_freq", 2, "--reward_funcs", f"{rewards}:mod7",
              "--max_seq_len", 320, "--num_generations", 4, "--max_completion_length", 32,
              "--micro_batch_size_per_gpu", 2, "--gradient_accum_steps", 2, "--num_iterations", 2, "--beta", 0.04,
              "--train_steps", 4, "--lr", 1e-5, "--dp", "fsdp"]

    def run(out: Path, *flags) -> tuple[list[dict], str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(REPO / "train_grpo.py"),
               *map(str, common), "--output_dir", str(out), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_LOGS": "recompiles"})
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stderr

    t = time.perf_counter()
    eager, _ = run(root / "eager")
    compiled, log = run(root / "compiled", "--compile", "--activation_checkpointing")
    recompiles, limit = log.count("Recompiling function"), "recompile_limit" in log
    same = [c["reward"] == e["reward"] for c, e in zip(compiled[:2], eager[:2])]
    rel = max(abs(c["loss"] - e["loss"]) / max(abs(e["loss"]), 1e-6) for c, e in zip(compiled[:2], eager[:2]))
    report("grpo compiled", all(same) and rel <= 1e-2 and recompiles <= 8 and not limit,
           f"first rollout batch: same rewards {same}, losses {[round(m['loss'], 6) for m in compiled[:2]]} compiled, "
           f"{[round(m['loss'], 6) for m in eager[:2]]} eager (max {rel:.1e} relative); {recompiles} recompiles, "
           f"limit hit: {limit}; rollout {compiled[-1]['rollout_tokens_per_s']:.0f} tok/s, training "
           f"{compiled[-1]['train_tokens_per_s']:.0f} tok/s compiled ({time.perf_counter() - t:.0f} s for the runs)")


# -- 4. fused AdamW on DTensors, DCP round trip ------------------------------------------------------------------
def check_adamw(device: str, root: Path):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from model import ModelArgs, Transformer

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", world_size=1, rank=0,
                                store=dist.FileStore(str(root / "store"), 1))
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)

    def build(fused: bool):
        torch.manual_seed(0)
        model = Transformer(args).to(device)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=not fused)

    def steps(model, opt, n):
        for _ in range(n):
            model(tokens, labels=tokens).sum().neg().backward()
            opt.step()
            opt.zero_grad()
        return [p.full_tensor().detach().clone() for p in model.parameters()]

    fused, foreach = build(True), build(False)
    diff = max((a - b).abs().max().item() for a, b in zip(steps(*fused, 3), steps(*foreach, 3)))
    report("adamw fused", diff <= 1e-6, f"fused vs foreach AdamW on FSDP2 DTensors, 3 steps: max diff {diff:.1e}")
    model_sd, optim_sd = get_state_dict(*fused)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=root / "dcp")
    continued = steps(*fused, 2)
    copy = build(True)
    steps(*copy, 1)  # optimizer state exists, then is overwritten by the checkpoint
    model_sd, optim_sd = get_state_dict(*copy)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=root / "dcp")
    set_state_dict(*copy, model_state_dict=state["model"], optim_state_dict=state["optim"])
    diff = max((a - b).abs().max().item() for a, b in zip(steps(*copy, 2), continued))
    report("adamw dcp", diff == 0.0, f"2 steps after a DCP save and load: max diff {diff:.1e}")
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", choices=["flex", "block_mask", "dpo", "adamw", "grpo"], action="append")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("dev/gpu_check.py: no CUDA GPU here; --device cpu runs what the CPU can")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}", flush=True)
    RESULTS.clear()
    only = args.only or ["flex", "block_mask", "dpo", "adamw", "grpo"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("flex", check_flex), ("block_mask", check_block_mask), ("dpo", check_dpo),
                            ("adamw", check_adamw), ("grpo", check_grpo)):
            if name not in only:
                continue
            (Path(tmp) / name).mkdir()
            try:
                check(args.device, Path(tmp) / name) if name in ("dpo", "adamw", "grpo") else check(args.device)
            except Exception as e:  # one broken check must not hide the others
                report(name, False, f"{type(e).__name__}: {str(e)[-600:]}")
    failed = sum(status == "FAIL" for _, status in RESULTS)
    print(f"{sum(s == 'PASS' for _, s in RESULTS)} passed, {failed} failed, "
          f"{sum(s == 'SKIP' for _, s in RESULTS)} skipped", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
