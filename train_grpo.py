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

import torch


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
