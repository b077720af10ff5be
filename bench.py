"""Benchmarks that print ratios against a reference measured in the same run.

    python bench.py --only convert [--convert_gb 2.0]

convert: time and peak RSS of converting a random multi-shard HF checkpoint of about --convert_gb GB
(bf16) with convert.py, in a fresh process, against the size of the checkpoint it writes.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent


def make_random_hf_checkpoint(path: Path, target_gb: float, shard_gb: float = 0.5) -> int:
    """A Llama-shaped HF dir of random bf16 weights, written shard by shard (never all in memory)."""
    dim, hidden, vocab, n_heads, n_kv = 2048, 5632, 32000, 16, 4
    per_layer = 2 * (dim * dim + dim * dim * n_kv // n_heads) + 3 * dim * hidden + 2 * dim
    n_layers = max(1, round((target_gb * 1e9 / 2 - 2 * vocab * dim) / per_layer))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim * n_kv // n_heads, dim),
                   p + "self_attn.v_proj.weight": (dim * n_kv // n_heads, dim), p + "self_attn.o_proj.weight": (dim, dim),
                   p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                   p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                   p + "post_attention_layernorm.weight": (dim,)}
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += 2 * torch.Size(shape).numel()
        if size >= shard_gb * 1e9:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=g, dtype=torch.bfloat16) for n, s in shard.items()}
        save_file(tensors, path / fname)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map |= {n: fname for n in shard}
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return len(shards)


def verify_conversion(hf_dir: Path, native_dir: Path) -> int:
    """Every native tensor, permuted back to HF's layout, equals the input tensor bit for bit."""
    from safetensors import safe_open

    import convert
    from model import ModelArgs

    args = ModelArgs.from_json(native_dir / "params.json")
    native = torch.load(native_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    count = 0
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                key = convert.rename(name, convert.HF_TO_NATIVE)
                t = native[key]
                if ".wq." in key or ".wk." in key:
                    t = convert.permute_to_hf(t, args.n_heads if ".wq." in key else args.n_kv_heads)
                if not torch.equal(t, f.get_tensor(name)):
                    raise AssertionError(f"{key} differs from {name}")
                count += 1
    return count


def bench_convert(target_gb: float):
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as tmp:
        hf_dir, out_dir = Path(tmp) / "hf", Path(tmp) / "native"
        n_shards = make_random_hf_checkpoint(hf_dir, target_gb)
        input_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
        # The conversion runs in a fresh process so its peak RSS is its own (ru_maxrss of children).
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "convert.py"), "--ckpt_paths", str(hf_dir), "--output_dir",
                        str(out_dir)], check=True)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        output_bytes = (out_dir / "consolidated.00.pth").stat().st_size
        verified = verify_conversion(hf_dir, out_dir)
    gb = 1024**3
    print("| conversion | input | shards | output | time | peak RSS | peak RSS / output |")
    print("|---|---|---|---|---|---|---|")
    print(f"| HF -> native, bf16 | {input_bytes / gb:.2f} GiB | {n_shards} | {output_bytes / gb:.2f} GiB | "
          f"{seconds:.1f} s | {peak / gb:.2f} GiB | {peak / output_bytes:.2f}x |")
    print(f"(all {verified} tensors of the output checked equal to the input, q/k permuted back)")
    return {"input_bytes": input_bytes, "output_bytes": output_bytes, "seconds": seconds, "peak_rss": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["convert"], action="append", help="run only these benchmarks")
    parser.add_argument("--convert_gb", type=float, default=2.2, help="size of the random checkpoint")
    args = parser.parse_args(argv)
    only = set(args.only or ["convert"])
    if "convert" in only:
        bench_convert(args.convert_gb)


if __name__ == "__main__":
    main()
