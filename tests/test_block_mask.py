"""FlexAttention block masks built from the segment table (model.segment_block_mask), never as [T, T].

References: torch's create_block_mask, which evaluates model.segment_mask_mod on every (query, key) pair, for the
block lists; model.segment_attention (an SDPA call per document) for the output of the compiled FlexAttention
kernel, the one that skips empty tiles and full tiles' mask_mod (uncompiled, flex_attention evaluates mask_mod
at every pair and would not notice a wrong block list)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from model import segment_attention, segment_block_mask, segment_mask_mod

REPO = Path(__file__).resolve().parent.parent


def random_layout(g: torch.Generator, rows: int, T: int, longest: int) -> torch.Tensor:
    """segments [S, 5] for rows of documents (lengths 1..longest), shared-prompt pairs (the prompt inside the first
    piece, up to all of it: then it ends where the second starts) and padding: gaps, row ends, whole rows."""
    def rand(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))
    segments = []
    for r in range(rows):
        p = rand(0, 2)
        while p < T:
            kind = rand(0, 9)
            if kind == 0:
                p += rand(1, 40)  # padding
            elif kind <= 4:
                n = min(rand(1, longest), T - p)
                segments.append((r, p, p + n, p, p))
                p += n
            else:  # prompt + chosen as one piece, then the rejected response after the first s tokens of it
                n = min(rand(1, longest), T - p)
                s = n if kind == 5 else rand(0, n)
                m = min(rand(1, longest), T - p - n)
                segments.append((r, p, p + n, p, p))
                segments += [(r, p + n, p + n + m, p, p + s)] if m > 0 else []
                p += n + m
    keep = torch.rand(len(segments), generator=g) > 0.1  # drop some: padding at row ends, or whole rows
    return torch.tensor(segments, dtype=torch.long).reshape(-1, 5)[keep]


def tiles(block_mask: BlockMask) -> dict:
    """The dense tile classification, [rows, 1, q blocks, key blocks] booleans: partial and full, by kv and by q."""
    out = {}
    for name in ("kv", "full_kv", "q", "full_q"):
        num, idx = getattr(block_mask, name + "_num_blocks"), getattr(block_mask, name + "_indices")
        listed = torch.arange(idx.shape[-1]) < num[..., None]
        out[name] = torch.zeros(idx.shape, dtype=torch.bool).scatter_(-1, idx.long(), listed)
    return out


def test_block_lists_equal_create_block_mask():
    """Random layouts: T of 1, under, at and over one block of 128, and not a multiple of it; no window, and
    windows of 1, 100, 128, 300 (only from 256 can a window's tile be full): the partial and full tiles equal
    create_block_mask's, and so do the lengths the kernel reads."""
    g = torch.Generator().manual_seed(0)
    full_with_window = 0
    for trial in range(5):
        for T in (1, 50, 127, 128, 129, 300, 520):
            rows = 1 + trial % 3
            segments = random_layout(g, rows, T, longest=max(1, T // 2))
            for window in (None, 1, 100, 128, 300):
                ours = segment_block_mask(segments, rows, T, window)
                ref = create_block_mask(segment_mask_mod(segments, rows, T, window), rows, None, T, T, device="cpu")
                a, b = tiles(ours), tiles(ref)
                for name in a:
                    assert torch.equal(a[name], b[name]), (name, T, window, segments.tolist())
                assert ours.seq_lengths == ref.seq_lengths == (T, T) and ours.BLOCK_SIZE == ref.BLOCK_SIZE
                full_with_window += int(a["full_kv"].sum()) if window else 0
    assert full_with_window > 0  # the cases had full tiles under a window, not only partial ones


@pytest.mark.parametrize("T, window", [(300, None), (300, 100), (300, 300), (50, None), (1, 100)])
def test_compiled_flex_attention_with_it_equals_segment_attention(T, window):
    """Three rows of documents, shared prompts and padding, through FlexAttention compiled on the CPU with the
    block mask from the segments: equal to segment_attention at every position, padding (zeros) included. A
    block mask that calls every tile full gives another output, so the kernel does read the block lists."""
    g = torch.Generator().manual_seed(T + (window or 0))
    rows = 3
    segments = random_layout(g, rows, T, longest=max(1, T // 3))
    q, k, v = torch.randn(3, rows, 2, T, 16, generator=g).unbind(0)
    compiled = torch.compile(flex_attention)
    block_mask = segment_block_mask(segments, rows, T, window)
    out = compiled(q, k, v, block_mask=block_mask)
    reference = segment_attention(q, k, v, tuple(map(tuple, segments.tolist())), window)
    assert (out - reference).abs().max() <= 1e-5
    if T == 300 and window == 100:
        n = block_mask.kv_indices.shape[-1]
        every = torch.arange(n, dtype=torch.int32).expand_as(block_mask.kv_indices).contiguous()
        all_full = BlockMask.from_kv_blocks(torch.zeros_like(block_mask.kv_num_blocks), every,
                                            torch.full_like(block_mask.kv_num_blocks, n), every.clone(), BLOCK_SIZE=128,
                                            mask_mod=block_mask.mask_mod, seq_lengths=(T, T))
        assert (compiled(q, k, v, block_mask=all_full) - reference).abs().max() > 1e-2


CHILD = """
import json, time, torch
from model import segment_block_mask
from test_block_mask import random_layout

def peak_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

rows, T = 4, 16384
segments = random_layout(torch.Generator().manual_seed(0), rows, T, longest=2000)
short = random_layout(torch.Generator().manual_seed(1), 1, T, longest=40)  # a row of many short documents
short[:, 0] = rows - 1
segments = torch.cat([segments[segments[:, 0] < rows - 1], short])
segment_block_mask(segments[:4], rows, T, 100)  # imports and first-call set-up, outside the measurement
out = {"segments": len(segments)}
for window in (None, 1000):
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident size
    before, start = peak_mb(), time.perf_counter()
    block_mask = segment_block_mask(segments, rows, T, window)
    out[str(window)] = (peak_mb() - before, time.perf_counter() - start, block_mask.sparsity())
print(json.dumps(out))
"""


def test_block_mask_for_4_rows_of_16k_allocates_little():
    """4 rows x 16,384 tokens (what create_block_mask would hold as a [4, 16384, 16384] mask: 1 GiB of bools,
    int64 temporaries on top): building the block mask, with a window and without, raises the process's peak
    resident memory by under 64 MB. Measured in a child process (VmHWM, reset through /proc/self/clear_refs)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(out)
    assert out["segments"] > 500
    for window in ("None", "1000"):
        grown_mb, seconds, sparsity = out[window]
        assert grown_mb < 64, (window, grown_mb)
        assert sparsity > 50, (window, sparsity)
