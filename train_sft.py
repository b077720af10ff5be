"""Supervised fine-tuning: cross-entropy on the trained (assistant) tokens of chat data.

    torchrun --nproc_per_node 1 train_sft.py --ckpt_paths checkpoints/llama3.1_8b_instruct/consolidated.00.pth \\
        --template_config llama3_instruct.yaml --lr 1e-6 --lr_scheduler cosine --warmup_steps 5 --wd 0 \\
        --train_data_paths jsonl:examples.jsonl --train_epochs 1 --max_seq_len 1024 \\
        --micro_batch_size_per_gpu 2 --gradient_accum_steps 2 --output_dir outputs/sft_example

--loss_reduction tokens: the sum of every trained token's loss in the global batch (all micro-batches, all
ranks) divided by their number, so accumulation and world size do not change the result.
--loss_reduction sequences: the mean over the global batch's sequences of each sequence's token mean.
"""

import time
from dataclasses import dataclass

import torch

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
def validate(model, loader, d) -> float:
    """Token-mean loss over the whole validation set."""
    model.eval()
    total = torch.zeros(2, device=d.device)
    for batch in loader:
        lp = tc.forward_logprobs(model, batch, d.device)
        labels = batch["labels"].to(d.device)
        total += torch.stack([-lp[labels != IGNORE_INDEX].sum(), (labels != IGNORE_INDEX).sum()])
    model.train()
    tc.reshard(model)
    tc.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


# -- the run ---------------------------------------------------------------------------------------------------
def train(args: SFTArgs, d: tc.Dist):
    tc.prepare_output_dir(args, d)
    tc.seed_everything(args.seed)
    tokenizer, template = tc.load_tokenizer_and_template(args)
    train_set, val_set = tc.load_datasets(args, tokenizer, template, kind="sft")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = tc.make_loader(args, train_set, pad_id)
    val_loader = val_set and tc.make_loader(args, val_set, pad_id, shuffle=False)
    model, base_model, lora_config, input_dtype = tc.load_model(args, d)
    optimizer = tc.build_optimizer(model, args.lr, args.wd, tuple(args.betas), args.eps)
    steps = tc.total_steps(args, loader)
    tc.print_effective_batch(args, d, steps, "packed rows" if args.pack_samples else "sequences")

    step = tc.resume(args, model, optimizer, loader, d)
    log = tc.metrics_log(args, d, steps, step)
    stop = tc.StopSignal()
    param_dtype = tc.resolve_dtype(args.param_dtype, d.device)
    batches = tc.endless(loader)
    model.train()

    def checkpoint():
        extra = {"step": step, "loader": loader.state_dict(), "rng": tc.rng_state()}
        return tc.save_checkpoint(args.output_dir, step, model, optimizer, extra, d, args.max_checkpoints)

    while step < steps:
        t0 = time.perf_counter()
        lr = tc.lr_at(step, args.lr, args.lr_scheduler, args.warmup_steps, steps)
        tc.set_lr(optimizer, lr)
        micro_batches = tc.step_batches(batches, loader, args.gradient_accum_steps)
        # The global denominator first, so every micro-batch's gradient is already correctly scaled.
        counts = torch.tensor([sum(loss_units(b, args.loss_reduction) for b in micro_batches),
                               sum(int(b["tokens"]) for b in micro_batches)],
                              dtype=torch.float64, device=d.device)
        units, tokens = tc.all_reduce_sum(counts).tolist()
        loss_total = torch.zeros((), device=d.device)
        for i, batch in enumerate(micro_batches):
            with tc.no_grad_sync(model, i == len(micro_batches) - 1), tc.autocast(d, args.dp, param_dtype):
                lp = tc.forward_logprobs(model, batch, d.device)
                loss = sft_loss_sum(lp, batch["labels"].to(d.device), batch["document_ids"].to(d.device),
                                    args.loss_reduction) / max(units, 1)
            # FSDP and DDP average gradients over ranks; the loss is already a global mean, so undo that.
            (loss * d.world_size).backward()
            loss_total += loss.detach()
        loss_value = float(tc.all_reduce_sum(loss_total))
        tc.check_finite(loss_value, step + 1, args.output_dir)
        grad_norm = tc.clip_grad_norm(model, args.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                   "tokens_per_s": tokens / seconds, "epoch": loader.epoch}
        if val_loader is not None and (step == steps or args.val_freq and step % args.val_freq == 0):
            metrics["val/loss"] = validate(model, val_loader, d)
        log.log(step, metrics)
        if args.save_freq and step % args.save_freq == 0 and step < steps:
            checkpoint()
        if stop.should_stop(d.device):
            tc.print0(f"SIGTERM: saved {checkpoint()}; resume with --resume")
            return

    tc.save_final(args, model, base_model, d, template, lora_config, input_dtype)


def main(argv=None):
    tc.run(train, SFTArgs, argv)


if __name__ == "__main__":
    main()
