"""Supervised fine-tuning: cross-entropy on the trained (assistant) tokens of chat data.

    torchrun --nproc_per_node 1 train_sft.py --ckpt_paths checkpoints/llama3.1_8b_instruct/consolidated.00.pth \\
        --template_config llama3_instruct.yaml --lr 1e-6 --lr_scheduler cosine --warmup_steps 5 --wd 0 \\
        --train_data_paths jsonl:examples.jsonl --train_epochs 1 --max_seq_len 1024 \\
        --micro_batch_size_per_gpu 2 --gradient_accum_steps 2 --output_dir outputs/sft_example

--loss_reduction tokens: the sum of every trained token's loss in the global batch (all micro-batches, all
ranks) divided by their number, so accumulation and world size do not change the result.
--loss_reduction sequences: the mean over the global batch's sequences of each sequence's token mean.
"""

from dataclasses import dataclass

import torch

import parallel
import train_common as tc
from model import IGNORE_INDEX


@dataclass
class SFTArgs(tc.CommonArgs):
    pass  # --loss_reduction is a common flag (torchllms lists it for every trainer); SFT is where it acts


# -- the loss --------------------------------------------------------------------------------------------------
def sequence_token_means(nll: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean token loss; a packed row holds several sequences, told apart by document_ids."""
    trained = labels != IGNORE_INDEX
    R, T = labels.shape
    seq = (torch.arange(R, device=labels.device)[:, None] * T + document_ids.clamp(min=0))[trained]
    sums = torch.zeros(R * T, device=nll.device, dtype=nll.dtype).index_add(0, seq, nll[trained])
    counts = torch.zeros(R * T, device=nll.device, dtype=nll.dtype).index_add(0, seq, torch.ones_like(nll[trained]))
    has = counts > 0
    return sums[has] / counts[has]


def sft_loss_sum(logprobs, labels, document_ids, reduction: str) -> torch.Tensor:
    """The micro-batch's share of the numerator; divided by the global count from `loss_units`."""
    if reduction == "tokens":
        return -logprobs[labels != IGNORE_INDEX].sum()
    return sequence_token_means(-logprobs, labels, document_ids).sum()


def loss_units(batch, reduction: str) -> int:
    """The denominator's share: trained tokens, or sequences with at least one trained token."""
    trained = batch["labels"] != IGNORE_INDEX
    if reduction == "tokens":
        return int(trained.sum())
    R, T = trained.shape
    seq = (torch.arange(R)[:, None] * T + batch["document_ids"].clamp(min=0))[trained]
    return int(seq.unique().numel())


@torch.no_grad()
def validate(run: tc.Run) -> float:
    """Token-mean loss over the whole validation set."""
    model, d = run.model, run.d
    model.eval()
    total = torch.zeros(2, device=d.device)
    for batch in run.val_loader:
        with parallel.autocast(d, run.args.dp, run.param_dtype):
            lp = tc.forward_logprobs(model, batch, d.device)
        labels = batch["labels"].to(d.device)
        total += torch.stack([-lp[labels != IGNORE_INDEX].sum(), (labels != IGNORE_INDEX).sum()])
    model.train()
    parallel.reshard(model)
    parallel.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


# -- the run ---------------------------------------------------------------------------------------------------
def train(args: SFTArgs, d: parallel.Dist):
    run = tc.setup(args, d, kind="sft")
    tc.start(run)
    while run.step < run.steps:
        micro_batches = tc.next_step(run)
        # The global denominator first, so every micro-batch's gradient is already correctly scaled.
        counts = torch.tensor([sum(loss_units(b, args.loss_reduction) for b in micro_batches),
                               sum(int(b["tokens"]) for b in micro_batches)], dtype=torch.float64, device=d.device)
        units, tokens = parallel.all_reduce_sum(counts).tolist()
        loss_total = torch.zeros((), device=d.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with parallel.grad_sync(run.model, last, args.fsdp_grad_sync), \
                    parallel.autocast(d, args.dp, run.param_dtype):
                lp = tc.forward_logprobs(run.model, batch, d.device)
                loss = sft_loss_sum(lp, batch["labels"].to(d.device), batch["document_ids"].to(d.device),
                                    args.loss_reduction) / max(units, 1)
            # FSDP and DDP average gradients over ranks; the loss is already a global mean, so undo that.
            (loss * d.world_size).backward()
            loss_total += loss.detach()
        metrics = tc.optimizer_step(run, float(parallel.all_reduce_sum(loss_total)), tokens)
        if tc.val_due(run):
            metrics["val/loss"] = validate(run)
        if tc.end_step(run, metrics):
            return
    tc.save_final(run)


def main(argv=None):
    tc.main(train, SFTArgs, argv)


if __name__ == "__main__":
    main()
