"""How much memory a training run takes per GPU, predicted from the model's shapes (params.json) and the trainer's
flags, before renting the GPUs:

    python train_dpo.py <the run's flags> --plan --plan_gpus 8x80GB --plan_nnodes 2
    python memory_plan.py --table          # docs/memory.md's table: Llama-3.1-8B/70B, Qwen3-32B on 8 and 16 GPUs

The model of a step, per rank (world = GPUs per node x nodes):
- weights: fp32 masters, sharded over the world under FSDP2 (`--dp fsdp`), whole under DDP; with --lora the frozen
  base in the compute dtype (bf16 on GPUs) and the adapters fp32. A DPO `--reference model` copy in the compute dtype.
- gradients fp32 and AdamW's exp_avg and exp_avg_sq fp32, of what trains, sharded like the weights. DDP keeps its
  gradient buckets beside .grad (a second fp32 copy); `--fsdp_grad_sync last` keeps unsharded fp32 gradients
  between micro-batches.
- saved activations: what each block keeps for backward, per token, read off model.py (and checked against
  torch.autograd.graph.saved_tensors_hooks in tests/test_memory_plan.py); with --activation_checkpointing each
  block's input, plus one block's full set while it is recomputed.
- the logits: token_logprobs' fp32 chunks of LOGITS_CHUNK_ELEMENTS (the last one kept for backward) and the
  gradient of the output projection, which backward builds a chunk at a time.
- transients: FSDP2's all-gathered compute-dtype parameters (the block running and the one prefetched, the root's
  embeddings and output for the whole forward and backward), a block's unsharded gradients before their
  reduce-scatter, backward's own workspace (the gradients of one block's activations), AdamW's temporaries.
The peak is the persistent part (weights, optimizer state, a reference copy) plus the largest of three moments:
the start of backward (every activation and the logits alive), the top block's backward (every activation and that
block's workspace) and the end of backward (every gradient alive). Gradients kept across micro-batches count in each.
GRPO (train_grpo.py) trains on rows of a prompt and its G completions, and adds a fourth moment, its rollouts
between steps: the whole weights gathered in the compute dtype under FSDP2, the KV cache of micro-batch x G rows,
the prefill's transients and the sampled logits.

Not counted: the CUDA context and NCCL buffers (0.5-1 GB per GPU), the caching allocator's fragmentation, and
compiled graphs' workspaces; keep a margin (docs/memory.md: 10% and 1 GiB). On CPU the process itself is counted
(CPU_PROCESS_BYTES) and freed memory that glibc keeps is not.
"""

import argparse
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from model import LOGITS_CHUNK_ELEMENTS, ModelArgs

GiB = 1 << 30
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # lora.DEFAULT_TARGETS (this file imports model.py only)
# A CPU trainer process before its model: the interpreter, torch, tokenizers, and torch._dynamo, which AdamW's
# first step imports (measured: 0.29 GiB; tests/test_memory_plan.py::test_process_baseline_is_the_constant).
CPU_PROCESS_BYTES = int(0.30 * GiB)
# Per token, besides the blocks: the batch's int64 tensors on the device (ids, labels, positions), the [B, T]
# fp32 log-probs and, per trained position, its target, mask, log-normaliser and index (token_logprobs).
TOKEN_OVERHEAD_BYTES = 64


@dataclass
class Plan:
    """Bytes per rank. weights ... workspace are the parts; peak is what they add up to at the step's worst
    moment (gradients and activations are not all alive at once, see memory_plan's docstring)."""
    weights: int  # policy: fp32 masters (full) or compute-dtype base + fp32 adapters (LoRA), this rank's share
    gradients: int  # fp32, of what trains, this rank's share (+ DDP buckets, + unsharded accumulation)
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32
    activations: int  # what backward needs, all blocks of one micro-batch
    logits: int  # token_logprobs' chunks and the output projection's gradient being built
    gathered: int  # FSDP2: compute-dtype parameters all-gathered at once (root + 2 blocks); autocast copies
    workspace: int  # backward's gradients of one block's activations; unsharded block gradients; AdamW temporaries
    reference: int  # DPO --reference model: the frozen copy's weights
    process: int  # CPU: the process before its model (CPU_PROCESS_BYTES); 0 on a GPU
    peak: int
    at: str  # the moment of the peak: "backward start", "top block backward" or "backward end"
    gpu_bytes: int  # one GPU's memory (0: no limit given)
    tokens: int  # per micro-batch
    world: int
    mode: str  # [fsdp-|ddp-]bf16|fp32: FSDP2 casts its parameters; DDP and one process reach bf16 by autocast
    what: dict = field(default_factory=dict)  # part -> how it was counted, for format_plan
    notes: list = field(default_factory=list)
    rollouts: int = 0  # GRPO: what its rollouts hold beside the persistent parts (a moment of its own, not a part)

    @property
    def fits(self) -> bool:
        return not self.gpu_bytes or self.peak <= self.gpu_bytes

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"fits": self.fits}


# -- parameters, from the model itself on the meta device ------------------------------------------------------
def parameter_counts(args: ModelArgs, lora: bool = False, lora_rank: int = 16, lora_targets=LORA_TARGETS,
                     lora_unfrozen_params=()) -> dict:
    key = (json.dumps(args.to_json(), sort_keys=True), lora, lora_rank, tuple(sorted(set(lora_targets))),
           tuple(lora_unfrozen_params))
    if key not in _COUNTS:  # a 70B model on the meta device takes a moment: largest_micro_batch asks often
        _COUNTS[key] = _parameter_counts(args, lora, lora_rank, lora_targets, lora_unfrozen_params)
    return dict(_COUNTS[key])


_COUNTS = {}


def _parameter_counts(args: ModelArgs, lora: bool, lora_rank: int, lora_targets, lora_unfrozen_params) -> dict:
    """Parameter counts of the Transformer built on the meta device (no memory, no init): total, trainable
    (all, or LoRA's adapters plus --lora_unfrozen_params), frozen, one block's and the root's (embeddings, final
    norm, output), the largest trainable tensor; LoRA's A [r, in] and B [out, r] on every targeted nn.Linear as lora.py
    wraps them (by attribute name)."""
    import torch
    import torch.nn as nn

    from model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    named = dict(model.named_parameters())  # a tied output weight appears once
    total = sum(p.numel() for p in named.values())
    block = sum(p.numel() for p in model.layers[0].parameters())
    counts = {"total": total, "block": block, "root": total - block * args.n_layers,
              "largest": max(p.numel() for p in named.values()), "adapters": 0}
    if not lora:
        counts.update(trainable=total, frozen=0, trainable_block=block)
        return counts
    counts["largest"] = 0  # of what trains: the adapters' A or B, and any unfrozen parameter
    targets = set(lora_targets)
    regexes = [re.compile(p) for p in lora_unfrozen_params]
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in targets:
            counts["adapters"] += lora_rank * (module.in_features + module.out_features)
            counts["largest"] = max(counts["largest"], lora_rank * max(module.in_features, module.out_features))
    unfrozen_params = [p for n, p in named.items() if any(r.search(n) for r in regexes)]
    unfrozen = sum(p.numel() for p in unfrozen_params)
    counts["largest"] = max([counts["largest"]] + [p.numel() for p in unfrozen_params])
    unfrozen_block = sum(p.numel() for n, p in model.layers[0].named_parameters()
                         if any(r.search(f"layers.0.{n}") for r in regexes))
    counts.update(trainable=counts["adapters"] + unfrozen, frozen=total - unfrozen,
                  trainable_block=counts["adapters"] // max(args.n_layers, 1) + unfrozen_block)
    return counts


# -- activations ----------------------------------------------------------------------------------------------
def block_bytes_per_token(args: ModelArgs, compute_bytes: int, lora_targets=None, lora_rank: int = 16,
                          autocast: bool = False) -> int:
    """What one block keeps for backward, per token (model.py, read tensor by tensor; tests/test_memory_plan.py
    checks it against saved_tensors_hooks). lora_targets None: full fine-tuning (every projection keeps its
    input for its weight's gradient); else the LoRA'd projections only (a frozen one keeps nothing of its input).

    compute_bytes: 4 (fp32, CPU) or 2 (bf16). autocast: DDP and single-process GPU runs reach bf16 through
    torch.autocast, which casts a projection's input itself: each projection keeps its own bf16 copy, and a full
    fine-tune's residual stream (embeddings, norms) stays fp32. Under FSDP2 the parameters are cast instead and
    everything is bf16. Per block, in elements (c = compute dtype, r = the residual stream's):
      x, h            2 dim (r)       block input and the attention's output added to it: the RMSNorms keep
                                      their input and recompute the rest (model.RMSNorm)
      xn, hn          dim each (c)    the normalised inputs of wq/wk/wv and of w1/w3, when one of them trains
      q, k, v, out    (2 H + 2 Hkv) hd (c), and SDPA's log-sum-exp, H (fp32)
      attention out   H hd (c)        wo's input (the reshape is a copy), when wo trains
      gate, up        2 hidden (c)    _GatedDown recomputes act(gate) and the product in backward; a LoRA w2
                                      takes the plain path: + act, product (2 hidden)
      LoRA            rank (c)        each adapter's A x
      qk_norm         (H + Hkv) hd    Qwen3, Gemma 3, OLMo 2: q, k before their norms
      post_norm       2 dim           OLMo 2, Gemma 3: wo's and w2's outputs before their norms
    """
    dim, hd, H, Hkv, hidden = args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.hidden_dim
    c = compute_bytes
    full = lora_targets is None
    lora = set() if full else set(lora_targets)
    r = 4 if (autocast and full) else c  # a LoRA run's base, embeddings and norms included, is in the compute dtype

    def needs(name):  # keeps its input for backward
        return full or name in lora

    def inputs(names, width):  # the tensor a group of projections reads, kept once, or once each under autocast
        n = sum(needs(name) for name in names)
        return (n if autocast else min(n, 1)) * width * c

    total = 2 * args.dim * r if args.pre_norm else 0
    total += inputs(("wq", "wk", "wv"), dim) + inputs(("w1", "w3"), dim) + inputs(("wo",), H * hd)
    total += (2 * H + 2 * Hkv) * hd * c + 4 * H
    total += 2 * hidden * c + (2 * hidden * c if "w2" in lora else 0)
    total += lora_rank * c * len(lora & set(LORA_TARGETS))
    if args.qk_norm:
        total += (H + Hkv) * hd * c
    if args.post_norm:
        total += 2 * dim * c
    return total


# -- the plan -------------------------------------------------------------------------------------------------
def parse_gpus(spec: str) -> tuple[int, int, str]:
    """'8x80GB' -> (8, 80 GiB, 'cuda'); '80GB' -> one GPU; 'cpu' or '2xcpu' -> CPU processes (no memory limit).
    GB means GiB here, as GPU memory is counted (an "80 GB" H100 shows ~79.6 GiB to CUDA)."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?(?:(\d+(?:\.\d+)?)\s*(?:GB|GiB|G)?|(cpu))\s*", spec)
    if not m or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"--plan_gpus {spec!r}: expected GPUS x MEMORY, e.g. 8x80GB (80GB for one GPU; 2xcpu for "
                         f"CPU processes)")
    count = int(m.group(1) or 1)
    return (count, 0, "cpu") if m.group(3) else (count, int(float(m.group(2)) * GiB), "cuda")


def plan_memory(args: ModelArgs, *, micro_batch_size: int = 1, max_seq_len: int = 2048, preference: bool = False,
                gradient_accum_steps: int = 1, activation_checkpointing: bool = False, lora: bool = False,
                lora_rank: int = 16, lora_targets=LORA_TARGETS, lora_unfrozen_params=(), dp: str = "fsdp",
                param_dtype: str = "auto", reference: str = "precompute", separate_reference: bool = False,
                fsdp_grad_sync: str = "every", gpus: str = "8x80GB", nnodes: int = 1,
                trained_tokens: int | None = None, grpo: tuple | None = None) -> Plan:
    """Predicted peak memory per rank of an optimizer step, in bytes, by part (see Plan and the module doc).

    gpus: '8x80GB' per node (nnodes of them), or 'cpu' / '2xcpu' for the CPU runs the tests measure (peak RSS,
    the process included). dp: "fsdp" or "ddp" under torchrun; "none" is a plain `python train_*.py` (one
    process, bf16 through autocast on a GPU). preference: DPO/SimPO, whose micro-batch of P pairs is 2 P
    sequences (padded), or P rows of 2 x max_seq_len (packed): the same tokens either way, so packing changes
    nothing here but how full the rows are. reference "model" (DPO): a frozen copy, unless LoRA adapters are
    all that trains on the same base (the adapters-off policy is the reference); separate_reference forces
    the copy (--ref_ckpt_paths). fsdp_grad_sync "last": unsharded fp32 gradients between micro-batches.
    trained_tokens: positions with a target per micro-batch; default all of them, the worst case.
    grpo: (G, max_completion_length, beta) of a GRPO run, whose micro-batch of P prompts is P rows of the prompt
    (at most max_seq_len - max_completion_length) and its G completions, and whose rollouts are one more moment:
    the whole weights gathered (FSDP2), the KV cache of P x G rows, the prefill's transients and the sampled
    logits; beta > 0 adds the reference copy where DPO's --reference model would have one."""
    per_node, gpu_bytes, device = parse_gpus(gpus)
    world = per_node * nnodes
    if dp == "none" and world > 1:
        raise ValueError("dp 'none' is a single process: plan several GPUs with dp fsdp or ddp")
    # torchrun starts a process group even for one GPU, and FSDP2 then shards over one rank; on CPU the
    # trainers run as one process without it
    fsdp = dp == "fsdp" and (world > 1 or device == "cuda")
    ddp = dp == "ddp" and world > 1
    c = 2 if param_dtype == "bf16" or (param_dtype == "auto" and device == "cuda") else 4  # compute dtype bytes
    autocast = c == 2 and not fsdp
    mode = ("fsdp-" if fsdp else "ddp-" if ddp else "") + ("fp32" if c == 4 else "bf16")
    shard = world if fsdp else 1
    n = parameter_counts(args, lora, lora_rank, lora_targets, lora_unfrozen_params)
    V, L, dim = args.vocab_size, args.n_layers, args.dim
    notes = []

    # persistent: weights, AdamW's state, a reference copy
    weights = ((n["frozen"] * c + n["trainable"] * 4) if lora else n["total"] * 4) / shard
    optimizer = n["trainable"] * 8 / shard
    ref = 0
    copy = preference and reference == "model" or bool(grpo and grpo[2])
    if copy and (separate_reference or not lora or lora_unfrozen_params):
        ref = n["total"] * c / shard
    grads = n["trainable"] * 4 / shard  # all of them, once backward is through
    if ddp:
        grads += n["trainable"] * 4  # DDP's buckets: a flat fp32 copy of every gradient, from construction on
        notes.append("DDP keeps its gradient buckets beside .grad: gradients count twice")
    if fsdp and fsdp_grad_sync == "last" and gradient_accum_steps > 1:
        grads += n["trainable"] * 4  # unsharded fp32 between micro-batches, reduce-scattered after the last
        notes.append("--fsdp_grad_sync last: unsharded fp32 gradients between micro-batches, +4 bytes per "
                     "trainable parameter")
    kept = grads if gradient_accum_steps > 1 else (n["trainable"] * 4 if ddp else 0)  # as a forward starts

    # activations of one micro-batch
    tokens = micro_batch_size * max_seq_len * (2 if preference else 1)
    trained = tokens if trained_tokens is None else min(trained_tokens, tokens)
    if grpo:
        G, completion, _ = grpo
        tokens = micro_batch_size * (max_seq_len - completion - 1 + G * completion)
        trained = min(micro_batch_size * G * completion, trained_tokens or tokens)
    block = tokens * block_bytes_per_token(args, c, None if not lora else lora_targets, lora_rank, autocast)
    residual = dim * (4 if autocast and not lora else c)
    rotary = args.head_dim * 4 * (2 if args.layer_types is not None else 1)  # cos, sin [B, 1, T, hd/2] fp32
    outside = tokens * (residual + rotary + TOKEN_OVERHEAD_BYTES) + trained * dim * c  # + the trained rows' h
    activations = (tokens * L * residual if activation_checkpointing else L * block) + outside

    # logits: token_logprobs keeps its last fp32 chunk for backward, which turns it into its gradient in place
    # (bf16: plus the chunk's matmul output); the output projection's gradient is built a chunk at a time, the
    # chunk's beside the sum when there are several
    rows = min(max(1, LOGITS_CHUNK_ELEMENTS // V), max(trained, 1))
    out_trains = not lora or any(re.search(p, "output.weight") for p in lora_unfrozen_params)
    out_grad = V * dim * (c if fsdp else 4) if out_trains else 0
    out_grad_chunk = V * dim * c if out_trains and trained > rows else 0
    logits = rows * V * (4 + (c if c != 4 else 0)) + out_grad + out_grad_chunk

    # parameters in the compute dtype beside the masters: FSDP2's all-gathers (the root's from the first
    # forward to the end of backward: the root does not reshard after forward; the block running and the one
    # prefetched); under autocast a full fine-tune's bf16 copies of the weights, kept for backward (one block's
    # with activation checkpointing)
    gathered = 0
    if fsdp:
        gathered = (n["root"] + 2 * n["block"]) * c
    elif autocast and not lora:
        gathered = (n["block"] * (1 if activation_checkpointing else L) + V * dim) * 2

    # backward's workspace at the top block: the gradients of its activations (_GatedDown recomputes act and
    # product and makes the gradients of product, act, up and gate, [N, hidden] each; a LoRA w2 takes plain
    # autograd, which kept act and product, and needs about two more), and the recomputed block under
    # activation checkpointing
    if lora and "w2" in lora_targets:
        act_grads = tokens * args.hidden_dim * (2 * c + (4 if autocast else 0))  # autocast: the adapter's fp32
    else:
        act_grads = tokens * 6 * args.hidden_dim * c
    # FSDP2 at a block's post-backward: its unsharded gradients (compute dtype) until copied into the fp32
    # reduce-scatter input, with the block itself resharded first; the next block is gathered meanwhile
    block_grads = n["trainable_block"] * (c + 4) if fsdp else 0
    workspace = act_grads + (block if activation_checkpointing else 0) + block_grads
    if fsdp:
        params_top = n["root"] * c + n["block"] * c + max(n["block"] * c + n["trainable_block"] * c, block_grads)
    else:
        params_top = gathered
    # AdamW on CPU goes a tensor at a time: exp_avg_sq.sqrt() / bias_correction, two temporaries of the largest
    # trained tensor; fused on GPUs
    adamw_temp = 2 * n["largest"] * 4 if device == "cpu" else 0

    # the embeddings' gradient, made whole [V, dim] by their backward: it becomes .grad, or is added in place to
    # the one there (the previous micro-batch's); tied to the output, autograd first adds it to the output's
    # gradient, which waited for it. Under FSDP2 the root's post-backward reshards it, then copies its gradients
    # into their fp32 reduce-scatter input.
    accumulating = gradient_accum_steps > 1
    embedding_grad = V * dim * 4 * (args.tie_word_embeddings + accumulating) if not (fsdp or lora) else 0
    root_grads = (n["trainable"] - L * n["trainable_block"]) * (c + 4) if fsdp else 0

    # the peak: the start of backward (every activation, the logits), the top block's backward, or the end of
    # backward and the optimizer step (every gradient)
    moments = {
        "backward start": kept + activations + logits + gathered,
        "top block backward": max(kept, out_grad) + activations - trained * dim * c + act_grads +
                              (block if activation_checkpointing else 0) + params_top,
        "backward end": grads + root_grads + tokens * residual + max(adamw_temp, embedding_grad),
    }
    if grpo:  # between steps: no gradients, no activations
        rows, cache_bytes = micro_batch_size * G, c if fsdp or lora else 4  # the cache takes output.weight's dtype
        kv = 2 * L * rows * max_seq_len * args.n_kv_heads * args.head_dim * cache_bytes
        prompts = micro_batch_size * (max_seq_len - completion)  # the prefill: one block's input, norm, gate, up
        prefill = prompts * (3 * dim + 3 * args.hidden_dim) * cache_bytes
        whole = n["total"] * c if fsdp else 0
        moments["rollouts"] = whole + kv * (1 + 1 / G) + prefill + rows * V * 4 * 3  # cache copied to G rows
    at = max(moments, key=moments.get)
    process = CPU_PROCESS_BYTES if device == "cpu" else 0
    part = f"1/{world} of " if shard > 1 else ""
    dtype = "bf16" if c == 2 else "fp32"
    what = {
        "weights": part + (f"{count(n['frozen'])} frozen in {dtype} + {count(n['trainable'])} trained in fp32"
                           if lora else f"{count(n['total'])} fp32 masters"),
        "gradients": f"fp32, {part}{count(n['trainable'])}" + (" (+ DDP buckets)" if ddp else "") +
                     (" + unsharded between micro-batches" if fsdp and fsdp_grad_sync == "last" and
                      gradient_accum_steps > 1 else ""),
        "optimizer": f"AdamW exp_avg + exp_avg_sq, fp32, {part}{count(n['trainable'])}",
        "activations": (f"{L} block inputs + 1 block recomputed" if activation_checkpointing else f"{L} blocks") +
                       f" x {tokens:,} tokens ({block / tokens / 1024:.0f} KiB per token per block)",
        "logits": f"{rows} x {V:,} fp32 chunk" + (" + the output projection's gradient" if out_trains else ""),
        "gathered": "FSDP2: root (embeddings, output) + 2 blocks, " + dtype if fsdp else
                    "autocast's bf16 weight copies" if gathered else "-",
        "workspace": "backward of the top block" + (": activation gradients, unsharded block gradients"
                                                     if fsdp else "") + (", AdamW's temporary" if adamw_temp else ""),
        "reference": f"a frozen {dtype} copy, {part}{count(n['total'])}" if ref else "-",
        **({"rollouts": f"{'whole weights gathered + ' if fsdp else ''}KV cache of {micro_batch_size * grpo[0]} "
                        f"rows x {max_seq_len}, the prefill, the sampled logits"}
           if grpo else {}),
        "process": "the CPU process before its model (CPU_PROCESS_BYTES)",
    }
    return Plan(weights=int(weights), gradients=int(grads), optimizer=int(optimizer),
                activations=int(activations), logits=int(logits), gathered=int(gathered),
                workspace=int(workspace + adamw_temp), reference=int(ref), process=process,
                peak=int(weights + optimizer + ref + moments[at] + process), at=at, gpu_bytes=gpu_bytes,
                tokens=tokens, world=world, mode=mode, what=what, notes=notes,
                rollouts=int(moments.get("rollouts", 0)))


MARGIN_FRACTION, MARGIN_BYTES = 0.10, 1 * GiB  # what the table keeps free: fragmentation, the CUDA context


def fits_with_margin(plan: Plan) -> bool:
    return not plan.gpu_bytes or plan.peak <= plan.gpu_bytes * (1 - MARGIN_FRACTION) - MARGIN_BYTES


def largest_micro_batch(args: ModelArgs, limit: int = 1024, **flags) -> int:
    """The largest --micro_batch_size_per_gpu whose plan fits the GPU with the margin (0: not even 1)."""
    fits = lambda mb: fits_with_margin(plan_memory(args, micro_batch_size=mb, **flags))  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -- what a user reads ----------------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def format_plan(plan: Plan, title: str = "") -> str:
    """The plan as lines: each part, the peak against the GPU, and what is not counted."""
    lines = [title] if title else []
    names = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer state",
             "activations": "activations", "logits": "logits", "gathered": "gathered params",
             "workspace": "workspace", "reference": "reference model", "process": "process"}
    for key, name in names.items():
        if key != "process" or plan.process:
            lines.append(f"  {name:<16} {gib(getattr(plan, key)):>11}  {plan.what.get(key, '')}")
    if plan.rollouts:
        lines.append(f"  {'rollouts':<16} {gib(plan.rollouts):>11}  {plan.what['rollouts']}")
    peak = f"  {'peak':<16} {gib(plan.peak):>11}  at {plan.at}"
    if plan.gpu_bytes:
        usable = plan.gpu_bytes * (1 - MARGIN_FRACTION) - MARGIN_BYTES
        verdict = ("fits" if fits_with_margin(plan) else
                   "fits only without the margin" if plan.fits else "does NOT fit")
        peak += (f", of {gib(plan.gpu_bytes)} per GPU ({plan.peak / plan.gpu_bytes:.0%}): {verdict} "
                 f"(margin {MARGIN_FRACTION:.0%} + {MARGIN_BYTES / GiB:.0f} GiB leaves {gib(usable)})")
    lines.append(peak)
    lines.append("  (the peak is not the sum: gradients grow in backward as activations are freed)")
    lines += [f"  note: {note}" for note in plan.notes]
    if plan.gpu_bytes:
        lines.append("  not counted: the CUDA context and NCCL buffers (0.5-1 GiB), the allocator's fragmentation, "
                     "compiled graphs: hence the margin")
    return "\n".join(lines)


def params_json(ckpt_path) -> Path:
    """The params.json of a native dir or of its consolidated.00.pth (only that file is read)."""
    path = Path(ckpt_path)
    found = path / "params.json" if path.is_dir() else path.parent / "params.json"
    if not found.is_file():
        raise FileNotFoundError(f"--plan reads {found}: not found (a native dir from convert.py has it; the "
                                f"weights themselves need not be there)")
    return found


def plan_from_args(args) -> tuple[Plan, str]:
    """A trainer's parsed flags (train_common's CommonArgs and its subclasses) -> (plan, its text)."""
    model_args = ModelArgs.from_json(params_json(args.ckpt_paths[0]))
    preference = hasattr(args, "share_prompt")
    grpo = (args.num_generations, args.max_completion_length, args.beta) if hasattr(args, "num_generations") else None
    trainer = {"SFTArgs": "SFT", "DPOArgs": "DPO", "SimPOArgs": "SimPO", "GRPOArgs": "GRPO"}.get(
        type(args).__name__, "training")
    reference = getattr(args, "reference", "precompute")
    grad_sync = args.fsdp_grad_sync
    plan = plan_memory(model_args, micro_batch_size=args.micro_batch_size_per_gpu, max_seq_len=args.max_seq_len,
                       preference=preference, gradient_accum_steps=args.gradient_accum_steps,
                       activation_checkpointing=args.activation_checkpointing, lora=args.lora,
                       lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                       lora_unfrozen_params=args.lora_unfrozen_params, dp=args.dp, param_dtype=args.param_dtype,
                       reference=reference, separate_reference=bool(getattr(args, "ref_ckpt_paths", None)),
                       fsdp_grad_sync=grad_sync, gpus=args.plan_gpus, nnodes=args.plan_nnodes, grpo=grpo)
    n = parameter_counts(model_args, args.lora, args.lora_rank, args.lora_targets, args.lora_unfrozen_params)
    unit = "pairs" if preference else f"prompts x {grpo[0]} completions" if grpo else "sequences"
    layout = "packed rows" if args.pack_samples or grpo else "padded"
    title = (f"memory plan, per GPU: {trainer}{', reference ' + reference if trainer == 'DPO' else ''}, "
             f"{'LoRA r=' + str(args.lora_rank) if args.lora else 'full fine-tune'} of "
             f"{count(n['total'])} parameters ({count(n['trainable'])} trained), dim {model_args.dim} x "
             f"{model_args.n_layers} layers; {plan.world} ranks ({args.plan_gpus} x {args.plan_nnodes} node"
             f"{'s' if args.plan_nnodes > 1 else ''}), {plan.mode}; micro-batch {args.micro_batch_size_per_gpu} "
             f"{unit} x {args.max_seq_len} ({layout}), accumulation {args.gradient_accum_steps}, activation "
             f"checkpointing {'on' if args.activation_checkpointing else 'off'}")
    return plan, format_plan(plan, title)


# -- the README's table ---------------------------------------------------------------------------------------
# From the public config.json files (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
# intermediate_size, vocab_size, tie_word_embeddings, Qwen3's per-head q/k norms).
MODELS = {
    "Llama-3.1-8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                              ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True),  # hidden 14336
    "Llama-3.1-70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                               ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True),  # hidden 28672
    "Qwen3-32B": ModelArgs(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128, vocab_size=151936,
                           multiple_of=25600, qk_norm="head", rope_theta=1000000.0),  # hidden 25600 (convert.py's rule)
}
CLUSTERS = (("8x80GB", 1), ("8x80GB", 2))
TRAINERS = (("SFT", dict()), ("DPO", dict(preference=True)), ("SimPO", dict(preference=True)),
            ("DPO, ref. model", dict(preference=True, reference="model")))


def table(max_seq_len: int = 4096) -> str:
    """Markdown: per model, method and trainer, the largest micro-batch (sequences for SFT, pairs for DPO and
    SimPO) that fits each cluster with and without activation checkpointing, and the peak at micro-batch 1."""
    head = ["model", "method", "trainer"] + [f"{'2 x ' if nodes > 1 else ''}{g.replace('x', ' x ')}, AC {ac}"
                                             for g, nodes in CLUSTERS for ac in ("off", "on")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, model_args in MODELS.items():
        for lora in (False, True):
            for trainer, extra in TRAINERS:
                if trainer.startswith("DPO, ref") and lora:
                    continue  # the adapters-off policy is the reference: the same as precomputed
                cells = []
                for gpus, nodes in CLUSTERS:
                    for ac in (False, True):
                        flags = dict(max_seq_len=max_seq_len, activation_checkpointing=ac, lora=lora, gpus=gpus,
                                     nnodes=nodes, **extra)
                        mb = largest_micro_batch(model_args, **flags)
                        peak = plan_memory(model_args, micro_batch_size=1, **flags).peak
                        cells.append(f"{mb} ({peak / GiB:.0f} GiB)" if mb else f"- ({peak / GiB:.0f} GiB)")
                lines.append(f"| {name} | {'LoRA r=16' if lora else 'full'} | {trainer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print docs/memory.md's table (markdown)")
    parser.add_argument("--max_seq_len", type=int, default=4096, help="the table's sequence length")
    args = parser.parse_args(argv)
    if not args.table:
        parser.error("plan a run with its trainer: python train_sft.py <flags> --plan --plan_gpus 8x80GB; "
                     "or print the table: --table")
    print(table(args.max_seq_len))


if __name__ == "__main__":
    main()
