"""A rank's memory is its share of the model: under FSDP2 the model is built on the meta device and each process reads
only its rows of the memory-mapped checkpoint; gradients stay sharded under accumulation; the final checkpoint is
written one gathered tensor at a time. Peaks here are whole-process peak RSS (load, training and save), measured
from outside the run; each test is a few torchrun launches of a model whose weights dominate a process."""

from pathlib import Path

import pytest
import torch

from dev.bench import bench_native, run_peak
from sft_fixtures import metrics, to_argv, write_chat_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("sharding") / "chat.jsonl", n=16)


def run(native: Path, out: Path, data: Path, nproc: int, **flags) -> float:
    """Train 2 steps; returns the largest whole-process peak RSS (GiB) of the run's processes."""
    return run_peak(nproc, "train_sft.py", to_argv({
        "ckpt_paths": native, "template_config": "smollm2_chat", "train_data_paths": f"jsonl:{data}",
        "output_dir": out, "max_seq_len": 64, "train_steps": 2, "lr": 1e-3, "data_cache_dir": out.parent / "cache",
        **flags}))


def test_lora_rank_holds_its_share_at_load_training_and_save(tmp_path, data):
    """LoRA on a 2.4 GB (fp32) base: weights dominate. Each of 2 FSDP ranks reads, holds and saves through its half;
    one process maps the whole file. Before sharded load and save, the largest rank of 2 peaked at 1.15x the one
    process (each loaded everything, then rank 0 gathered it all to save)."""
    native = bench_native(tmp_path / "base", dim=1024, n_layers=48)
    lora = {"lora": True, "lora_rank": 8}
    one = run(native, tmp_path / "one", data, 1, micro_batch_size_per_gpu=2, **lora)
    two = run(native, tmp_path / "two", data, 2, micro_batch_size_per_gpu=1, **lora)
    print(f"LoRA, 2.4 GB base: one process {one:.2f} GiB, largest of 2 FSDP ranks {two:.2f} GiB ({two / one:.2f}x)")
    assert two <= 0.65 * one
    # The same global batch, the same adapters: the runs agree, and their merged outputs load the same.
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)
    sa = torch.load(tmp_path / "one" / "consolidated.00.pth", mmap=True)
    sb = torch.load(tmp_path / "two" / "consolidated.00.pth", mmap=True)
    assert list(sa) == list(sb)
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5


def test_accumulation_keeps_gradients_sharded(tmp_path, data):
    """Full fine-tune, 2 FSDP ranks: gradient accumulation over 4 micro-batches costs no more than 1 (10%), since each
    micro-batch's gradients are reduce-scattered at once; --fsdp_grad_sync last keeps whole fp32 gradients between
    micro-batches (+4 bytes per parameter), and computes the same losses."""
    native = bench_native(tmp_path / "base", dim=1024, n_layers=12)
    peaks, losses = {}, {}
    for name, flags in {"accum1": {"gradient_accum_steps": 1}, "accum4": {"gradient_accum_steps": 4},
                        "last": {"gradient_accum_steps": 4, "fsdp_grad_sync": "last"}}.items():
        out = tmp_path / name
        run(native, out, data, 2, micro_batch_size_per_gpu=1, **flags)
        peaks[name] = max(m["memory_gb"] for m in metrics(out))  # training's peak, the largest rank's
        losses[name] = [m["loss"] for m in metrics(out)]
    print("training peak per rank (GiB):", {k: round(v, 3) for k, v in peaks.items()})
    params_gib = (native / "consolidated.00.pth").stat().st_size / 1024**3
    assert peaks["accum4"] <= 1.10 * peaks["accum1"]
    # Whole gradients instead of half of them: +0.5x the parameters' bytes in theory, 0.44x measured.
    assert peaks["last"] >= peaks["accum4"] + 0.3 * params_gib
    assert losses["last"] == pytest.approx(losses["accum4"], rel=1e-5)


def test_streamed_save_loads_as_torch_save(tmp_path):
    """save_streamed writes torch.save's file one tensor at a time: torch.load gives the same names in the same
    order, dtypes, shapes and bits, for awkward sizes and dtypes (empty, scalar, bf16, int64, non-contiguous input)."""
    from train_common import save_streamed

    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(300, 7, generator=g), "empty": torch.zeros(0, 5), "scalar": torch.tensor(3.5),
             "b": torch.randn(5, generator=g).to(torch.bfloat16), "ids": torch.arange(11),
             "t": torch.randn(6, 4, generator=g).T}
    for dtype in (torch.float32, torch.bfloat16):
        expected = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        reference, streamed = tmp_path / f"ref_{dtype}.pt", tmp_path / f"streamed_{dtype}.pt"
        torch.save({k: v.contiguous() for k, v in expected.items()}, reference)
        with open(streamed, "wb") as f:
            save_streamed(f, {k: (v.shape, v.dtype) for k, v in expected.items()}, lambda k: expected[k])
        a, b = torch.load(reference, weights_only=True), torch.load(streamed, weights_only=True, mmap=True)
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
