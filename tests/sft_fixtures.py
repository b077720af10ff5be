"""A tiny chat model with a real tokenizer (SmolLM2's, ChatML) and small chat data, for trainer tests."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe_tokenizer(path: Path, vocab_size: int = 512, specials=CHATML_SPECIALS, eos="<|im_end|>",
                        bos=None) -> Path:
    """A throwaway byte-level BPE tokenizer.json with ChatML's special tokens (or another family's), trained on
    the chat data's kind of text: keeps the trainer tests fast (SmolLM2's 49k vocabulary dominates a tiny
    model's compute)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f"What is {a} plus {b}? {a} plus {b} is {a + b}. Indeed. And doubled? You add numbers."
             for a in range(1, 100, 3) for b in range(1, 100, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "bos_token": bos}))
    return path


def tiny_chat_model(root: Path, family: str = "smollm2", seed: int = 0, real_tokenizer: bool = False) -> tuple:
    """(hf_model, native_dir): a random tiny Llama, converted (fp32), with a ChatML tokenizer: a small BPE
    trained here (512 ids), or SmolLM2's real one (49,152 ids)."""
    import convert
    from dev.assets import smollm2_tokenizer_dir
    from tiny import hf_model, save_hf

    tok_dir = smollm2_tokenizer_dir() if real_tokenizer else train_bpe_tokenizer(root / "bpe")
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    hf = hf_model(family, seed=seed, vocab_size=49152 if real_tokenizer else len(vocab))
    hf_dir = save_hf(hf, root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, hf_dir / name)
    native = root / "native"
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(native), "--precision", "fp32"])
    return hf, native


def write_chat_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Arithmetic conversations of varied lengths (some with a system prompt, some multi-turn)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " Indeed." * rng.randint(0, 6)}]
            if i % 3 == 0:
                messages.insert(0, {"role": "system", "content": "You add numbers."})
            if i % 4 == 1:
                messages += [{"role": "user", "content": "And doubled?"},
                             {"role": "assistant", "content": f"{2 * (a + b)}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def to_argv(flags: dict) -> list:
    """{"lr": 1e-3, "lora": True, "betas": [0.9, 0.95], "x": None} -> --lr 0.001 --lora --betas 0.9 0.95."""
    argv = []
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not False and v is not None:
            argv += [f"--{k}", *(map(str, v) if isinstance(v, (list, tuple)) else [str(v)])]
    return argv


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(script: str, args: list, nproc: int = 1, port: int = 29500, check: bool = True, **popen):
    """Run a trainer under torchrun (gloo on CPU); returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(REPO / script), *map(str, args)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def torchrun_patched(tmp: Path, prelude: str, script: str, args: list, nproc: int = 2, **kwargs):
    """torchrun of a trainer whose processes first run `prelude`: test code (a probe, a slowed-down step) in
    each process, never in the product. The trainer's main() then reads the flags as usual."""
    import textwrap

    module = Path(script).stem
    wrapper = Path(tmp) / f"patched_{module}.py"
    wrapper.write_text(f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
                       f"{textwrap.dedent(prelude)}\nimport {module}\n{module}.main()\n")
    return torchrun(str(wrapper), args, nproc=nproc, port=free_port(), **kwargs)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
