"""SimPO (Meng et al., 2024): preference optimization without a reference model, on {"chosen", "rejected"}
conversation pairs.

    torchrun --nproc_per_node 1 train_simpo.py --ckpt_paths checkpoints/llama3.1_8b_instruct/consolidated.00.pth \\
        --template_config llama3_instruct.yaml --lr 5e-7 --lr_scheduler cosine --simpo_beta 1.0 --simpo_gamma 1.0 \\
        --train_data_paths jsonl:examples.jsonl --train_epochs 1 --max_seq_len 1024 \\
        --micro_batch_size_per_gpu 1 --gradient_accum_steps 8 --output_dir outputs/simpo_example

a = s / n: a response's summed log-prob over its n tokens (prompt and padding masked), per sequence; w = chosen,
l = rejected. loss = -log sig(b (a_w - a_l) - g), the paper's form: g (--simpo_gamma) is the target reward
margin, in reward units, as TRL's CPOTrainer(loss_type="simpo") takes it; the official code writes the same
loss with gamma_beta_ratio = g / b. --sft_weight adds that weight times the token-mean NLL of the chosen
responses, as the official code does. The step loss is the mean over every pair of the global batch (all micro-batches,
all ranks); the NLL term's mean runs over every chosen response token of the global batch.
Metrics as TRL's CPOTrainer: rewards/chosen = b a_w, rewards/rejected = b a_l, rewards/accuracies = mean of
1[r_w > r_l], rewards/margins = mean of r_w - r_l, logps/chosen and logps/rejected = mean a.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import parallel
import train_common as tc


@dataclass
class SimPOArgs(tc.PreferenceArgs):
    simpo_beta: float = tc.arg(2.0, help="b: scale of the length-normalised reward b * a")
    simpo_gamma: float = tc.arg(1.0, help="g: the paper's target reward margin, subtracted from b (a_w - a_l), as "
                                "TRL's simpo_gamma; the official code takes gamma_beta_ratio = g / b instead")
    sft_weight: float = tc.arg(0.0, help="weight of the chosen responses' token-mean NLL added to the loss")


# -- the loss --------------------------------------------------------------------------------------------------
def simpo_loss(policy_logps, lengths, beta: float, gamma: float):
    """Per-pair losses [P] and the logged quantities, from [2P] rows (the P chosen responses, then the P
    rejected ones): summed response log-probs s and response token counts n. Each row is normalised by its
    own n, never the padded length, and the pairs stay paired: [P], not a [P, P] broadcast.
    Returns (losses, chosen rewards, rejected rewards, chosen a, rejected a)."""
    if (lengths <= 0).any():
        raise ValueError("SimPO needs every response to have at least one token (a = s / n)")
    a_chosen, a_rejected = (policy_logps / lengths).chunk(2)
    losses = -F.logsigmoid(beta * (a_chosen - a_rejected) - gamma)
    a_chosen, a_rejected = a_chosen.detach(), a_rejected.detach()
    return losses, beta * a_chosen, beta * a_rejected, a_chosen, a_rejected


# -- the run ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(run: tc.Run) -> dict:
    """Loss and metrics over the whole validation set, each a mean over its pairs."""
    args, d, model = run.args, run.d, run.model
    model.eval()
    totals = torch.zeros(4 + len(tc.PAIR_METRICS), device=d.device)  # pairs, loss, NLL, tokens, the metrics
    for batch in run.val_loader:
        with parallel.autocast(d, args.dp, run.param_dtype):
            s, n = tc.response_logps(model, batch, d.device)
        losses, *logged = simpo_loss(s, n, args.simpo_beta, args.simpo_gamma)
        nll, tokens = -s.chunk(2)[0].sum(), n.chunk(2)[0].sum()
        counts = torch.stack([s.new_tensor(len(losses)), losses.sum(), nll, tokens])
        totals += torch.cat([counts, tc.pair_metric_sums(*logged)])
    model.train()
    parallel.reshard(model)
    pairs, loss, nll, tokens, *sums = parallel.all_reduce_sum(totals).tolist()
    return {"val/loss": loss / max(pairs, 1) + args.sft_weight * nll / max(tokens, 1),
            **tc.pair_metrics(sums, pairs, "val/")}


def train(args: SimPOArgs, d: parallel.Dist):
    run = tc.setup(args, d, kind="preference")
    tc.start(run)
    while run.step < run.steps:
        micro_batches = tc.next_step(run)
        # The global pair count first, so every micro-batch's gradient is already correctly scaled.
        pairs, chosen_tokens, tokens = tc.preference_counts(micro_batches, d)
        totals = torch.zeros(1 + len(tc.PAIR_METRICS), device=d.device)  # loss, then the metrics' sums
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with parallel.grad_sync(run.model, last, args.fsdp_grad_sync), \
                    parallel.autocast(d, args.dp, run.param_dtype):
                s, n = tc.response_logps(run.model, batch, d.device)
                losses, *logged = simpo_loss(s, n, args.simpo_beta, args.simpo_gamma)
                loss = losses.sum() / max(pairs, 1)
                if args.sft_weight:  # the chosen responses' NLL, a mean over the global batch's chosen tokens
                    loss = loss + args.sft_weight * -s.chunk(2)[0].sum() / max(chosen_tokens, 1)
            # FSDP and DDP average gradients over ranks; the loss is already a global mean, so undo that.
            (loss * d.world_size).backward()
            totals += torch.cat([loss.detach()[None], tc.pair_metric_sums(*logged)])
        loss_value, *sums = parallel.all_reduce_sum(totals).tolist()
        metrics = {**tc.optimizer_step(run, loss_value, tokens), **tc.pair_metrics(sums, pairs)}
        if tc.val_due(run):
            metrics.update(validate(run))
        if tc.end_step(run, metrics):
            return
    tc.save_final(run)


def main(argv=None):
    tc.main(train, SimPOArgs, argv)


if __name__ == "__main__":
    main()
