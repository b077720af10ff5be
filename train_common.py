"""Plumbing shared by train_sft.py, train_dpo.py and train_simpo.py, as plain functions (no Trainer class): the
flags, the output dir, a run's set-up and the common half of each optimizer step (setup, start, next_step,
optimizer_step, val_due, end_step, save_final), AdamW and the LR schedule, what DPO and SimPO share, the final
native output dir, and logging. The processes, parallelism and step checkpoints are parallel.py's. Each trainer
keeps its loss and its batch loop in plain sight.
"""

import argparse
import errno
import importlib.util
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import lora
import parallel
from lora import DEFAULT_TARGETS as LORA_TARGETS
from model import DTYPES, IGNORE_INDEX, packed_kernel
from parallel import (Dist, StopSignal, all_reduce_sum, any_rank, barrier, checkpoint_dirs, first_line,
                      load_checkpoint, load_extra, parallelize, print0, resolve_dtype, rng_state, save_checkpoint,
                      set_rng_state, setup_distributed, teardown_distributed, write_failure)
from tokenize_chat import TOKENIZER_FILES


# -- arguments ------------------------------------------------------------------------------------------------
def arg(default=MISSING, help="", **kwargs):
    """A dataclass field that is also a command-line flag; `choices` and `nargs` pass through to argparse."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class CommonArgs:
    """The flags every trainer shares; names follow the torchllms training README."""
    ckpt_paths: list = arg(help="native checkpoint dir (convert.py makes one from an HF dir) or its "
                           "consolidated.00.pth, then overlays (a LoRA adapter dir)", metavar="PATH")
    train_data_paths: list = arg(help="f.jsonl, f.txt, a save_to_disk dir or a hub dataset name (or with a "
                                 "prefix: jsonl:PATH, text:PATH, local:PATH); several mix", metavar="SOURCE")
    output_dir: str = arg(help="where the trained native checkpoint, metrics and step checkpoints go", metavar="DIR")
    template_config: str = arg(None, help="chat template: a name from templates/ (llama3_instruct) or a YAML path "
                               "(default: the *.yaml in the --ckpt_paths dir, which convert.py and every training "
                               "run write there)", metavar="NAME")
    val_data_paths: list = arg([], help="validation sources, same forms as --train_data_paths", metavar="SOURCE")
    train_data_splits: list = arg([], help="split per source for local/hub sources (default: train)",
                                  metavar="SPLIT")
    val_data_splits: list = arg([], help="split per validation source", metavar="SPLIT")
    train_num_samples: list = arg([], help="per source: a count, a fraction, or all (default: all)", metavar="N")
    val_num_samples: list = arg([], help="per validation source: a count, a fraction, or all", metavar="N")
    data_cache_dir: str = arg(None, help="pretokenized cache dir (default: .cache/data in the repo)", metavar="DIR")
    max_seq_len: int = arg(2048, help="longer samples are truncated (if a trained token survives) or dropped")
    micro_batch_size_per_gpu: int = arg(1, help="sequences (pairs for DPO/SimPO) per process per forward")
    gradient_accum_steps: int = arg(1, help="micro-batches per optimizer step")
    loss_reduction: str = arg("tokens", help="SFT: tokens: mean over all trained tokens of the global batch; "
                              "sequences: mean of per-sequence token means. DPO/SimPO average their per-pair "
                              "loss over pairs either way", choices=["tokens", "sequences"])
    pack_samples: bool = arg(False, help="pack several samples (whole preference pairs) per row, with attention "
                             "within each document: no padding")
    lr: float = arg(1e-5, help="peak learning rate")
    lr_scheduler: str = arg("cosine", help="schedule after warmup", choices=["linear", "cosine", "constant"])
    warmup_steps: int = arg(0, help="linear warmup steps")
    wd: float = arg(0.0, help="AdamW weight decay (not applied to norms and biases)")
    betas: list = arg([0.9, 0.999], help="AdamW betas", type=float, nargs=2)
    eps: float = arg(1e-8, help="AdamW epsilon")
    clip_grad_norm: float = arg(1.0, help="clip the global gradient norm; 0 disables")
    train_epochs: int = arg(1, help="passes over the training data")
    train_steps: int = arg(None, help="optimizer steps; overrides --train_epochs when set")
    seed: int = arg(42, help="seed for data order, LoRA init and dropout")
    dp: str = arg("fsdp", help="data parallelism under torchrun", choices=["fsdp", "ddp"])
    fsdp_grad_sync: str = arg("every", help="FSDP2 with --gradient_accum_steps > 1: every: reduce-scatter each "
                              "micro-batch, gradients stay sharded; last: once per step, faster, but whole fp32 "
                              "gradients (+4 bytes per trained parameter) on every GPU", choices=["every", "last"])
    param_dtype: str = arg("auto", help="compute dtype (auto: bf16 on GPU, fp32 on CPU); master weights stay fp32",
                           choices=["auto", "bf16", "fp32"])
    dist_timeout: float = arg(60.0, help="minutes a collective waits for a late process before the run fails; "
                              "rank 0's own work (the data cache, the final save) is waited for without a limit")
    activation_checkpointing: bool = arg(False, help="recompute each block in backward to save memory")
    compile: bool = arg(False, help="torch.compile each block")
    lora: bool = arg(False, help="train LoRA adapters instead of all weights")
    lora_rank: int = arg(16, help="LoRA rank r")
    lora_alpha: float = arg(16.0, help="LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = arg(0.0, help="dropout on the LoRA input (training only)")
    lora_targets: list = arg(list(LORA_TARGETS), help="projections to adapt, of wq wk wv wo (attention) and w1 w2 "
                             "w3 (MLP)", metavar="NAME")
    lora_unfrozen_params: list = arg([], help="regexes of other parameters to train with LoRA, e.g. norm",
                                     metavar="REGEX")
    save_freq: int = arg(0, help="save a resumable checkpoint every N steps (default: 0, only when SIGTERM or "
                         "Ctrl-C stops the run)")
    max_checkpoints: int = arg(2, help="resumable checkpoints to keep (0: all)")
    save_dtype: str = arg("auto", help="dtype of the saved weights (auto: the input checkpoint's)",
                          choices=["auto", "bf16", "fp16", "fp32"])
    resume: bool = arg(False, help="continue from the latest checkpoint in --output_dir")
    overwrite: bool = arg(False, help="allow an --output_dir that holds another run")
    print_freq: int = arg(1, help="log line every N steps")
    val_freq: int = arg(0, help="validate every N steps (0: at the end only, when --val_data_paths is set)")
    wandb: bool = arg(False, help="also log to Weights & Biases (needs the wandb package)")
    wandb_project: str = arg("llm-post-training", help="W&B project", metavar="NAME")
    plan: bool = arg(False, help="print this run's predicted memory per GPU (memory_plan.py) and exit; reads only "
                     "params.json of --ckpt_paths")
    plan_gpus: str = arg("8x80GB", help="--plan: GPUs per node x memory each (80GB for one GPU, 2xcpu for CPU)",
                         metavar="NxMEM")
    plan_nnodes: int = arg(1, help="--plan: nodes")


@dataclass
class PreferenceArgs(CommonArgs):
    """DPO's and SimPO's flags on top of the common ones."""
    share_prompt: bool = arg(None, help="with --pack_samples (on by default there): compute each pair's prompt once, "
                             "laid out as prompt | chosen | rejected; each response sees the prompt and itself, at "
                             "the positions it has unshared", action=argparse.BooleanOptionalAction)


# --help lists the flags in these groups, in this order; a trainer's own flags (and any common one not named here)
# follow under the trainer's name.
FLAG_GROUPS = {
    "model": ("ckpt_paths", "template_config", "output_dir"),
    "data": ("train_data_paths", "val_data_paths", "train_data_splits", "val_data_splits", "train_num_samples",
             "val_num_samples", "max_seq_len", "data_cache_dir"),
    "optimisation": ("lr", "lr_scheduler", "warmup_steps", "wd", "betas", "eps", "clip_grad_norm", "train_epochs",
                     "train_steps", "loss_reduction", "seed"),
    "batch and packing": ("micro_batch_size_per_gpu", "gradient_accum_steps", "pack_samples", "share_prompt"),
    "parallelism": ("dp", "fsdp_grad_sync", "param_dtype", "activation_checkpointing", "compile", "dist_timeout"),
    "LoRA": ("lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_unfrozen_params"),
    "checkpoints": ("save_freq", "max_checkpoints", "save_dtype", "resume", "overwrite"),
    "logging": ("print_freq", "val_freq", "wandb", "wandb_project"),
    "memory plan": ("plan", "plan_gpus", "plan_nnodes"),
}
# Other trainers' names for our flags (TRL's TrainingArguments / SFTConfig / DPOConfig / CPOConfig and PEFT's
# LoraConfig, torchtune's recipe keys): one line naming ours instead of argparse's usage and "unrecognized
# arguments". A value is our flag's name (a tuple: the first this trainer has), or a sentence.
OTHER_NAMES = {
    "learning_rate": "lr", "max_length": "max_seq_len", "max_seq_length": "max_seq_len",
    "gradient_accumulation_steps": "gradient_accum_steps", "num_train_epochs": "train_epochs",
    "epochs": "train_epochs", "max_steps": "train_steps", "per_device_train_batch_size": "micro_batch_size_per_gpu",
    "batch_size": "micro_batch_size_per_gpu", "train_batch_size": "micro_batch_size_per_gpu",
    "weight_decay": "wd", "lr_scheduler_type": "lr_scheduler", "lr_scheduler_name": "lr_scheduler",
    "num_warmup_steps": "warmup_steps", "adam_epsilon": "eps", "max_grad_norm": "clip_grad_norm",
    "logging_steps": "print_freq", "log_every_n_steps": "print_freq", "save_steps": "save_freq",
    "save_total_limit": "max_checkpoints", "eval_steps": "val_freq", "resume_from_checkpoint": "resume",
    "gradient_checkpointing": "activation_checkpointing", "enable_activation_checkpointing": "activation_checkpointing",
    "torch_compile": "compile", "use_peft": "lora", "lora_r": "lora_rank", "r": "lora_rank",
    "lora_target_modules": "lora_targets", "target_modules": "lora_targets", "lora_attn_modules": "lora_targets",
    "model_name_or_path": "ckpt_paths", "model_path": "ckpt_paths", "checkpoint_dir": "ckpt_paths",
    "dataset_name": "train_data_paths", "dataset": "train_data_paths", "data_paths": "train_data_paths",
    "eval_dataset": "val_data_paths", "chat_template_path": "template_config", "chat_template": "template_config",
    "packing": "pack_samples", "packed": "pack_samples", "dtype": "param_dtype", "seed_everything": "seed",
    "beta": ("dpo_beta", "simpo_beta"), "label_smoothing": "dpo_label_smoothing", "loss_type": "dpo_loss",
    "gamma": "simpo_gamma", "cpo_alpha": "sft_weight", "ref_model": "ref_ckpt_paths",
    "precompute_ref_log_probs": "reference",
    "warmup_ratio": "this repo takes --warmup_steps, a count of optimizer steps (the start-up line gives the "
                    "run's steps)",
    "adam_beta1": "this repo takes both AdamW betas as --betas B1 B2 (default 0.9 0.999)",
    "adam_beta2": "this repo takes both AdamW betas as --betas B1 B2 (default 0.9 0.999)",
    "bf16": "this repo calls it --param_dtype bf16 (the default on GPUs: auto)",
    "fp16": "this repo computes in bf16 or fp32: --param_dtype bf16",
    "report_to": "this repo calls it --wandb (and --wandb_project)",
    "per_device_eval_batch_size": "validation uses --micro_batch_size_per_gpu",
    "apply_lora_to_mlp": "this repo calls it --lora_targets (w1 w2 w3 are the MLP's)",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of ~60 flags would bury the line that matters."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def unknown_flag(argv: list, known: list) -> str | None:
    """The first --flag in argv that the trainer does not take, as one line: our name for another trainer's
    flag (OTHER_NAMES), else the closest of ours; argparse's abbreviations are off, so --lora_r is never taken
    for --lora_rank."""
    import difflib

    def theirs(name):  # our flag (or a sentence) for another trainer's name, None when this trainer has none
        ours = OTHER_NAMES.get(name)
        ours = next((o for o in ours if o in known), None) if isinstance(ours, tuple) else ours
        return ours if ours in known or ours and " " in ours else None

    for token in argv:
        if token == "--":
            break
        if not token.startswith("--") or len(token) == 2:
            continue
        name = token[2:].split("=", 1)[0]
        if name in known or name == "help":
            continue
        ours = theirs(name.replace("-", "_"))
        if ours and " " in ours:
            return f"--{name}: {ours}"
        if ours:
            return f"--{name}: this repo calls it --{ours}"
        close = difflib.get_close_matches(name, known + [k for k in OTHER_NAMES if theirs(k)], n=1, cutoff=0.7)
        close = [theirs(c) if c in OTHER_NAMES else c for c in close]
        return f"unknown flag --{name}" + (f"; did you mean --{close[0]}?" if close and " " not in close[0] else "")
    return None


def default_text(value) -> str | None:
    """A default as a user types it (--betas 0.9 0.999), or None when there is nothing to show: no value, an
    empty list, a switch that is off."""
    if value is None or value is False or value == []:
        return None
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def parse_args(cls, argv=None):
    """argparse built from the dataclass: each field a --flag with its type, default and help, in FLAG_GROUPS."""
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    script = Path(sys.modules[cls.__module__].__file__).name if cls.__module__ != "__main__" else None
    parser = Parser(prog=script, description=sys.modules[cls.__module__].__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                    usage="%(prog)s --ckpt_paths PATH [PATH ...] --train_data_paths SOURCE [SOURCE ...] "
                          "--output_dir DIR [flags]")
    common = {f.name for f in fields(CommonArgs)}
    groups = {title: parser.add_argument_group(title) for title in FLAG_GROUPS}
    own = parser.add_argument_group(f"{parser.prog}")
    other = parser.add_argument_group("other")
    order = [name for names in FLAG_GROUPS.values() for name in names]
    for f in sorted(fields(cls), key=lambda f: order.index(f.name) if f.name in order else len(order)):
        if f.type in (bool, "bool"):
            kwargs = {"action": "store_true"}
        elif f.type in (list, "list"):
            kwargs = {"nargs": "+", "type": str}
        else:
            kwargs = {"type": {"int": int, "float": float, "str": str}.get(f.type, f.type)}
        kwargs.update(f.metadata)
        if "choices" not in kwargs and kwargs.get("action") is None:
            kwargs.setdefault("metavar", {int: "N", float: "X"}.get(kwargs["type"], "V"))
        if f.default is MISSING and f.default_factory is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not MISSING else f.default_factory()
            shown = default_text(kwargs["default"])
            if shown and "default" not in kwargs["help"] and not isinstance(kwargs.get("action"), type):
                kwargs["help"] += f" (default: {shown})"
        title = next((t for t, names in FLAG_GROUPS.items() if f.name in names), None)
        group = groups[title] if title else other if f.name in common else own
        group.add_argument(f"--{f.name}", **kwargs)
    def fail(message):  # our own one-line errors, without argparse's pointer to --help
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    known = [o[2:] for o in parser._option_string_actions if o.startswith("--")]  # --no-share_prompt too
    if problem := unknown_flag(argv, known):
        fail(problem)
    args = cls(**vars(parser.parse_args(argv)))
    if getattr(args, "share_prompt", None) and not args.pack_samples:
        fail("--share_prompt lays a pair's prompt and both responses out in one packed row: it needs "
                     "--pack_samples")
    if hasattr(args, "share_prompt") and args.share_prompt is None:
        args.share_prompt = args.pack_samples
    for name, value in vars(args).items():
        rule = next((r for names, r in VALUE_RULES if name in names), None)
        if rule and value is not None and not rule[0](value):
            fail(f"--{name} {value}: must be {rule[1]}")
    if getattr(args, "wandb", False) and importlib.util.find_spec("wandb") is None:
        fail("--wandb needs the wandb package: pip install wandb, or drop --wandb")
    return args


# Flags with a valid range; argparse checks only types.
VALUE_RULES = [
    (("max_seq_len", "micro_batch_size_per_gpu", "gradient_accum_steps", "train_epochs", "train_steps", "lora_rank",
      "print_freq", "plan_nnodes"), (lambda v: v > 0, "a positive integer")),
    (("lr", "warmup_steps", "wd", "eps", "clip_grad_norm", "save_freq", "val_freq", "sft_weight",
      "dpo_label_smoothing", "max_checkpoints"), (lambda v: v >= 0, "zero or more")),
    (("lora_alpha", "dpo_beta", "simpo_beta", "dist_timeout"), (lambda v: v > 0, "positive")),
    (("lora_dropout",), (lambda v: 0 <= v < 1, "in [0, 1)")),
]


# -- the output dir --------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"
RUN_FILES = ("consolidated.00.pth", "params.json", "train_args.json", "metrics.jsonl", "metrics.png")
_lock = None  # the open lock file of this process's run (rank 0), closed by release_output_dir


def prepare_output_dir(args, d: Dist):
    """Refuse to mix two runs in one dir: a dir a live run holds (see lock_output_dir) is refused outright,
    and an --output_dir holding anything but the start record (train_args.json) of a run that failed before
    training needs --resume (with a checkpoint to resume from) or --overwrite. The input checkpoint's dir is
    refused before the lock, so that nothing is written into it."""
    out = Path(args.output_dir)
    inside = [p for p in args.ckpt_paths
              if out.resolve() in (native_dir(p).resolve(), *native_dir(p).resolve().parents)]
    if inside:
        raise ValueError(f"--output_dir {out} holds the input checkpoint {inside[0]}; write the run elsewhere")
    lock_output_dir(out, d)
    checkpoints, finished = checkpoint_dirs(out), finished_step(out)
    if holds_run(out) and not (args.resume or args.overwrite):
        if finished is not None:
            raise ValueError(f"--output_dir {out} holds a finished run ({finished} steps); pass --overwrite to "
                             f"replace it, or choose another --output_dir")
        if checkpoints:
            raise ValueError(f"--output_dir {out} holds a stopped run (its last checkpoint: {checkpoints[-1].name}); "
                             f"pass --resume to continue it or --overwrite to start again")
        raise ValueError(f"--output_dir {out} holds a run that stopped before its first checkpoint, so there is "
                         f"nothing to resume: pass --overwrite to start again, or choose another --output_dir")
    if args.resume and not checkpoints:
        if finished is not None and not (args.train_steps and args.train_steps > finished):
            raise Finished(f"--output_dir {out} holds a finished run ({finished} steps): nothing to resume, "
                           f"nothing changed (--overwrite trains it again)")
        raise ValueError(f"--resume: no checkpoint under {out / 'checkpoints'} (the run saved none: --save_freq "
                         f"{args.save_freq}); rerun with --overwrite in place of --resume to start again")
    record = out / "train_args.json"
    previous = json.loads(record.read_text()) if record.is_file() else {}
    if args.resume:
        check_resumed_flags(args, previous)
    barrier()
    if d.main:
        if args.overwrite and not args.resume:  # the other run's outputs go; unrelated files stay
            for name in ("checkpoints", "adapter"):
                shutil.rmtree(out / name, ignore_errors=True)
            names = [*RUN_FILES, *TOKENIZER_FILES]
            if previous.get("template_config"):  # its template copy: a path's file name, or NAME.yaml
                template = Path(previous["template_config"])
                names.append(template.name if template.suffix else f"{template.name}.yaml")
            for f in names:
                (out / f).unlink(missing_ok=True)
        for partial in (out / "checkpoints").glob(".tmp_step_*"):  # left by a killed run
            shutil.rmtree(partial, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:  # the record of how the run started; a resumed run is checked against it
            record.write_text(json.dumps(config_dict(args), indent=2, default=str) + "\n")
    parallel.wait_for_all()  # deleting another run's checkpoints can take a while


class Finished(Exception):
    """--resume on a run whose last step is done and whose final model is saved: main says so and exits 0, so a job
    script that always resumes (a requeued job) succeeds, and nothing in the dir is touched."""


def holds_run(out: Path) -> bool:
    """Whether `out` holds a run's outputs: anything but the start record of a run that failed before training."""
    return out.is_dir() and any(p.name not in ("train_args.json", LOCK_FILE) for p in out.iterdir())


def finished_step(out: Path) -> int | None:
    """The last step of the run in `out` when it finished: its final weights (save_final writes them last, after
    the last step's line in metrics.jsonl) are newer than that line. None when it did not finish, or was resumed
    to go further and has logged steps since."""
    weights, log = out / "consolidated.00.pth", out / "metrics.jsonl"
    if not (weights.is_file() and log.is_file()) or weights.stat().st_mtime_ns < log.stat().st_mtime_ns:
        return None
    last = None
    for line in log.read_text().splitlines():
        try:
            last = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # a line a kill cut short
    return last if isinstance(last, int) else None


def lock_output_dir(out: Path, d: Dist):
    """An exclusive flock on OUT/.lock for the run's life (rank 0): a second run on the dir (a requeued job
    while the old one lingers) is refused, naming the holder. The OS drops the lock when the process dies,
    however it dies, so a crash never leaves a stale lock; the file itself stays and only says who held it."""
    import fcntl
    import socket

    global _lock
    refusal = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            _lock = f
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            refusal = (f"--output_dir {out} is in use by a live run ({holder}); wait for it to end or stop it, "
                       f"then rerun (with --resume to continue it)")
        except OSError as e:  # a filesystem without locks (some network mounts): run unguarded
            f.close()
            print(f"warning: cannot lock {out / LOCK_FILE} ({e}); nothing stops a second run on this dir",
                  flush=True)
    if dist.is_initialized():  # every rank leaves with the same answer
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise ValueError(refusal)


def release_output_dir():
    global _lock
    if _lock is not None:
        _lock.close()  # closing drops the flock
        _lock = None


def check_resumed_flags(args, before: dict):
    """A resumed run must rebuild the trainable parameters the checkpoint holds (the LoRA flags, when --lora
    is on); any other changed flag is allowed with a warning."""
    if not before:  # a run from before train_args.json was written at the start
        return

    def comparable(flags: dict) -> dict:
        flags = dict(flags)
        flags["ckpt_paths"] = [str(Path(p).resolve()) for p in flags.get("ckpt_paths") or []]
        flags["lora_targets"] = sorted(set(flags.get("lora_targets") or []))  # apply_lora takes a set
        if not flags.get("lora"):
            flags = {k: v for k, v in flags.items() if not k.startswith("lora_")}
        return flags

    before, now = comparable(before), comparable(json.loads(json.dumps(config_dict(args), default=str)))
    changed = sorted(k for k in set(before) | set(now)
                     if k not in ("resume", "overwrite") and before.get(k) != now.get(k))
    if bad := [k for k in changed if k in ("lora", "lora_rank", "lora_targets", "lora_unfrozen_params")]:
        raise ValueError(f"--resume: {', '.join(f'--{k} was {before.get(k)!r}, now {now.get(k)!r}' for k in bad)}; "
                         f"the checkpoint holds other trainable parameters: resume with the same flags")
    for k in changed:
        print0(f"warning: --resume with --{k} {now.get(k)!r} (the run started with {before.get(k)!r})")


def native_dir(path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


# -- a run: its set-up, then the common half of each optimizer step ------------------------------------------------
@dataclass
class Run:
    """What a run holds from set-up to its last step; the loop that moves it stays in each trainer."""
    args: CommonArgs
    d: Dist
    template: object  # its file is copied into the output dir
    train_set: object  # data.py's pretokenized datasets; val_set None without --val_data_paths
    val_set: object
    pad_id: int
    loader: object  # data.Loader: its state is the data position a checkpoint keeps
    val_loader: object
    model: torch.nn.Module  # parallelized
    bare_model: torch.nn.Module  # the Transformer inside it: its ModelArgs, LoRA's switches
    lora_config: dict | None
    input_dtype: torch.dtype  # the input checkpoint's: the saved weights' by default
    param_dtype: torch.dtype  # the compute dtype
    optimizer: torch.optim.Optimizer
    steps: int  # optimizer steps of the whole run
    step: int = 0  # optimizer steps done
    lr: float = 0.0  # the current step's
    t0: float = 0.0  # when the current step began
    batches: object = None  # micro-batches across epoch boundaries
    log: "MetricsLog" = None
    stop: StopSignal = None
    base: list = None  # (file, fingerprint) of what --ckpt_paths loaded (lora.fingerprints), kept in checkpoints
    state: dict = None  # a trainer's own state for the next checkpoint (GRPO's rollouts in use), given back by start
    drawn: float = field(default_factory=time.perf_counter)  # when metrics.png was last drawn (draw_metrics)


def setup(args, d: Dist, kind: str) -> Run:
    """A run up to its first step: the output dir (locked), seeds, tokenizer and template, the pretokenized data
    (kind: sft or preference) and its loaders, the model (LoRA, parallelized), AdamW and the step count. Resuming
    waits for `start`: DPO's reference pass in between may use the policy's initial weights."""
    from tokenize_chat import load_template, load_tokenizer

    check_inputs(args)
    prepare_output_dir(args, d)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    base = base_fingerprints(args, d)
    tokenizer = load_tokenizer(native_dir(args.ckpt_paths[0]))
    template = load_template(args.template_config, tokenizer)
    train_set, val_set = load_datasets(args, tokenizer, template, kind)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = make_loader(args, train_set, pad_id, d.device)
    val_loader = make_loader(args, val_set, pad_id, d.device, shuffle=False) if val_set is not None else None
    steps = total_steps(args, loader)
    check_finished(args, steps)
    print0(batch_summary(args, loader, d, steps))
    model, bare_model, lora_config, input_dtype = load_model(args, d)
    optimizer = build_optimizer(model, args.lr, args.wd, tuple(args.betas), args.eps)
    run = Run(args, d, template, train_set, val_set, pad_id, loader, val_loader, model, bare_model, lora_config,
              input_dtype, resolve_dtype(args.param_dtype, d.device), optimizer, steps)
    run.base = base
    return run


def base_fingerprints(args, d: Dist) -> list:
    """What the run starts from (step checkpoints keep it: lora.fingerprints); fails before any data work when a
    checkpoint is missing, and a LoRA --resume whose base changed stops here (check_base_unchanged)."""
    base = lora.fingerprints(args.ckpt_paths)
    if args.resume and args.lora:
        check_base_unchanged(load_extra(checkpoint_dirs(args.output_dir)[-1], d).get("base"), base, d)
    return base


def check_finished(args, steps: int):
    """--resume of a run that finished all its steps: nothing to do, said before anything is loaded or written."""
    finished = finished_step(Path(args.output_dir)) if args.resume else None
    if finished is not None and finished >= steps:
        raise Finished(f"--output_dir {args.output_dir} holds a finished run ({finished} of {steps} steps): "
                       f"nothing to resume, nothing changed (a larger --train_steps or --train_epochs trains on; "
                       f"--overwrite trains it again)")


def check_inputs(args):
    """What can be checked before anything is written: the weights of --ckpt_paths (an HF dir gets the convert.py
    command), the template (the *.yaml beside them unless --template_config names one) and the data paths."""
    from data import parse_sources
    from tokenize_chat import find_template

    for p in args.ckpt_paths:
        lora.resolve(p)
    if args.template_config is None:
        args.template_config = str(find_template(args.ckpt_paths))
        print0(f"template: {args.template_config} (from --ckpt_paths; --template_config chooses another)")
    for name in ("train", "val"):
        if paths := getattr(args, f"{name}_data_paths"):
            parse_sources(paths, getattr(args, f"{name}_data_splits") or None,
                          getattr(args, f"{name}_num_samples") or None)


def check_base_unchanged(started: list | None, now: list, d: Dist):
    """A LoRA run's step checkpoints hold only what trains (parallel.trainable_state): --resume rebuilds the frozen
    base from --ckpt_paths, which must still be the files the run started from (`started`, from the checkpoint)."""
    problem = None
    started = now if started is None else started  # a checkpoint from before the record: nothing to compare
    for (was, a), (file, b) in itertools.zip_longest(started, now, fillvalue=(None, None)):
        if a != b:  # a file's fingerprint; a file moved (same fingerprint, another path) is the same file
            why = ("its size, modification time or sampled bytes differ" if file == was else
                   f"--ckpt_paths now load {file or 'nothing'} in place of {was or 'nothing'}")
            problem = (f"resume: {file or was} changed since the run started ({why}); the checkpoint holds only "
                       f"what trains: resume with the weights the run started from")
            break
    if any_rank(problem is not None, d):  # every rank leaves together
        raise ValueError(problem or "resume: another process found its --ckpt_paths changed since the run started")


def load_datasets(args, tokenizer, template, kind: str):
    """The pretokenized train (and validation) sets; rank 0 builds the cache, the others wait."""
    from data import format_stats, prepare_dataset

    def prepare(paths, splits, num_samples):
        return prepare_dataset(paths, tokenizer, template, args.max_seq_len, kind=kind, splits=splits or None,
                               num_samples=num_samples or None, seed=args.seed, cache_dir=args.data_cache_dir,
                               progress=int(os.environ.get("RANK", 0)) == 0)

    train = prepare(args.train_data_paths, args.train_data_splits, args.train_num_samples)
    print0(format_stats("train", train))
    val = None
    if args.val_data_paths:
        val = prepare(args.val_data_paths, args.val_data_splits, args.val_num_samples)
        print0(format_stats("val", val))
    return train, val


def load_model(args, d: Dist):
    """The policy on its device, with LoRA adapters if asked, then parallelized. Built on the meta device and
    wrapped first, then filled from the memory-mapped checkpoint: under FSDP2 each process reads and allocates
    its own shards only (see parallel.parallelize). Returns (the parallelized model, the bare Transformer, the
    LoRA config or None, the input checkpoint's dtype)."""
    model, tensor = lora.meta_model(args.ckpt_paths)
    input_dtype = tensor("tok_embeddings.weight").dtype
    param_dtype = resolve_dtype(args.param_dtype, d.device)
    # Trained weights are fp32 masters. A LoRA run's frozen base never takes an optimizer update, so it
    # stays in the compute dtype (bf16 on GPUs): half the memory of the largest part of the model.
    model = model.to(dtype=param_dtype if args.lora else torch.float32)
    lora_config, adapters = None, {}
    if args.lora:
        lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        lora.mark_trainable(model, args.lora_unfrozen_params)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        torch.manual_seed(args.seed)  # the same adapter init on every rank
        adapters = lora.initial_adapters(model)
        lora_config = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": list(args.lora_targets),
                       "unfrozen": [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]}
    print0(parameter_summary(model))
    wrapped = parallelize(model, d, args.dp, param_dtype, args.activation_checkpointing, args.compile,
                          lambda name, rows=None: adapters[name][rows or slice(None)] if name in adapters
                          else tensor(name, rows))
    return wrapped, model, lora_config, input_dtype


def make_loader(args, dataset, pad_id: int, device: torch.device, shuffle: bool = True):
    """The run's batches of `dataset`: padded, or packed (pairs laid out with a shared prompt, --share_prompt).
    Packed batches meet compiled code under --compile, and on CUDA without it (FlexAttention is compiled on its
    own): there they keep one shape (data.Loader's fixed_shape), since every new shape is a new graph, and torch
    stops compiling after a few (then FlexAttention materialises every score)."""
    from data import Loader

    fixed = args.compile or packed_kernel(device) == "flex"
    return Loader(dataset, args.micro_batch_size_per_gpu, pack=args.pack_samples, seed=args.seed, shuffle=shuffle,
                  share_prompt=getattr(args, "share_prompt", False), pad_id=pad_id, fixed_shape=fixed)


def batch_summary(args, loader, d: Dist, steps: int) -> str:
    """What one optimizer step trains, in samples (pairs) and tokens, and how many steps an epoch and the run take:
    a packed row holds several samples, so the flags alone do not say."""
    unit = "pairs" if loader.pairs else "samples"
    rows, samples, tokens = loader.epoch_summary(0)
    per_epoch = -(-loader.num_steps(0) // args.gradient_accum_steps)
    micro = (f"{args.micro_batch_size_per_gpu} packed rows (~{samples / max(rows, 1):.1f} {unit} each)"
             if loader.pack else f"{args.micro_batch_size_per_gpu} {unit}")
    exact = samples % per_epoch == 0 and not loader.pack
    per_step = f"{samples // per_epoch}" if exact else f"~{samples / per_epoch:.1f}"
    return (f"batch: {micro} per micro-batch x {args.gradient_accum_steps} accumulation x {d.world_size} "
            f"process{'es' if d.world_size > 1 else ''} = {per_step} {unit} and ~{tokens / per_epoch:,.0f} tokens "
            f"per optimizer step; {per_epoch} steps per epoch, {steps} steps in all")


def total_steps(args, loader) -> int:
    """--train_steps, else the steps of --train_epochs passes: the last step of an epoch takes the epoch's
    remaining micro-batches (see next_step)."""
    if args.train_steps:
        return args.train_steps
    return sum(-(-loader.num_steps(e) // args.gradient_accum_steps) for e in range(args.train_epochs))


def start(run: Run) -> dict:
    """With --resume, restore the latest checkpoint (model, optimizer, loader position, RNG); continue
    metrics.jsonl from that step; from here on, a SIGTERM waits for the end of the step (see StopSignal).
    Returns the trainer's own state that checkpoint held (run.state when it was saved; {} without one)."""
    args, state = run.args, {}
    if args.resume:
        latest = checkpoint_dirs(args.output_dir)[-1]
        extra = load_checkpoint(latest, run.model, run.optimizer, run.d)
        run.loader.load_state_dict(extra["loader"])
        set_rng_state(extra["rng"])
        run.step = extra["step"]
        state = extra.get("state") or {}
        print0(f"resumed from {latest} at step {run.step}")
    run.log = MetricsLog(args.output_dir, run.d, run.steps, args.print_freq, start_step=run.step,
                         wandb_project=args.wandb_project if args.wandb else None, config=config_dict(args))
    run.stop = StopSignal()
    print0(f"set-up peak memory {peak_memory_gb(run.d.device):.2f} GB (rank 0); the log's memory is training's")
    reset_peak_memory(run.d.device)
    loader = run.loader  # the loader's own state marks the position for resume
    run.batches = (batch for _ in itertools.count() for batch in loader)
    run.model.train()
    return state


def next_step(run: Run) -> list:
    """Begin optimizer step run.step + 1: its clock, its learning rate, its --gradient_accum_steps micro-batches,
    fewer when the epoch runs out, so that an epoch is exactly one pass over the data (as transformers' Trainer
    does); the trainers normalise the loss by the step's own token or pair count, so a short step is still a mean."""
    args = run.args
    run.t0 = time.perf_counter()
    run.lr = lr_at(run.step, args.lr, args.lr_scheduler, args.warmup_steps, run.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    micro_batches = [next(run.batches)]
    while len(micro_batches) < args.gradient_accum_steps and not run.loader.epoch_done():
        micro_batches.append(next(run.batches))
    return micro_batches


def optimizer_step(run: Run, loss: float, tokens: float) -> dict:
    """The update from the step's accumulated gradients, clipped to --clip_grad_norm (the global norm, across
    FSDP shards); a loss that is not finite stops the run before it, so the weights and the checkpoints stay good.
    Returns the metrics every trainer logs."""
    if not math.isfinite(loss):
        last = checkpoint_dirs(run.args.output_dir)
        raise FloatingPointError(f"loss is {loss} at step {run.step + 1}: stopping before the update. The last good "
                                 f"checkpoint is {last[-1] if last else 'none (no --save_freq)'}; lower --lr or "
                                 f"check the data")
    max_norm = run.args.clip_grad_norm if run.args.clip_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.grad is not None], max_norm,
                                          foreach=True)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.d.device.type == "cuda":  # the step's kernels are queued, not done: time them done
        torch.cuda.synchronize(run.d.device)
    run.step += 1
    return {"loss": loss, "lr": run.lr, "grad_norm": grad_norm, "tokens": int(tokens),
            "tokens_per_s": tokens / (time.perf_counter() - run.t0), "epoch": run.loader.epoch}


def val_due(run: Run) -> bool:
    """After every --val_freq steps, and after the last, when there is validation data."""
    every = run.args.val_freq
    return run.val_loader is not None and (run.step == run.steps or bool(every) and run.step % every == 0)


def end_step(run: Run, metrics: dict) -> bool:
    """The step's line in metrics.jsonl and a checkpoint every --save_freq steps; True when the run must end
    now: a SIGTERM reached some rank, and the checkpoint to resume from is saved."""
    # Every process's peak since training began (set-up excluded): the largest is the one that decides.
    peak = torch.tensor([peak_memory_gb(run.d.device)], device=run.d.device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    run.log.log(run.step, {**metrics, "memory_gb": float(peak)})

    def checkpoint() -> Path:
        extra = {"step": run.step, "loader": run.loader.state_dict(), "rng": rng_state(), "base": run.base,
                 "state": run.state}
        return save_checkpoint(run.args.output_dir, run.step, run.model, run.optimizer, extra, run.d,
                               run.args.max_checkpoints)

    if run.args.save_freq and run.step % run.args.save_freq == 0 and run.step < run.steps:
        checkpoint()
        draw_metrics(run)
    if any_rank(run.stop.requested, run.d):
        global stopped_by
        stopped_by = run.stop.signum or signal.SIGTERM  # another rank's signal: torchrun's SIGTERM
        saved = checkpoint()
        run.stop.saved = True
        draw_metrics(run, now=True)
        print0(f"{'Ctrl-C' if stopped_by == signal.SIGINT else 'SIGTERM'}: saved {saved}; resume with --resume "
               f"(the same command, plus --resume)")
        return True
    return False


stopped_by = None  # the signal that ended the run after a checkpoint (end_step); main exits with 128 + it


# -- preference pairs (DPO, SimPO) -------------------------------------------------------------------------------
# A preference batch's responses, s and n [2P]: the chosen responses of its P pairs, then the rejected ones.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def response_lengths(batch) -> torch.Tensor:
    """n [2P]: each response's trained tokens (data.py's response_ids say which tokens are whose). One empty
    side is an error: its s would be 0 and SimPO's s / n a NaN."""
    trained = batch["labels"] != IGNORE_INDEX
    n = torch.bincount(batch["response_ids"][trained], minlength=2 * len(batch["sample_ids"]))
    if (n == 0).any():
        k = int((n == 0).nonzero()[0])
        P = len(batch["sample_ids"])
        raise ValueError(f"preference pair {int(batch['sample_ids'][k % P])} (dataset index) has an empty "
                         f"{'rejected' if k >= P else 'chosen'} response: no trained token. Rebuild the data "
                         f"cache (data.py drops such pairs) or fix the record")
    return n


def preference_counts(micro_batches, d: Dist) -> list[float]:
    """[pairs, chosen response tokens, tokens] of a whole step: all micro-batches, all ranks. Tokens count
    each sample as it is (a shared prompt in both sides): the work asked for, not the work done."""
    counts = torch.tensor([[len(b["sample_ids"]), float(response_lengths(b).chunk(2)[0].sum()), float(b["tokens"])]
                           for b in micro_batches], dtype=torch.float64)
    return all_reduce_sum(counts.sum(0).to(d.device)).tolist()


def forward_logprobs(model, batch, device) -> torch.Tensor:
    """log p of every label [R, T] (0 where none): per-document attention when the batch is packed."""
    return model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                 labels=batch["labels"].to(device), segments=batch.get("segments"))


def response_logps(model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the batch's rows (padded chosen + rejected rows, or packed pairs) -> (s, n) [2P]: each
    response's log-prob summed over its trained tokens only (prompt and padding are -100, where the model
    returns 0), and the number of those tokens."""
    labels = batch["labels"].to(device)
    logprobs = forward_logprobs(model, batch, device)
    trained = labels != IGNORE_INDEX
    owner = batch["response_ids"].to(device)[trained]
    n = response_lengths(batch).to(device)
    return torch.zeros(len(n), dtype=logprobs.dtype, device=device).index_add(0, owner, logprobs[trained]), n


def pair_metric_sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> torch.Tensor:
    """Sums over pairs of TRL's metrics (PAIR_METRICS order); `pair_metrics` divides by the global count."""
    return torch.stack([chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).sum(),
                        (chosen_rewards - rejected_rewards).sum(), chosen_logps.sum(),
                        rejected_logps.sum()]).detach().float()


def pair_metrics(sums, pairs: float, prefix: str = "") -> dict:
    return {prefix + k: float(v) / max(pairs, 1) for k, v in zip(PAIR_METRICS, sums)}


# -- optimisation ----------------------------------------------------------------------------------------------
def build_optimizer(model, lr: float, wd: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW; norms and biases (the 1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step: int, base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then linear, cosine or constant
    (--lr_scheduler's choices)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr


# -- the final model -------------------------------------------------------------------------------------------
def save_final(run: Run):
    """The output dir as a complete native dir: consolidated.00.pth (LoRA merged in) in the input checkpoint's
    dtype unless --save_dtype, params.json, tokenizer files, the template, train_args.json; LoRA runs also keep
    the adapter alone under adapter/ (with any --lora_unfrozen_params), so base + adapter loads as the trained
    model. Each file is written under a temp name and renamed, the weights last: a dir whose consolidated.00.pth
    exists is complete, wherever a kill or a full disk stopped the save. The weights go one tensor at a time,
    gathered from the shards as they are written: no process ever holds the whole model."""
    args, d = run.args, run.d
    save_dtype = run.input_dtype if args.save_dtype == "auto" else DTYPES[args.save_dtype]
    error, needed = write_model_dir(run, save_dtype)
    # A LoRA run's merged weights are rank 0's work alone (the others are done once the adapters are gathered):
    # wait for it outside the collectives, however long the write takes.
    parallel.wait_for_all()
    if any_rank(error is not None, d):
        last = checkpoint_dirs(args.output_dir)
        raise OSError(write_failure("the final model", Path(args.output_dir) / "consolidated.00.pth", error, d, needed,
                                    f"the step checkpoint {last[-1]} is intact: free space and rerun with "
                                    f"--resume" if last else "no step checkpoint exists (--save_freq 0)"))
    draw_metrics(run, now=True)
    print0(f"saved {args.output_dir}")


def write_model_dir(run: Run, save_dtype: torch.dtype) -> tuple:
    """Every process takes part (a full fine-tune's tensors are gathered from all of them); rank 0 writes. A write
    that fails on rank 0 (a full disk) ends its writing, not its part in the gathers, so no process waits
    forever. Returns (rank 0's error or None, the bytes the weights need)."""
    args, d, output_dir, lora_config = run.args, run.d, Path(run.args.output_dir), run.lora_config
    params = parallel.checkpoint_parameters(run.bare_model)
    error = None

    def on_main(write):
        nonlocal error
        if d.main and error is None:
            try:
                write()
            except (OSError, RuntimeError) as e:  # torch.save writes through its own stream: a RuntimeError
                error = e

    weights = output_dir / "consolidated.00.pth"
    on_main(lambda: output_dir.mkdir(parents=True, exist_ok=True))
    on_main(lambda: weights.unlink(missing_ok=True))  # from here until the end, the dir is visibly incomplete
    if lora_config:
        adapter = {k: parallel.full_tensor(p).float() for k, p in params.items()
                   if ".lora_" in k or k in lora_config["unfrozen"]}
        on_main(lambda: lora.save_adapter(output_dir / "adapter", adapter, lora_config["rank"], lora_config["alpha"],
                                          lora_config["targets"]))
        # Merged into the input checkpoint as read, not into the copy that trained: that frozen base may have
        # been cast to bf16 for compute, and saving it would round every untrained weight. Rank 0's work alone.
        stored, base = lora.stacked_source(args.ckpt_paths)
        layout = {k: (v.shape, save_dtype) for k, v in stored.items()} if d.main else {}

        def tensor(name):
            value, prefix = adapter[name] if name in adapter else base(name, slice(None)), name[: -len("weight")]
            layer = {name: value, **({prefix + "lora_a": adapter[prefix + "lora_a"],
                                      prefix + "lora_b": adapter[prefix + "lora_b"]}
                                     if name.endswith(".weight") and prefix + "lora_a" in adapter else {})}
            return lora.merged_state_dict(layer, lora_config["rank"], lora_config["alpha"])[name]
    else:
        layout = {k: (p.shape, save_dtype) for k, p in params.items()}

        def tensor(name):
            return parallel.full_tensor(params[name])
    if run.bare_model.args.tie_word_embeddings:
        layout.pop("output.weight", None)
    texts = {"params.json": json.dumps(run.bare_model.args.to_json(), indent=2) + "\n",
             "train_args.json": json.dumps(config_dict(args), indent=2, default=str) + "\n"}
    ckpt_dir = native_dir(args.ckpt_paths[0])
    copies = [] if ckpt_dir.resolve() == output_dir.resolve() else [ckpt_dir / n for n in TOKENIZER_FILES]
    for src in [p for p in copies if p.is_file()] + [Path(run.template.path)]:
        texts[src.name] = src.read_bytes()
    for name, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        on_main(lambda: atomic_write(output_dir / name, lambda f: f.write(data)))
    if d.main and error is None:
        on_main(lambda: atomic_write(weights, lambda f: save_streamed(f, layout, tensor)))
    else:
        save_streamed(None, layout, tensor)
    return error, sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layout.values())


def save_streamed(f, layout: dict, tensor):
    """torch.save({name: tensor(name)}, f), layout {name: (shape, dtype)}, one tensor at a time: first the file's layout
    (torch.serialization.skip_data: the pickle, and room for every tensor's bytes), then each tensor's bytes at
    its place in the zip archive; torch.load reads the result as it reads any torch.save file. Every process
    calls tensor(name) (it may gather from the others); the one writing passes its file, the others None. A
    failed write stops the writing, not the calls, and is raised at the end."""
    import zipfile

    from torch._subclasses.fake_tensor import FakeTensorMode

    error, places = None, {}
    if f is not None:
        try:
            with FakeTensorMode():
                fakes = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
            with torch.serialization.skip_data(materialize_fake_tensors=True):
                torch.save(fakes, f)
            f.flush()
            # torch.save numbers the storages in the order it pickles them, the dict's: tensor i is data/i. A
            # stored zip entry's bytes follow its local header (30 bytes, then its name and extra field).
            with zipfile.ZipFile(f.name) as z, open(f.name, "rb") as raw:
                records = {i.filename.rsplit("/data/", 1)[-1]: i for i in z.infolist() if "/data/" in i.filename}
                for i, name in enumerate(layout):
                    info = records[str(i)]
                    raw.seek(info.header_offset + 26)
                    skip = int.from_bytes(raw.read(2), "little") + int.from_bytes(raw.read(2), "little")
                    places[name] = info.header_offset + 30 + skip, info.file_size
        except (OSError, RuntimeError) as e:
            error = e
    for name, (shape, dtype) in layout.items():
        t = tensor(name).detach().to("cpu", dtype).contiguous()
        if f is None or error is not None:
            continue
        offset, size = places[name]
        assert t.nbytes == size, f"{name}: {t.nbytes} bytes for a place of {size}"
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        try:
            while data:  # a write that fills the disk is short first, then fails
                written = os.pwrite(f.fileno(), data, offset)
                if written == 0:
                    raise OSError(errno.ENOSPC, f"wrote nothing of {name}")
                data, offset = data[written:], offset + written
        except OSError as e:
            error = e
    if error is not None:
        raise error


def atomic_write(path: Path, write):
    """write(f) into a temp file, then a rename; a failed write removes the temp file (on a full disk its space
    is what the user needs back). A file object, so torch.save's failed write is an OSError, not `unexpected pos`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- logging ---------------------------------------------------------------------------------------------------
def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory since reset_peak_memory: CUDA's peak allocation, or on the CPU the peak
    resident set (VmHWM, which the kernel lets a process reset; ru_maxrss where there is no /proc)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024**2  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def reset_peak_memory(device: torch.device):
    """From here on, peak_memory_gb measures training, not loading: the peak so far becomes the current use."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current resident set
    except OSError:
        pass  # then the peak includes set-up


class MetricsLog:
    """metrics.jsonl, one JSON object per optimizer step, and one human line per --print_freq steps."""

    def __init__(self, output_dir: Path, d: Dist, total_steps: int, print_freq: int, start_step: int = 0,
                 wandb_project: str | None = None, config: dict | None = None):
        self.d, self.total, self.print_freq = d, total_steps, max(1, print_freq)
        self.path = Path(output_dir) / "metrics.jsonl"
        self.start = time.perf_counter()
        self.start_step = None
        self.wandb = None
        if d.main and wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb needs the wandb package (pip install wandb), or drop --wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir),
                                    name=Path(output_dir).name, resume="allow")
        if d.main:
            # A resumed run continues the file from its checkpoint; steps logged after it (by a run that
            # was killed later) are dropped, since they are about to be trained again, and so is a last
            # line that a kill cut short.
            kept = []
            if start_step and self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= start_step:
                            kept.append(line)
                    except (json.JSONDecodeError, TypeError, KeyError):
                        pass
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict):
        if not self.d.main:
            return
        if self.start_step is None:
            self.start_step = step - 1
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if step % self.print_freq == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.perf_counter() - self.start) / done * (self.total - step)
            extra = " ".join(f"{k.split('/')[-1] if k.startswith('rewards/') else k} {v:.4g}"
                             for k, v in metrics.items()
                             if k not in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "epoch", "memory_gb"))
            bar = "#" * (20 * step // self.total)
            print(f"[{bar:<20}] step {step}/{self.total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                  f"grad norm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s | "
                  f"mem {metrics['memory_gb']:.2f} GB | eta {format_seconds(eta)}"
                  + (f" | {extra}" if extra else ""), flush=True)


_told_no_matplotlib = False


def draw_metrics(run: Run, now: bool = False, every: float = 60.0):
    """metrics.png beside metrics.jsonl (plot.py), on rank 0: at the end of a run (now), and at a checkpoint when
    `every` seconds have passed since the last drawing, so that frequent checkpoints do not spend their time on
    it. Drawing never fails a run: without matplotlib one line (once) says how to get it, and any other error
    is a warning."""
    global _told_no_matplotlib
    if not run.d.main or not (now or time.perf_counter() - run.drawn >= every):
        return
    run.drawn = time.perf_counter()
    out = Path(run.args.output_dir)
    try:
        import plot

        plot.plot_metrics([out / "metrics.jsonl"], out / "metrics.png")
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        if not _told_no_matplotlib:
            print(f"metrics.png not drawn: matplotlib is not installed (pip install matplotlib, then "
                  f"python plot.py {out} draws it)", flush=True)
            _told_no_matplotlib = True
    except Exception as e:  # a full disk, an odd metric: the run matters more than its picture
        print(f"warning: metrics.png not drawn ({first_line(e)})", flush=True)


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parameter_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"parameters: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable "
            f"({100 * trainable / max(total, 1):.2f}%), {(total - trainable) / 1e6:.2f}M frozen")


def config_dict(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}


# -- the command line ------------------------------------------------------------------------------------------
def main(train, args_class, argv=None):
    """A trainer's main(): parse the flags, start the process group, train(args, d); bad input exits 1 with the
    message (no traceback), and the process group always closes."""
    global stopped_by
    args = parse_args(args_class, argv)
    if args.plan:  # before any process group, weights or data
        import memory_plan

        print(memory_plan.plan_from_args(args)[1])
        return
    d = setup_distributed(args.dist_timeout)
    name = Path(sys.modules[train.__module__].__file__).name
    stopped_by = None
    try:
        train(args, d)
        if stopped_by:  # a checkpoint was saved and the resume line printed (end_step)
            sys.exit(128 + stopped_by)
    except Finished as e:
        print0(f"{name}: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C before training began, or twice (see parallel.StopSignal)
        last = checkpoint_dirs(args.output_dir)
        rerun = (f"the last complete checkpoint is {last[-1]}: rerun with --resume" if last else
                 "no checkpoint to resume from: rerun" + (" with --overwrite" if holds_run(Path(args.output_dir))
                                                          else " the same command"))
        print(f"\n{name}: {str(e) or 'interrupted (Ctrl-C)'}; {rerun}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"{name}: error (rank {d.rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except RuntimeError as e:
        if not parallel.collective_failed(e):
            raise
        # A collective failed: another process of the run died (killed, out of memory, a lost node) or did not
        # answer within --dist_timeout. torchrun stops the rest; what this rank can add is one line and the way
        # back, not gloo's traceback or NCCL's watchdog dump (see parallel.setup_distributed).
        last = checkpoint_dirs(args.output_dir)
        print(f"{name}: error (rank {d.rank}): lost another process of this run ({first_line(e)[:160]}); see "
              f"its log for why (or raise --dist_timeout {args.dist_timeout:g} min if it was only slow). Rerun "
              f"with --resume: the last complete checkpoint is "
              f"{last[-1] if last else 'none (no --save_freq): rerun from the start'}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        release_output_dir()
        teardown_distributed()
        parallel.restore_signals()
        if stopped_by:  # on its way out with 128 + the signal: a late Ctrl-C must not end it as killed
            signal.signal(signal.SIGINT, signal.SIG_IGN)
