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
"""

import math
import numbers
from pathlib import Path

import torch

import train_common as tc
from model import IGNORE_INDEX


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
