"""Preference data for the DPO and SimPO tests: arithmetic prompts, a right and a wrong answer of varied lengths."""

import json
import random
from pathlib import Path

from sft_fixtures import to_argv

PAIR_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


def write_preference_data(path: Path, n: int = 12, seed: int = 0) -> Path:
    """Chosen: the right sum then " Indeed." repeated; rejected: a wrong sum then " You add numbers." repeated;
    separable by content, with response lengths that differ within a pair and across pairs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            if i % 3 == 0:
                prompt.insert(0, {"role": "system", "content": "You add numbers."})
            chosen = f"{a} plus {b} is {a + b}." + " Indeed." * rng.randint(0, 5)
            rejected = f"{a} plus {b} is {a + b + rng.randint(1, 9)}." + " You add numbers." * rng.randint(0, 3)
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": chosen}],
                                "rejected": prompt + [{"role": "assistant", "content": rejected}]}) + "\n")
    return path


def reference_copy(root: Path, tokenizer_dir: Path, vocab_size: int, seed: int = 1) -> tuple:
    """(hf_model, native_dir): a second tiny model (other random weights) with the same tokenizer, to serve
    as a DPO reference that differs from the policy."""
    import shutil

    import convert
    from tiny import hf_model, save_hf

    hf = hf_model("smollm2", seed=seed, vocab_size=vocab_size)
    hf_dir = save_hf(hf, root / f"ref{seed}-hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, hf_dir / name)
    native = root / f"ref{seed}-native"
    convert.main(["--ckpt_paths", str(hf_dir), "--output_dir", str(native), "--precision", "fp32"])
    return hf, native


def hf_response_logps(hf, ds, pair_ids) -> tuple:
    """(s, n) [2P] in float64, chosen responses then rejected, computed independently of model.py: the
    transformers model's logits on each document alone, log-softmax, the log-prob of each next token summed
    over the trained (response) positions of the cache's mask."""
    import torch

    s, n = [], []
    for doc in [2 * i for i in pair_ids] + [2 * i + 1 for i in pair_ids]:
        a, b = ds.offsets[doc], ds.offsets[doc + 1]
        ids = torch.tensor(ds.ids[a:b].astype("int64"))
        trained = torch.tensor(ds.mask[a + 1:b].astype(bool))  # token t + 1 is predicted at position t
        with torch.no_grad():
            logp = hf(ids[None]).logits[0, :-1].double().log_softmax(-1)
        s.append(logp.gather(-1, ids[1:, None])[:, 0][trained].sum())
        n.append(trained.sum().double())
    return torch.stack(s), torch.stack(n)


def first_batch_pairs(native: Path, data: Path, cache: Path, size: int, max_seq_len: int = 96, seed: int = 42):
    """The dataset and the pair ids of the trainer's first global batch of `size` pairs (one process)."""
    from data import Loader, prepare_dataset
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(native)
    ds = prepare_dataset([f"jsonl:{data}"], tok, load_template("chatml.yaml", tok), max_seq_len, kind="preference",
                         cache_dir=cache, seed=seed, progress=False)
    batch = next(iter(Loader(ds, size, seed=seed, pad_id=tok.eos_id, rank=0, world_size=1)))
    return ds, batch["sample_ids"].tolist()


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def make_setup(root: Path) -> dict:
    """Policy (seed 0) and a different reference (seed 1) sharing a small BPE tokenizer, and preference data."""
    import json

    from sft_fixtures import tiny_chat_model

    hf, native = tiny_chat_model(root)
    vocab = len(json.loads((root / "hf" / "tokenizer.json").read_text())["model"]["vocab"])
    ref_hf, ref_native = reference_copy(root, root / "hf", vocab)
    data = write_preference_data(root / "pref.jsonl")
    return {"hf": hf, "native": native, "ref_hf": ref_hf, "ref_native": ref_native, "data": data,
            "cache": root / "cache", "root": root}


def pref_args(setup, out, **overrides) -> list:
    args = {"ckpt_paths": setup["native"], "template_config": "chatml.yaml",
            "train_data_paths": f"jsonl:{setup['data']}", "output_dir": out, "max_seq_len": 96, "lr": 1e-3,
            "lr_scheduler": "cosine", "warmup_steps": 0,
            "micro_batch_size_per_gpu": 3, "gradient_accum_steps": 1, "train_steps": 3,
            "data_cache_dir": setup["cache"], "seed": 42}
    args.update(overrides)
    return to_argv(args)
