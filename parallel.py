"""The torchrun side of training, as plain functions: the processes (one per GPU or CPU process, a world of one
without torchrun), parallelism (activation checkpointing, compile, FSDP2 or DDP, in that order, as torchtitan
applies them), and step checkpoints that resume exactly (sharded with torch.distributed.checkpoint, each rank's
loader position and RNG beside them, every dir complete or absent). train_common.py builds a run out of these.
"""

import datetime
import errno
import gc
import os
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from model import DTYPES


# -- processes -------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_minutes: float = 60.0) -> Dist:
    """One process per GPU (or CPU process) as torchrun starts them: nccl on GPUs, gloo on CPU.
    A plain `python train_sft.py` runs as a world of one without a process group.

    timeout_minutes (--dist_timeout): how long a collective waits for a late process before the run fails.
    Work that one process does alone is waited for outside the collectives, without a deadline (wait_for_all),
    so the timeout bounds only the lateness of a running step: a step checkpoint's slowest shard write, one
    tensor of the final save. NCCL's 10 minutes would end a run whose shards go to a slow shared filesystem;
    an hour covers that, and a hung process still ends the run within the hour."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_launcher()
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            # On a timeout or a failed peer, NCCL's watchdog thread takes the process down by default (mode 3):
            # an abort below Python, no message, no way back named. Mode 2 aborts the communicators only: the
            # main thread's next collective raises ("NCCL communicator was aborted"), and train_common.main
            # prints its one line as on gloo; the step in flight is lost either way (resume from the last
            # checkpoint). Should the abort itself hang, the heartbeat monitor still ends the process
            # (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC). A user's own setting wins.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, local_rank, world, device)


def exit_with_launcher():
    """torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL (a job system
    reaping it, a lost ssh session) leaves the workers training on, holding the output dir. Linux can signal
    a process when its parent dies: ask for SIGTERM, which the loop turns into a checkpoint and a clean exit
    (see StopSignal). Elsewhere this is a no-op; the workers then stop at their next collective instead."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def teardown_distributed():
    if dist.is_initialized():
        # Free the models first, while the process group and the interpreter are alive: FSDP's state sits in
        # reference cycles holding gloo work objects, and freeing those at interpreter exit can abort.
        gc.collect()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


_waits = 0  # wait_for_all calls so far: every process makes the same calls in the same order


def wait_for_all():
    """A barrier without a deadline, outside the collectives, after work one process does alone (rank 0 building
    the data cache, writing the merged model, deleting old checkpoints): in a collective the others would give
    up after --dist_timeout, and under NCCL its watchdog would end them. Each process counts itself in on the
    process group's key-value store (torchrun's TCP store) and polls the count. A process that dies meanwhile
    leaves the others polling until torchrun stops them, as it stops every process of a run when one fails."""
    global _waits
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    store = dist.distributed_c10d._get_default_store()  # torch has no public accessor for it
    _waits += 1
    key = f"wait_for_all/{_waits}"
    try:
        store.add(key, 1)
        pause = 0.001
        while store.add(key, 0) < dist.get_world_size():
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
    except dist.DistError:
        # The store lives in the torchrun launcher: when it is gone (killed, and its workers saving on the SIGTERM
        # it leaves them), the processes still reach each other through the process group.
        dist.barrier()
        return
    if dist.get_rank() == 0 and _waits > 2:  # every process has left wait n - 2: it counted itself in at n - 1
        store.delete_key(f"wait_for_all/{_waits - 2}")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def collective_failed(e: BaseException) -> bool:
    """Whether `e` is a collective that failed: another process died, or did not answer within --dist_timeout.
    torch raises DistError's subclasses for most; gloo's transport errors name their source file, and NCCL's
    watchdog timeout and aborted communicator (see setup_distributed) may come as plain RuntimeErrors."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("/gloo/", "NCCL communicator was aborted", "Watchdog caught collective operation"))


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether `flag` holds on any rank: every rank takes the same branch after it (a failed write, a SIGTERM)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=d.device)).item() > 0)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopSignal:
    """SIGTERM (a preempted job, torchrun shutting down) and Ctrl-C (SIGINT) only set a flag; end_step acts on it
    after the step: a checkpoint, and an exit with 128 + the signal's number (130 for Ctrl-C), as a shell reports a
    process the signal ended, so `train && next_stage` stops there. The ranks agree through an all-reduce: torchrun
    may signal them apart. A second Ctrl-C stops at once, without a checkpoint of the step in flight (Python's
    KeyboardInterrupt; train_common.main names the last complete checkpoint). close() restores the handlers."""

    def __init__(self):
        self.requested, self.signum, self.saved = False, None, False  # saved: the checkpoint to resume from
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        _stop_signals.append(self)

    def handle(self, signum, frame):
        if self.saved:  # the checkpoint is written; the run is on its way out
            return
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        if signum == signal.SIGINT and int(os.environ.get("RANK", 0)) == 0:  # os.write: safe in a handler
            os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint to resume from (Ctrl-C again "
                        b"stops at once, without one)\n")

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


_stop_signals = []  # installed StopSignals, newest last


def restore_signals():
    """The handlers from before the run's StopSignals (a caller's own, or Python's KeyboardInterrupt)."""
    while _stop_signals:
        _stop_signals.pop().close()


# -- parallelism -----------------------------------------------------------------------------------------------
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 compute on GPUs; CPUs (and the tests) stay in fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def apply_activation_checkpointing(model):
    """Recompute each block's activations in backward: memory of one block instead of all of them.
    The recomputation must draw the random numbers the forward drew (LoRA dropout's masks), or the gradients are
    those of other masks than the loss's: a block that draws any keeps the RNG state of its forward (the CPU's
    and, on a GPU, the device's, saved per block and restored for the recomputation). The others need none, so
    they skip that save and restore, per block and step: it costs little, but nothing is the right price."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        draws = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in block.modules())
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=draws)


def apply_compile(model, backend: str = "inductor"):
    """torch.compile each block (its FlexAttention too: traced into the block's graph). The blocks share one
    compiled code, so their graphs add up: packed batches keep one shape (data.Loader's fixed_shape) and global
    and sliding-window layers differ in data only (model.segment_mask_mod). `backend`: inductor, or aot_eager
    for the CPU tests of the compiled path."""
    for block in model.layers:
        block.compile(backend=backend)


def apply_fsdp(model, param_dtype: torch.dtype):
    """FSDP2: shard each block, then the root (embeddings, final norm, output). Master weights stay fp32;
    compute runs in param_dtype and gradients are reduced in fp32 (bf16 reductions lose DPO-sized updates).
    The blocks do not cast their inputs: FSDP2 would round every floating one to param_dtype, the rotary cos
    and sin tables included (each off by up to 2^-9 in bf16), where Meta's reference and torchtitan rotate in
    fp32 (a complex64 table, which FSDP2 leaves alone), as DDP and one process do here under autocast. The
    hidden state needs no cast: it enters the first block in param_dtype, the embedding's output, and each block
    returns it so. The masks and segment tables are integers or booleans, which FSDP2 never casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    block_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if not model.args.tie_word_embeddings:  # a tied embedding is the output projection too: it stays in the root
        # A unit of its own: gathered for the lookup and freed at once, not held whole through the step.
        fully_shard(model.tok_embeddings, mp_policy=mp)
    for i, block in enumerate(model.layers):
        fully_shard(block, mp_policy=block_mp, reshard_after_forward=reshards_after_forward(model, block))
    fully_shard(model, mp_policy=mp)
    return model


def reshards_after_forward(model, unit) -> bool:
    """apply_fsdp's policy: every unit is freed after its forward but the last block, gathered again at once for
    backward, and the root, which FSDP2 keeps gathered on its own."""
    return unit is not model and unit is not model.layers[-1]


@contextmanager
def gathered(model):
    """Whole weights on every process for forwards each process runs on its own (GRPO's rollouts: each rank
    decodes until its own rows stop, so forwards that gathered in lockstep would wait for each other for ever):
    every FSDP2 unit gathered once and kept through the forwards, then resharded and apart again. The root must
    have run one forward before (FSDP2 sets itself up in it). DDP and one process hold whole weights already."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in units:
            m.set_reshard_after_forward(reshards_after_forward(model, m), recurse=False)
        reshard(model)


def parallelize(model, d: Dist, dp: str, param_dtype: torch.dtype, activation_checkpointing: bool,
                compile: bool, tensor):
    """Wrap a model built on the meta device, then give it its weights (tensor(name) -> the full tensor, see
    materialize). Order matters: checkpoint wrappers and compiled blocks must exist before FSDP wraps the blocks;
    FSDP shards before anything is allocated, so each process holds only its shards, from load on; DDP copies
    rank 0's weights when it wraps, so they must be there before. A model with nothing to train (DPO's reference)
    is sharded under FSDP and a plain copy under DDP."""
    from torch.nn.parallel import DistributedDataParallel

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if dist.is_initialized() and dp == "fsdp":
        apply_fsdp(model, param_dtype)
    materialize(model, tensor, d.device)
    if not dist.is_initialized() or dp == "fsdp" or not any(p.requires_grad for p in model.parameters()):
        return model
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def materialize(model, tensor, device: torch.device):
    """Fill a model built on the meta device from tensor(name, rows=None) (lora.stacked_source: the checkpoint,
    memory-mapped). FSDP2's sharded parameters: each process allocates its own shards and copies in its rows of
    each tensor, so it reads and holds its share only. Plain parameters take the tensor itself in their dtype
    (no copy when the checkpoint's matches), swapped in place, so tied weights stay tied."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        model.to_empty(device=device)
    with torch.no_grad():
        for name, p in checkpoint_parameters(model).items():
            if not isinstance(p, DTensor):
                torch.utils.swap_tensors(p, torch.nn.Parameter(tensor(name).to(device, p.dtype), p.requires_grad))
                continue
            # FSDP2 shards dim 0 as torch.chunk does: ceil(rows / N) each, the last ones shorter or empty.
            assert p.placements[0].dim == 0, p.placements
            n, rank, local = p.device_mesh.size(), p.device_mesh.get_local_rank(), p.to_local()
            start = min(rank * -(-p.shape[0] // n), p.shape[0])
            local.copy_(tensor(name, slice(start, start + local.shape[0])))


def checkpoint_parameters(model) -> dict:
    """named_parameters under the checkpoint's names: activation checkpointing's wrapper inserts its own
    attribute into the path. A tied weight appears once, under its first name."""
    return {name.replace("_checkpoint_wrapped_module.", ""): p for name, p in model.named_parameters()}


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """A parameter whole: gathered from every process's shard under FSDP2 (a collective: all must call it)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def autocast(d: Dist, dp: str, param_dtype: torch.dtype):
    """FSDP2 casts parameters itself; DDP and single-process runs reach bf16 through autocast."""
    enabled = param_dtype != torch.float32 and not (dp == "fsdp" and dist.is_initialized())
    return torch.autocast(d.device.type, dtype=param_dtype, enabled=enabled)


def reshard(model):
    """After forwards without backward (validation, a reference pass): FSDP2 keeps the root and the last block
    gathered after forward, expecting backward to release them. Left so, the next training step runs on those
    gathered copies and its gradients for them go astray; resharding restores the state backward leaves."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def grad_sync(model, last: bool, fsdp_grad_sync: str):
    """Gradient accumulation across the micro-batches of a step. DDP reduces on the last one only: its buckets
    hold whole gradients either way. FSDP2 reduce-scatters after every micro-batch by default, so between them
    each rank keeps only its shard of the gradients; --fsdp_grad_sync last reduces once per step (fewer
    collectives), at the price of whole fp32 gradients, +4 bytes per trained parameter, on every rank."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last or fsdp_grad_sync == "every")
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


# -- checkpoints -----------------------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.exists() else []


def trainable_state(model, optimizer) -> dict:
    """What a step checkpoint holds: the model's state dict less its frozen parameters, and the optimizer's state
    (only trained parameters have one). A full fine-tune's is everything; a LoRA run's is the adapters and any
    --lora_unfrozen_params: its frozen base is rebuilt from --ckpt_paths at resume, as at the start (train_common
    checks those files did not change), where saving it would add 32 GB to every checkpoint of an 8B model.
    Frozen keys come from the parameters themselves: DCP's ignore_frozen_params names each parameter once, so it
    would keep a tied output.weight."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    frozen = {k for k, v in getattr(model, "module", model).state_dict(keep_vars=True).items()  # inside DDP
              if isinstance(v, torch.nn.Parameter) and not v.requires_grad}
    return {"model": {k: v for k, v in model_sd.items() if k not in frozen}, "optim": optim_sd}


def save_checkpoint(output_dir, step: int, model, optimizer, extra: dict, d: Dist, keep: int) -> Path:
    """A resumable checkpoint: the sharded state of what trains, model and optimizer (see trainable_state; with
    torch.distributed.checkpoint each rank writes its own shards), plus each rank's small state (loader position,
    RNG, step, the base's fingerprints). Written under a temp name and renamed, so a `checkpoints/step_*` dir is
    always complete, whenever the process dies; the oldest beyond --max_checkpoints are renamed to a temp name
    before they are deleted, for the same reason, and a step saved twice keeps its first copy. Temp dirs left by a
    kill go at the next start. A failed write (a full disk) is one OSError on every rank, its temp dir removed."""
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait_for_all()
    state = trainable_state(model, optimizer)
    # Without a process group DCP warns that it assumes one process: that is the case here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    error = None
    try:
        dcp.save(state, checkpoint_id=tmp)
        with open(tmp / f"extra_rank{d.rank}.pt", "wb") as f:  # a file object: a failed write is an OSError
            torch.save(extra, f)
    except (OSError, RuntimeError, CheckpointException, KeyboardInterrupt) as e:  # DCP wraps what it catches
        error = e
    if any_rank(error is not None, d):  # every rank leaves together, none waits at a barrier for the others
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space; it was never taken for complete
        previous = checkpoint_dirs(output_dir)
        if interrupted(error):
            raise KeyboardInterrupt(f"interrupted while saving the step {step} checkpoint, which was not kept")
        raise OSError(write_failure(f"the step {step} checkpoint", tmp, error, d,
                                    state_bytes(state),
                                    f"the previous checkpoint {previous[-1]} is intact: free space and rerun "
                                    f"with --resume" if previous else "no earlier checkpoint exists"))
    barrier()
    if d.main:
        if final.exists():  # saved before (SIGTERM right after a --save_freq save): the same state, keep it
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
        old = checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []
        for i, path in enumerate(p for p in old if p != final):
            trash = root / f".tmp_step_{step:08d}_old{i}"
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
    wait_for_all()  # deleting a full fine-tune's checkpoint can take a while on a network filesystem
    return final


def causes(error: BaseException | None) -> list[BaseException]:
    """An exception and those inside it: its cause and context, and what DCP's CheckpointException wraps per rank
    (its text holds their tracebacks, every word of them, so it is never read for what happened)."""
    found, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is f for f in found):
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [failure[0] for failure in e.failures.values()]
    return found


def interrupted(error: BaseException | None) -> bool:
    return any(isinstance(e, KeyboardInterrupt) for e in causes(error))


def write_failure(what: str, where: Path, error, d: Dist, needed: int, intact: str) -> str:
    """One line: what could not be written, where, the space it needs against the space free, and what is
    intact. The disk is called full on ENOSPC, or when less is free than the write needs (torch reports a short
    write on its own stream as `unexpected pos`, without an errno); anything else is named as it is."""
    if error is None:
        return f"{what}: another process failed to write its part under {where} (see its error); {intact}"
    free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    full = any(getattr(e, "errno", None) == errno.ENOSPC for e in causes(error)) or free < needed
    error = next((e for e in causes(error) if not isinstance(e, CheckpointException)), error)  # what DCP wraps
    return (f"could not write {what} to {where} (rank {d.rank}): "
            f"{'no space left on device' if full else first_line(error)}; it needs about {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free there; {intact}")


def state_bytes(obj) -> int:
    """Bytes of the tensors in a nested state dict as written: a sharded tensor (DTensor) whole, all its ranks'
    shards; a replicated one once (DCP writes one copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()  # a DTensor's numel is its global one
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(state_bytes(v) for v in values)


def first_line(e: BaseException) -> str:
    """The gist of an exception: torch's and DCP's run to pages (and miniz apologises at length after the
    first '. ')."""
    line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {line.split('. ')[0][:200]}" if line else type(e).__name__


def check_checkpoint_files(path: Path):
    """A step dir is complete when written (see save_checkpoint); one copied half-way or damaged on disk is
    caught here, before DCP's page-long errors: every storage file its .metadata names, long enough."""
    from torch.distributed.checkpoint import FileSystemReader

    damaged = f"resume: checkpoint {path} is damaged (copied half-way?)"
    fix = "delete the dir to resume from the one before it"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise ValueError(f"{damaged}: cannot read {path / '.metadata'} ({first_line(e)}); {fix}") from None
    ends = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"{size} bytes, .metadata says at least {end}"
            raise ValueError(f"{damaged}: {path / name} is {found}; {fix}")


def load_extra(path: Path, d: Dist) -> dict:
    """This rank's small state in a step checkpoint: loader position, RNG, step, the base's fingerprints."""
    extra_path = Path(path) / f"extra_rank{d.rank}.pt"
    if not extra_path.exists():
        raise ValueError(f"{path} was written by a run with fewer processes (no {extra_path.name}); resume "
                         f"with the same number of processes")
    try:  # our own file (loader position, RNG state: numpy's is not a tensor), written by this code
        extra = torch.load(extra_path, weights_only=False)
    except Exception as e:
        raise ValueError(f"resume: checkpoint {path} is damaged: cannot load {extra_path} ({first_line(e)}); "
                         f"delete the dir to resume from the one before it") from None
    return extra


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> dict:
    """Restore what trains (see trainable_state) into a model built from --ckpt_paths; returns this rank's extra.
    DCP refuses a checkpoint that lacks a trained tensor; strict=False lets set_state_dict leave the frozen ones."""
    check_checkpoint_files(path)
    extra = load_extra(path, d)
    state = trainable_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=path)
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
        raise ValueError(f"cannot resume from {path}: it does not fit this model and optimizer ({first_line(e)}); "
                         f"resume with the --ckpt_paths and LoRA flags the run started with") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    return extra
