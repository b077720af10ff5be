"""Group Relative Policy Optimization (Shao et al., 2024) and its DAPO / Dr. GRPO variants: online RL with rewards
computed by programs (RLVR), with TRL 1.x's names, defaults and formulas.

Each prompt gets G completions sampled from the policy; each completion a reward r (a weighted sum of the reward
functions' values); its advantage A = (r - mean of its group) / (std of its group + 1e-4) (--scale_rewards batch:
the std of the whole rollout batch; none: no division). The per-token loss is PPO's clipped surrogate
-min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A), rho = exp(logp - logp_old), plus beta times the k3
estimate of KL(policy || reference), exp(ref - logp) - (ref - logp) - 1. logp_old is the training forward's own
log-prob before the rollout batch's first update (detached): with --num_iterations 1, rho = 1 in value and the
gradient is the policy gradient; the sampler's log-probs never enter the loss.
--loss_type (how the per-token losses of one optimizer step become one number, over all micro-batches and ranks):
  dapo (default): the sum over every completion token of the step / their number
  grpo: the mean over the step's completions of each completion's token mean
  dr_grpo: the sum over every completion token / (completions x --max_completion_length)

    torchrun --nproc_per_node 1 train_grpo.py --ckpt_paths outputs/sft --template_config chatml \\
        --train_data_paths jsonl:prompts.jsonl --reward_funcs rewards.py:correct_sum --num_generations 8 \\
        --max_completion_length 64 --micro_batch_size_per_gpu 2 --gradient_accum_steps 4 --lr 1e-6 \\
        --train_steps 200 --output_dir outputs/grpo

Prompts: jsonl lines {"prompt": "..."}, {"prompt": [messages]} or {"messages": [...]} ending with a user turn;
any other field reaches the reward functions by name (an "answer" field: fn(..., answer=[...])).
--micro_batch_size_per_gpu counts prompts, each with its G completions. One rollout batch is one optimizer
step's prompts (micro x accumulation x processes); --num_iterations mu steps train on it.
The output dir is a native checkpoint (generate.py, convert.py, the next stage) with metrics.jsonl and
rollouts.jsonl (one line per completion: step, prompt, prompt_ids, completion_ids as trained, completion, rewards
by function, reward, advantage).
--resume continues exactly: rollouts are seeded from (seed, step, rank, micro-batch), and a checkpoint taken
between the --num_iterations steps of one rollout batch keeps that batch. --lora trains adapters (the reference
of --beta is then the policy with its adapters off). --val_data_paths: the mean reward of greedy completions.
"""

import json
import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import parallel
import train_common as tc
from model import IGNORE_INDEX


@dataclass
class GRPOArgs(tc.CommonArgs):
    num_generations: int = tc.arg(8, help="G: completions sampled per prompt")
    max_completion_length: int = tc.arg(256, help="tokens per completion at most (the stop token included)")
    temperature: float = tc.arg(1.0, help="sampling temperature of the rollouts")
    top_p: float = tc.arg(1.0, help="rollouts: nucleus sampling, keep the smallest set with this mass")
    top_k: int = tc.arg(0, help="rollouts: sample among the k likeliest tokens (0: all)")
    epsilon: float = tc.arg(0.2, help="the ratio's lower clip: 1 - epsilon")
    epsilon_high: float = tc.arg(None, help="the ratio's upper clip: 1 + epsilon_high (default: --epsilon)")
    beta: float = tc.arg(0.0, help="weight of the k3 KL to the reference (the initial weights, a frozen copy); "
                         "0: no reference")
    num_iterations: int = tc.arg(1, help="mu: optimizer steps on each batch of rollouts")
    loss_type: str = tc.arg("dapo", help="dapo: token mean over the step; grpo: mean of per-completion token "
                            "means; dr_grpo: token sum / (completions x max_completion_length)",
                            choices=["dapo", "grpo", "dr_grpo"])
    scale_rewards: str = tc.arg("group", help="divide advantages by the group's reward std, the batch's, or not",
                                choices=["group", "batch", "none"])
    reward_funcs: list = tc.arg([], help="required: reward functions, path/to/file.py:name each (TRL's signature)")
    reward_weights: list = tc.arg([], help="one weight per reward function (default 1 each)", type=float)


# -- the loss --------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, G: int, scale_rewards: str, batch_std: torch.Tensor | None = None):
    """rewards [N] (NaN: no reward function scored the completion), completions of a prompt contiguous, G
    each -> (advantages [N], std_is_zero [N]). As TRL: (r - group mean) / (std + 1e-4), std the group's
    (unbiased) or, for scale_rewards batch, `batch_std` (the whole rollout batch's, all ranks: the caller
    reduces it); none: r - group mean. Means and stds skip NaN rewards; a NaN reward's advantage is 0, and so is
    every advantage of a group whose rewards are all equal."""
    grouped = rewards.view(-1, G)
    mean = grouped.nanmean(1, keepdim=True)
    count = (~grouped.isnan()).sum(1, keepdim=True)
    var = ((grouped - mean) ** 2).nansum(1, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan"))).expand_as(grouped).reshape(-1)
    advantages = rewards - mean.expand_as(grouped).reshape(-1)
    if scale_rewards == "batch":
        std = batch_std.expand_as(rewards)
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages.nan_to_num(0.0), torch.isclose(std, torch.zeros_like(std))


def nan_std(x: torch.Tensor) -> torch.Tensor:
    """The unbiased std of the values that are not NaN (TRL's nanstd); NaN for fewer than 2."""
    x = x[~x.isnan()]
    return x.std() if len(x) > 1 else x.new_tensor(float("nan"))


def grpo_loss_sum(logps, old_logps, ref_logps, advantages, completion, loss_type: str, epsilon: float,
                  epsilon_high: float, beta: float):
    """One micro-batch's share of the step's loss numerator. Per completion token (all [N], in completion order):
    logps (with gradient), old_logps and ref_logps (detached; ref None when beta = 0), `completion` the index
    of its completion among the micro-batch's C; advantages [C]. dapo and dr_grpo: the sum of the per-token
    losses; grpo: the sum over completions of each one's token mean. The caller divides by the step's global
    `loss_denominator`. Returns (numerator, per-token losses, per-token KL or None, rho)."""
    rho = torch.exp(logps - old_logps)
    a = advantages[completion].to(rho.dtype)
    per_token = -torch.min(rho * a, rho.clamp(1 - epsilon, 1 + epsilon_high) * a)
    kl = None
    if beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        C = len(advantages)
        sums = per_token.new_zeros(C).index_add(0, completion, per_token)
        lengths = torch.bincount(completion, minlength=C).clamp(min=1).to(per_token.dtype)
        return (sums / lengths).sum(), per_token, kl, rho
    if loss_type in ("dapo", "dr_grpo"):
        return per_token.sum(), per_token, kl, rho
    raise ValueError(f"unknown --loss_type {loss_type!r} (dapo, grpo, dr_grpo)")


def loss_denominator(loss_type: str, tokens: int, completions: int, max_completion_length: int) -> int:
    """The step's global denominator (all micro-batches, all ranks): completion tokens for dapo, completions
    for grpo, completions x --max_completion_length for dr_grpo (TRL: per_token_loss.size(0) x
    max_completion_length per micro-batch, i.e. this when micro-batches hold equally many completions)."""
    if loss_type == "dapo":
        return max(tokens, 1)
    if loss_type == "grpo":
        return max(completions, 1)
    return max(completions, 1) * max_completion_length



# -- training on rollouts: a prompt and its G completions in one packed row ------------------------------------
def group_batch(prompts: list, completions: list, G: int, pad_id: int) -> dict:
    """The micro-batch's forward: one row per prompt, laid out prompt[:-1] | prompt[-1] c_1[:-1] | ... |
    prompt[-1] c_G[:-1], so the prompt is computed once for its G completions. The prompt but its last token is
    a segment of its own; each completion is a segment that sees it as its prefix, and restarts from the
    prompt's last token (the position that predicts the completion's first token), at the positions it has
    alone: exactly each completion's log-probs of prompt + completion run alone. The completion's last token
    predicts nothing trained, so it is no input. -> input_ids, position_ids, labels (already shifted, -100
    where nothing trains), completion (which of the micro-batch's P x G completions a label belongs to, -1
    elsewhere), all [P, T] right-padded, and segments [S, 5] (model.segment_attention's table)."""
    rows, segments = [], []
    for i, p in enumerate(prompts):
        n = len(p) - 1
        ids, pos, labels, owner = list(p[:-1]), list(range(n)), [IGNORE_INDEX] * n, [-1] * n
        if n:
            segments.append((i, 0, n, 0, 0))
        for k in range(i * G, (i + 1) * G):
            c, start = completions[k], len(ids)
            ids += [p[-1], *c[:-1]]
            pos += range(n, n + len(c))
            labels += c
            owner += [k] * len(c)
            segments.append((i, start, len(ids), 0, n))
        rows.append((ids, pos, labels, owner))
    T = max(len(r[0]) for r in rows)

    def tensor(k, fill):
        return torch.tensor([r[k] + [fill] * (T - len(r[k])) for r in rows])
    return {"input_ids": tensor(0, pad_id), "position_ids": tensor(1, 0), "labels": tensor(2, IGNORE_INDEX),
            "completion": tensor(3, -1), "segments": torch.tensor(segments)}


def completion_logprobs(model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [N], completion index [N]) of every completion token of the batch, in completion order."""
    logprobs = tc.forward_logprobs(model, batch, device)
    trained = batch["labels"].to(device) != IGNORE_INDEX
    return logprobs[trained], batch["completion"].to(device)[trained]

# -- rewards ---------------------------------------------------------------------------------------------------
def load_reward_funcs(specs: list) -> list:
    """--reward_funcs path/to/file.py:name ... -> [(name, function)]. The functions are TRL's: fn(prompts,
    completions, completion_ids, **columns) -> a list of float or None, one per completion."""
    import importlib.util

    funcs = []
    for spec in specs:
        path, sep, name = str(spec).rpartition(":")
        if not sep or not path or not name:
            raise ValueError(f"--reward_funcs {spec!r}: expected path/to/file.py:function_name")
        if not Path(path).is_file():
            raise ValueError(f"--reward_funcs {spec!r}: {path} is not a file")
        module_name = f"_reward_{len(funcs)}_{Path(path).stem}"
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"--reward_funcs {spec!r}: importing {path} raised {type(e).__name__}: {e} "
                             f"({where_raised(e, path)})") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise ValueError(f"--reward_funcs {spec!r}: {path} has no function {name!r} (it has: "
                             f"{', '.join(found) or 'none'})")
        funcs.append((name, fn))
    if len({n for n, _ in funcs}) < len(funcs):
        raise ValueError(f"--reward_funcs {' '.join(map(str, specs))}: two functions share a name; their metrics "
                         f"(rewards/<name>/mean) would mix: rename one")
    return funcs


def where_raised(e: BaseException, path=None) -> str:
    """file:line of the innermost frame of the traceback (in `path` when it has one there)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if path is None or Path(f.filename).resolve() == Path(path).resolve()] or frames
    return f"{inside[-1].filename}:{inside[-1].lineno}" if inside else "no traceback"


def compute_rewards(funcs: list, weights: list, prompts: list, completions: list, completion_ids: list,
                    columns: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every function on every completion -> (per function [N, F] float64, NaN where it returned None; the
    reward [N] = the weighted sum over the functions that scored it, NaN where none did), as TRL's nansum. Bad
    output is an error naming the function and the sample."""
    N = len(completions)
    values = torch.full((N, len(funcs)), float("nan"), dtype=torch.float64)
    for j, (name, fn) in enumerate(funcs):
        try:
            out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise ValueError(f"reward function {name!r} raised {type(e).__name__}: {e} (at {where_raised(e)}), "
                             f"on a batch of {N} completions whose first prompt is {short(prompts[0])}") from None
        try:
            out = list(out)
        except TypeError:
            out = None
        if out is None or len(out) != N:
            got = f"{len(out)} values" if out is not None else type(out).__name__
            raise ValueError(f"reward function {name!r} returned {got} for {N} completions; it must return a list "
                             f"of one float (or None to skip) per completion")
        for i, v in enumerate(out):
            if v is None:
                continue
            if not isinstance(v, numbers.Real) and not (isinstance(v, torch.Tensor) and v.numel() == 1):
                raise ValueError(f"reward function {name!r} returned {short(v)} ({type(v).__name__}) for completion "
                                 f"{i} (prompt {short(prompts[i])}, completion {short(completions[i])}): a reward is "
                                 f"a number, or None to skip")
            if not math.isfinite(float(v)):
                raise ValueError(f"reward function {name!r} returned {float(v)} for completion {i} (prompt "
                                 f"{short(prompts[i])}, completion {short(completions[i])}): a reward must be "
                                 f"finite (None skips the function for that completion)")
            values[i, j] = float(v)
    weighted = values * torch.tensor(weights, dtype=torch.float64)
    reward = weighted.nansum(1).masked_fill(values.isnan().all(1), float("nan"))
    return values, reward


def short(x, n: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n - 3] + "..."



# -- prompts ---------------------------------------------------------------------------------------------------
@dataclass
class Prompts:
    records: list  # as read
    ids: list  # tokenized with the generation prompt


def load_prompts(args, tokenizer, template, split: str = "train") -> Prompts:
    """The prompt sources of --{split}_data_paths (jsonl:, local:, hub names; --{split}_data_splits and
    --{split}_num_samples as for the other trainers), each record checked (an error names the file and line or
    the dataset's row); a prompt that leaves no room for --max_completion_length within --max_seq_len is dropped
    and counted."""
    from data import parse_sources, read_records
    from generate import prompt_ids

    records, ids = [], []
    for src in parse_sources(getattr(args, f"{split}_data_paths"), getattr(args, f"{split}_data_splits") or None,
                             getattr(args, f"{split}_num_samples") or None):
        for where, record in read_records(src, "prompt", args.seed):
            ids.append(prompt_ids(record, where, None, tokenizer, template))
            records.append(record)
    room = args.max_seq_len - args.max_completion_length
    kept = [k for k, p in enumerate(ids) if len(p) <= room]
    if len(kept) < len(ids):
        parallel.print0(f"{split} prompts: dropped {len(ids) - len(kept)} of {len(ids)} longer than --max_seq_len "
                        f"{args.max_seq_len} - --max_completion_length {args.max_completion_length} = {room} tokens")
    if not kept:
        raise ValueError(f"--{split}_data_paths: no prompt leaves room for --max_completion_length "
                         f"{args.max_completion_length} within --max_seq_len {args.max_seq_len}; raise --max_seq_len")
    return Prompts([records[k] for k in kept], [ids[k] for k in kept])


def reward_inputs(record) -> tuple:
    """(the prompt as the record gave it, whether it is a conversation, the other fields by name)."""
    key = next(k for k in ("prompt", "messages", "conversations") if k in record)
    columns = {k: v for k, v in record.items() if k not in ("prompt", "messages", "conversations")}
    return record[key], not isinstance(record[key], str), columns


class PromptLoader:
    """Micro-batches of prompt indices: each epoch a permutation from (seed, epoch), cut into global
    micro-batches of micro x processes prompts (a last incomplete one is dropped), each rank its slice. The
    position is a state_dict."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0
        if n < batch_size * world:
            raise ValueError(f"{n} prompts are fewer than --micro_batch_size_per_gpu {batch_size} x {world} "
                             f"processes")

    def num_steps(self, epoch: int = 0) -> int:
        return self.n // (self.batch_size * self.world)

    def epoch_done(self) -> bool:
        return self.position >= self.num_steps(self.epoch)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        while not self.epoch_done():
            start = (self.position * self.world + self.rank) * self.batch_size
            self.position += 1
            yield order[start:start + self.batch_size].tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]


# -- rollouts --------------------------------------------------------------------------------------------------
@contextmanager
def whole_weights(run: tc.Run):
    """The bare Transformer in eval mode with its whole weights, for generation: under FSDP2 every shard group is
    gathered once and kept through the decoding steps, so each rank decodes on its own, for as many steps as its
    own rows need (parallel.gathered); DDP and a single process hold whole weights already."""
    was_training = run.model.training
    run.model.eval()
    try:
        if run.args.dp == "fsdp" and dist.is_initialized():  # FSDP2 sets itself up in the root's first forward
            run.model(torch.zeros(1, 1, dtype=torch.long, device=run.d.device))
        with parallel.gathered(run.bare_model) as model:
            yield model
    finally:
        run.model.train(was_training)


def rollout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The sampling seed of one micro-batch's rollouts: a function of (seed, step, rank, micro-batch), so a run
    samples the same completions wherever it restarts, with no generator state to keep."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


def make_rollouts(run: tc.Run, prompts: Prompts, micro_batches: list, funcs: list, weights: list,
                  tokenizer, stops: set, reference) -> dict:
    """Sample, score and lay out one rollout batch (this rank's micro-batches of prompt indices): -> the
    micro-batches' packed forwards with their advantages (and reference log-probs), the rollouts.jsonl lines,
    and the rollout metrics (global)."""
    from generate import generate_batch

    args, d = run.args, run.d
    G, t0 = args.num_generations, time.perf_counter()
    prompt_ids, completion_ids = [], []
    with torch.no_grad(), whole_weights(run) as model, parallel.autocast(d, args.dp, run.param_dtype):
        for i, indices in enumerate(micro_batches):
            p = [prompts.ids[k] for k in indices]
            generator = torch.Generator(d.device).manual_seed(rollout_seed(args.seed, run.step, d.rank, i))
            completion_ids += generate_batch(model, p, args.max_completion_length, args.temperature, args.top_p,
                                             args.top_k, stops, generator, run.pad_id, G)
            prompt_ids += p
    rollout_time = time.perf_counter() - t0
    records = [prompts.records[k] for indices in micro_batches for k in indices for _ in range(G)]
    inputs, texts, stopped, values, rewards = score(funcs, weights, records, completion_ids, tokenizer, stops)

    # Batch statistics over every rank's rollouts: counts, sums and squares (float64), then min and max.
    scored = ~rewards.isnan()
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
    sums = torch.cat([torch.stack([scored.sum(), rewards[scored].sum(), (rewards[scored] ** 2).sum(),
                                   torch.tensor(len(rewards)), lengths.sum(), torch.tensor(sum(stopped)),
                                   torch.tensor(rollout_time)]).double(),
                      (~values.isnan()).sum(0).double(), values.nansum(0)])
    sums = parallel.all_reduce_sum(sums.to(d.device)).cpu()
    n_scored, r_sum, r_sq, n, total_length, n_stopped, _ = sums[:7].tolist()
    F_ = len(funcs)
    batch_var = (r_sq - r_sum ** 2 / max(n_scored, 1)) / (n_scored - 1) if n_scored > 1 else math.nan
    batch_std = torch.tensor(math.sqrt(max(batch_var, 0.0)) if n_scored > 1 else math.nan, dtype=torch.float64)
    advantages, std_zero = group_advantages(rewards, G, args.scale_rewards, batch_std)
    zero = parallel.all_reduce_sum(std_zero.double().sum()[None].to(d.device)).item()
    metrics = {"reward": r_sum / max(n_scored, 1), "reward_std": float(batch_std), "frac_reward_zero_std": zero / n,
               **{f"rewards/{name}/mean": sums[7 + F_ + j].item() / max(sums[7 + j].item(), 1)
                  for j, (name, _) in enumerate(funcs)},
               "completions/mean_length": total_length / n, "completions/clipped_ratio": 1 - n_stopped / n,
               "rollout_tokens_per_s": total_length / max(rollout_time, 1e-9)}

    batches, P = [], args.micro_batch_size_per_gpu
    for i in range(len(micro_batches)):
        rows = slice(i * P * G, (i + 1) * P * G)
        batch = group_batch(prompt_ids[i * P:(i + 1) * P], completion_ids[rows], G, run.pad_id)
        batch["advantages"] = advantages[rows].float()
        if reference is not None:
            batch["ref_logps"] = reference(batch)
        batches.append(batch)
    lines = [{"prompt": p, "prompt_ids": prompt_ids[k // G], "completion_ids": c, "completion": t,
              "rewards": {name: None if math.isnan(v) else v for (name, _), v in zip(funcs, vs)},
              "reward": None if math.isnan(r) else r, "advantage": a}
             for k, ((p, _, _), c, t, vs, r, a) in enumerate(zip(inputs, completion_ids, texts, values.tolist(),
                                                                 rewards.tolist(), advantages.tolist()))]
    return {"batches": batches, "lines": lines, "metrics": metrics,
            "tokens": int(total_length), "completions": int(n)}


def score(funcs: list, weights: list, records: list, completion_ids: list, tokenizer, stops: set) -> tuple:
    """The reward functions on completions of `records` (one record per completion) -> (reward_inputs of each
    record, the completions' texts (a stop token is not text), whether a stop token ended each, the values
    per function [N, F] and the rewards [N], as compute_rewards)."""
    inputs = [reward_inputs(r) for r in records]
    stopped = [bool(c) and c[-1] in stops for c in completion_ids]
    texts = [tokenizer.decode(c[:-1] if s else c) for c, s in zip(completion_ids, stopped)]
    completions = [[{"role": "assistant", "content": t}] if chat else t for t, (_, chat, _) in zip(texts, inputs)]
    columns = {k: [c.get(k) for _, _, c in inputs] for k in dict.fromkeys(k for _, _, c in inputs for k in c)}
    if not records:  # a rank without validation prompts: nothing to call the functions on
        return inputs, texts, stopped, torch.zeros(0, len(funcs), dtype=torch.float64), torch.zeros(0)
    values, rewards = compute_rewards(funcs, weights, [p for p, _, _ in inputs], completions, completion_ids, columns)
    return inputs, texts, stopped, values, rewards


def validate(run: tc.Run, val: Prompts, funcs: list, weights: list, tokenizer, stops: set) -> dict:
    """--val_data_paths: the mean reward of greedy completions (one per prompt, each rank its share of the
    prompts, in batches of the rollouts' size), per function too, and their mean length."""
    from generate import generate_batch

    args, d = run.args, run.d
    mine = list(range(d.rank, len(val.ids), d.world_size))
    size, completion_ids = args.micro_batch_size_per_gpu * args.num_generations, []
    with torch.no_grad(), whole_weights(run) as model, parallel.autocast(d, args.dp, run.param_dtype):
        for k in range(0, len(mine), size):
            completion_ids += generate_batch(model, [val.ids[i] for i in mine[k:k + size]], args.max_completion_length,
                                             0.0, stop_ids=stops, pad_id=run.pad_id)
    _, _, _, values, rewards = score(funcs, weights, [val.records[i] for i in mine], completion_ids, tokenizer, stops)
    scored = ~rewards.isnan()
    sums = torch.cat([torch.tensor([scored.sum().item(), rewards[scored].sum().item(),
                                    sum(len(c) for c in completion_ids), len(mine)], dtype=torch.float64),
                      (~values.isnan()).sum(0).double(), values.nansum(0)])
    sums = parallel.all_reduce_sum(sums.to(d.device)).cpu().tolist()
    F_ = len(funcs)
    return {"val/reward": sums[1] / max(sums[0], 1), "val/completions/mean_length": sums[2] / max(sums[3], 1),
            **{f"val/rewards/{name}/mean": sums[4 + F_ + j] / max(sums[4 + j], 1) for j, (name, _) in enumerate(funcs)}}


def write_rollouts(run: tc.Run, lines: list, step: int):
    """rollouts.jsonl in the output dir: every rank's lines, written by rank 0."""
    if dist.is_initialized():
        gathered = [None] * run.d.world_size
        dist.all_gather_object(gathered, lines)
        lines = [line for part in gathered for line in part]
    if run.d.main:
        with open(Path(run.args.output_dir) / "rollouts.jsonl", "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps({"step": step, **line}, ensure_ascii=False) + "\n")


def restart_rollouts(run: tc.Run):
    """rollouts.jsonl at the start: empty; on --resume, its lines up to the resumed step (a rollout batch sampled
    after the checkpoint is sampled again; a line cut short by a kill ends what is kept)."""
    if not run.d.main:
        return
    path, kept = Path(run.args.output_dir) / "rollouts.jsonl", []
    if run.args.resume and path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] > run.step:
                        break
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
                kept.append(line)
    tc.atomic_write(path, lambda f: f.write("".join(kept).encode("utf-8")))


def build_reference(run: tc.Run):
    """beta > 0: batch -> the reference's log-probs of its completion tokens [N]: the initial weights. With
    --lora, the policy with its adapters off (no second copy); else (or when --lora_unfrozen_params train base
    weights) a frozen copy in the compute dtype (nothing updates it), eval mode, FSDP2-sharded like the policy
    (as train_dpo's --reference model)."""
    import lora

    args, d = run.args, run.d
    if args.lora and not run.lora_config["unfrozen"]:
        ref_model = run.model
    else:
        ref_model, tensor = lora.meta_model(args.ckpt_paths)
        ref_model = ref_model.to(dtype=run.param_dtype).requires_grad_(False).eval()
        ref_model = parallel.parallelize(ref_model, d, args.dp, run.param_dtype, False, args.compile, tensor)

    @torch.no_grad()
    def reference(batch):
        with lora.adapters_off(run.bare_model, ref_model is run.model), parallel.autocast(d, args.dp,
                                                                                           run.param_dtype):
            logps, _ = completion_logprobs(ref_model, batch, d.device)
        parallel.reshard(ref_model)
        return logps
    return reference


# -- the run ---------------------------------------------------------------------------------------------------
def setup(args: GRPOArgs, d: parallel.Dist) -> tuple:
    """tc.setup's steps for prompt data: the output dir, seeds, tokenizer and template, the prompts (and
    validation prompts) and their loader, the policy (LoRA, parallelized), AdamW, the step count (rollout
    batches x --num_iterations)."""
    import random

    from tokenize_chat import load_template, load_tokenizer, stop_token_ids

    if args.pack_samples:
        raise ValueError("--pack_samples: train_grpo.py always packs a prompt with its completions; drop the flag")
    if not args.reward_funcs:
        raise ValueError("--reward_funcs is required: path/to/file.py:name of each reward function")
    if args.reward_weights and len(args.reward_weights) != len(args.reward_funcs):
        raise ValueError(f"--reward_weights: {len(args.reward_weights)} weights for {len(args.reward_funcs)} "
                         f"--reward_funcs; give one per function")
    for name, ok, rule in (("num_generations", args.num_generations >= 2, "at least 2 (a group needs two "
                            "completions to compare)"), ("max_completion_length", args.max_completion_length > 0,
                            "positive"), ("num_iterations", args.num_iterations > 0, "positive"),
                           ("temperature", args.temperature > 0, "positive (rollouts sample)"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]"), ("top_k", args.top_k >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"--{name} {getattr(args, name)}: must be {rule}")
    funcs = load_reward_funcs(args.reward_funcs)  # before the output dir: a bad function writes nothing
    weights = [float(w) for w in args.reward_weights] or [1.0] * len(funcs)
    tc.check_inputs(args)  # the weights, the template (found beside them by default), the data paths
    tc.prepare_output_dir(args, d)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    base = tc.base_fingerprints(args, d)
    tokenizer = load_tokenizer(tc.native_dir(args.ckpt_paths[0]))
    template = load_template(args.template_config, tokenizer)
    prompts = load_prompts(args, tokenizer, template)
    val = load_prompts(args, tokenizer, template, "val") if args.val_data_paths else None
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = PromptLoader(len(prompts.ids), args.micro_batch_size_per_gpu, args.seed, d.rank, d.world_size)
    steps = tc.total_steps(args, loader) * (1 if args.train_steps else args.num_iterations)
    tc.check_finished(args, steps)
    model, bare_model, lora_config, input_dtype = tc.load_model(args, d)
    optimizer = tc.build_optimizer(model, args.lr, args.wd, tuple(args.betas), args.eps)
    run = tc.Run(args, d, template, None, None, pad_id, loader, val, model, bare_model, lora_config, input_dtype,
                 parallel.resolve_dtype(args.param_dtype, d.device), optimizer, steps)
    run.base = base
    parallel.print0(f"rollout batch: {args.micro_batch_size_per_gpu} prompts x {args.gradient_accum_steps} "
                    f"accumulation x {d.world_size} processes, {args.num_generations} completions each; "
                    f"{args.num_iterations} optimizer step(s) per rollout batch; {loader.num_steps()} micro-batches "
                    f"per epoch of {len(prompts.ids)} prompts; {steps} steps")
    return run, prompts, funcs, weights, tokenizer, set(stop_token_ids(tokenizer, template))


def begin_step(run: tc.Run):
    """tc.next_step's clock and learning rate, for a later --num_iterations step on the same rollouts."""
    run.t0 = time.perf_counter()
    run.lr = tc.lr_at(run.step, run.args.lr, run.args.lr_scheduler, run.args.warmup_steps, run.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr


def train(args: GRPOArgs, d: parallel.Dist):
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    run, prompts, funcs, weights, tokenizer, stops = setup(args, d)
    reference = build_reference(run) if args.beta != 0 else None
    # A checkpoint between the --num_iterations steps of one rollout batch holds the batch: resume trains on it.
    resumed = tc.start(run).get("rollouts")
    restart_rollouts(run)
    while run.step < run.steps:
        if resumed:
            rollouts, first, resumed = resumed, resumed["iteration"], None
            begin_step(run)
        else:
            rollouts, first = make_rollouts(run, prompts, tc.next_step(run), funcs, weights, tokenizer, stops,
                                            reference), 0
            write_rollouts(run, rollouts.pop("lines"), run.step + 1)
        batches = rollouts["batches"]
        # The step's global denominator first, so every micro-batch's gradient is already correctly scaled.
        denominator = loss_denominator(args.loss_type, rollouts["tokens"], rollouts["completions"],
                                       args.max_completion_length)
        for iteration in range(first, args.num_iterations):
            if iteration > first:
                if run.step >= run.steps:
                    break
                begin_step(run)
            # loss, KL, low / high / region clipped tokens, tokens (sums); low_min, high_max over completions
            totals = torch.zeros(6, dtype=torch.float64, device=d.device)
            low_min, high_max = torch.ones((), device=d.device), torch.zeros((), device=d.device)
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                with parallel.grad_sync(run.model, last, args.fsdp_grad_sync), \
                        parallel.autocast(d, args.dp, run.param_dtype):
                    logps, completion = completion_logprobs(run.model, batch, d.device)
                    if iteration == 0:  # before this rollout batch's first update: the old log-probs
                        batch["old_logps"] = logps.detach()
                    advantages = batch["advantages"].to(d.device)
                    ref_logps = batch["ref_logps"].to(d.device) if "ref_logps" in batch else None
                    numerator, _, kl, rho = grpo_loss_sum(
                        logps, batch["old_logps"].to(d.device), ref_logps, advantages, completion, args.loss_type,
                        args.epsilon, args.epsilon_high, args.beta)
                    loss = numerator / denominator
                # FSDP and DDP average gradients over ranks; the loss is already a global mean, so undo that.
                (loss * d.world_size).backward()
                a = advantages[completion]
                low = ((rho < 1 - args.epsilon) & (a < 0)).double()
                high = ((rho > 1 + args.epsilon_high) & (a > 0)).double()
                totals += torch.stack([loss.detach().double(), kl.detach().double().sum() if kl is not None
                                       else totals.new_zeros(()), low.sum(), high.sum(), (low + high).sum(),
                                       totals.new_tensor(len(logps))])
                counts = torch.bincount(completion, minlength=len(advantages)).clamp(min=1).double()
                per_low = low.new_zeros(len(advantages)).index_add(0, completion, low) / counts
                per_high = high.new_zeros(len(advantages)).index_add(0, completion, high) / counts
                low_min = torch.minimum(low_min, per_low.min().float())
                high_max = torch.maximum(high_max, per_high.max().float())
            totals = parallel.all_reduce_sum(totals).tolist()
            if dist.is_initialized():
                dist.all_reduce(low_min, op=dist.ReduceOp.MIN)
                dist.all_reduce(high_max, op=dist.ReduceOp.MAX)
            tokens = max(totals[5], 1)
            metrics = {**tc.optimizer_step(run, totals[0], rollouts["tokens"]), **rollouts["metrics"],
                       **({"kl": totals[1] / tokens} if args.beta != 0 else {}),
                       "clip_ratio/low_mean": totals[2] / tokens, "clip_ratio/low_min": float(low_min),
                       "clip_ratio/high_mean": totals[3] / tokens, "clip_ratio/high_max": float(high_max),
                       "clip_ratio/region_mean": totals[4] / tokens}
            if tc.val_due(run):
                metrics.update(validate(run, run.val_loader, funcs, weights, tokenizer, stops))
            more = iteration + 1 < args.num_iterations and run.step < run.steps
            run.state = {"rollouts": {**rollouts, "iteration": iteration + 1,  # what a checkpoint now must keep
                                      "batches": [{k: v.cpu() for k, v in b.items()} for b in batches]}} if more else None
            if tc.end_step(run, metrics):
                return
    tc.save_final(run)


def main(argv=None):
    tc.main(train, GRPOArgs, argv)


if __name__ == "__main__":
    main()
