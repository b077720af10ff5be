"""Direct Preference Optimization (Rafailov et al., 2023) on {"chosen", "rejected"} conversation pairs.

    torchrun --nproc_per_node 1 train_dpo.py --ckpt_paths checkpoints/llama3.1_8b_instruct/consolidated.00.pth \\
        --template_config llama3_instruct.yaml --lr 5e-7 --lr_scheduler cosine --dpo_beta 0.01 \\
        --train_data_paths jsonl:examples.jsonl --train_epochs 1 --max_seq_len 1024 \\
        --micro_batch_size_per_gpu 1 --gradient_accum_steps 8 --output_dir outputs/dpo_example

s = the summed log-prob of a response's tokens (prompt and padding masked), w = chosen, l = rejected,
h = (s_w - s_ref_w) - (s_l - s_ref_l), loss = -(1 - e) log sig(b h) - e log sig(-b h) (e: label smoothing).
--dpo_loss ipo: (h' - 1 / (2 b))^2 with h' built from length-averaged log-ratios, as TRL does.
The step loss is the mean over every pair of the global batch (all micro-batches, all ranks).
Metrics as TRL: rewards/chosen = b (s_w - s_ref_w), rewards/rejected likewise, rewards/accuracies = mean of
1[r_w > r_l], rewards/margins = mean of r_w - r_l, logps/chosen and logps/rejected = mean s.

The reference (--ref_ckpt_paths, default --ckpt_paths) comes from one of:
  --reference precompute (default): one no-grad pass over the data before training; s_ref of every response
      is cached beside the data cache, keyed by the data and the reference weights, and reused by later runs
      and by --resume. When the reference is the initial policy it is computed with the policy itself before
      the first step (adapters off with --lora), so no second copy is ever loaded.
  --reference model: s_ref computed at every step by a frozen copy (eval mode, no activation checkpointing,
      FSDP2-sharded like the policy). With --lora the reference is the policy with its adapters disabled:
      no second copy in memory (a copy after all when --lora_unfrozen_params or --ref_ckpt_paths change the
      base).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lora
import parallel
import train_common as tc


@dataclass
class DPOArgs(tc.PreferenceArgs):
    dpo_beta: float = tc.arg(0.1, help="b: how far the policy may move from the reference (TRL's default 0.1; "
                             "the torchllms example uses 0.01)")
    dpo_label_smoothing: float = tc.arg(0.0, help="e: assumed probability that a pair's labels are flipped "
                                        "(conservative DPO); 0 is plain DPO")
    dpo_loss: str = tc.arg("sigmoid", help="sigmoid: DPO; ipo: IPO on length-averaged log-ratios, as TRL",
                           choices=["sigmoid", "ipo"])
    reference: str = tc.arg("precompute", help="precompute: s_ref once before training, cached on disk; model: "
                            "a frozen copy at every step (with --lora: the adapters-off policy)",
                            choices=["precompute", "model"])
    ref_ckpt_paths: list = tc.arg([], help="reference weights, same forms as --ckpt_paths (default: --ckpt_paths)",
                                  metavar="PATH")


# -- the loss --------------------------------------------------------------------------------------------------
def dpo_loss(policy_logps, reference_logps, lengths, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid"):
    """Per-pair losses [P] and the logged quantities, from [2P] rows (the P chosen responses, then the P
    rejected ones): summed response log-probs under the policy (s) and the reference (s_ref), and the number
    of response tokens. Returns (losses, chosen rewards, rejected rewards, chosen s, rejected s)."""
    logratios = policy_logps - reference_logps
    chosen, rejected = logratios.chunk(2)
    if loss_type == "sigmoid":
        h = chosen - rejected
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":  # Azar et al. eq. 17 on per-token averages (TRL; confirmed with the IPO authors)
        chosen_len, rejected_len = lengths.chunk(2)
        h = chosen / chosen_len - rejected / rejected_len
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown --dpo_loss {loss_type!r} (sigmoid, ipo)")
    s_chosen, s_rejected = policy_logps.detach().chunk(2)
    return losses, beta * chosen.detach(), beta * rejected.detach(), s_chosen, s_rejected


# -- the reference ---------------------------------------------------------------------------------------------
def load_reference_model(args, d: parallel.Dist, param_dtype: torch.dtype):
    """A frozen copy in the compute dtype (nothing updates it, so no fp32 master), in eval mode, without
    activation checkpointing; FSDP2-sharded like the policy (DDP has nothing to synchronise: a plain copy)."""
    model, tensor = lora.meta_model(args.ref_ckpt_paths or args.ckpt_paths)
    model = model.to(dtype=param_dtype).requires_grad_(False).eval()
    return parallel.parallelize(model, d, args.dp, param_dtype, False, args.compile, tensor)


@torch.no_grad()
def precompute_reference(model, dataset, args, d: parallel.Dist, param_dtype, pad_id: int, fingerprint: str):
    """s_ref of every response of `dataset` [2N] (chosen at 2i, rejected at 2i + 1): read from the cache file
    beside the data cache, or computed in one pass (each rank a share of the batches) and written there."""
    path = Path(dataset.path).parent / f"{Path(dataset.path).name}.reference-{fingerprint}.npy"
    # Every rank must agree: if any rank cannot read the file, all take part in the pass (FSDP needs them).
    if not parallel.any_rank(not path.is_file(), d):
        parallel.print0(f"reference log-probs: {path} (cached)")
        return torch.from_numpy(np.load(path))
    parallel.print0(f"reference log-probs: one pass over {len(dataset)} pairs -> {path}")
    values = torch.zeros(2 * len(dataset), dtype=torch.float64, device=d.device)
    was_training = model.training
    model.eval()
    for batch in tc.make_loader(args, dataset, pad_id, d.device, shuffle=False):  # packed as training packs
        with parallel.autocast(d, args.dp, param_dtype):
            s, _ = tc.response_logps(model, batch, d.device)
        ids = batch["sample_ids"].to(d.device)
        values[torch.cat([2 * ids, 2 * ids + 1])] = s.double()
    model.train(was_training)
    parallel.reshard(model)
    values = parallel.all_reduce_sum(values).float().cpu()  # each pair was computed by one rank, zeros elsewhere
    if d.main:
        tc.atomic_write(path, lambda f: np.save(f, values.numpy()))
    parallel.wait_for_all()
    return values


def build_reference(run: tc.Run):
    """-> reference(batch, split) giving s_ref [2B] for a batch of the train or val set. Call before tc.start:
    precompute may use the policy, which then still holds the initial weights."""
    args, d, model, param_dtype = run.args, run.d, run.model, run.param_dtype
    same_base = not args.ref_ckpt_paths or list(map(str, args.ref_ckpt_paths)) == list(map(str, args.ckpt_paths))
    if args.reference == "precompute":
        fingerprint = lora.weights_fingerprint(args.ref_ckpt_paths or args.ckpt_paths, param_dtype)
        ref_model = model if same_base else load_reference_model(args, d, param_dtype)
        with lora.adapters_off(run.bare_model, args.lora and same_base):
            tables = {split: precompute_reference(ref_model, ds, args, d, param_dtype, run.pad_id, fingerprint)
                      for split, ds in (("train", run.train_set), ("val", run.val_set)) if ds is not None}
        del ref_model

        def reference(batch, split):
            ids = batch["sample_ids"]
            return tables[split][torch.cat([2 * ids, 2 * ids + 1])].float().to(d.device)
        return reference

    # The adapters-off policy is the reference only while nothing but adapters trains.
    adapters_are_the_delta = args.lora and same_base and not args.lora_unfrozen_params
    ref_model = model if adapters_are_the_delta else load_reference_model(args, d, param_dtype)
    parallel.print0("reference: " + ("the policy with LoRA adapters off" if ref_model is model else "a frozen copy"))

    @torch.no_grad()
    def reference(batch, split):
        with lora.adapters_off(run.bare_model, ref_model is model), parallel.autocast(d, args.dp, param_dtype):
            s = tc.response_logps(ref_model, batch, d.device)[0]
        parallel.reshard(ref_model)
        return s
    return reference


# -- the run ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(run: tc.Run, reference) -> dict:
    """Loss and metrics over the whole validation set, each a mean over its pairs."""
    args, d, model = run.args, run.d, run.model
    model.eval()
    totals = torch.zeros(2 + len(tc.PAIR_METRICS), device=d.device)  # pairs, loss, then the metrics' sums
    for batch in run.val_loader:
        ref = reference(batch, "val")
        with parallel.autocast(d, args.dp, run.param_dtype):
            s, n = tc.response_logps(model, batch, d.device)
        losses, *logged = dpo_loss(s, ref, n, args.dpo_beta, args.dpo_label_smoothing, args.dpo_loss)
        totals += torch.cat([torch.stack([s.new_tensor(len(losses)), losses.sum()]), tc.pair_metric_sums(*logged)])
    model.train()
    parallel.reshard(model)
    pairs, loss, *sums = parallel.all_reduce_sum(totals).tolist()
    return {"val/loss": loss / max(pairs, 1), **tc.pair_metrics(sums, pairs, "val/")}


def train(args: DPOArgs, d: parallel.Dist):
    run = tc.setup(args, d, kind="preference")
    reference = build_reference(run)
    tc.start(run)
    while run.step < run.steps:
        micro_batches = tc.next_step(run)
        # The global pair count first, so every micro-batch's gradient is already correctly scaled.
        pairs, _, tokens = tc.preference_counts(micro_batches, d)
        totals = torch.zeros(1 + len(tc.PAIR_METRICS), device=d.device)  # loss, then the metrics' sums
        for i, batch in enumerate(micro_batches):
            ref = reference(batch, "train")
            last = i == len(micro_batches) - 1
            with parallel.grad_sync(run.model, last, args.fsdp_grad_sync), \
                    parallel.autocast(d, args.dp, run.param_dtype):
                s, n = tc.response_logps(run.model, batch, d.device)
                losses, *logged = dpo_loss(s, ref, n, args.dpo_beta, args.dpo_label_smoothing, args.dpo_loss)
                loss = losses.sum() / max(pairs, 1)
            # FSDP and DDP average gradients over ranks; the loss is already a global mean, so undo that.
            (loss * d.world_size).backward()
            totals += torch.cat([loss.detach()[None], tc.pair_metric_sums(*logged)])
        loss_value, *sums = parallel.all_reduce_sum(totals).tolist()
        metrics = {**tc.optimizer_step(run, loss_value, tokens), **tc.pair_metrics(sums, pairs)}
        if tc.val_due(run):
            metrics.update(validate(run, reference))
        if tc.end_step(run, metrics):
            return
    tc.save_final(run)


def main(argv=None):
    tc.main(train, DPOArgs, argv)


if __name__ == "__main__":
    main()
