"""The Llama-family transformer: Llama 2, 3, 3.1, 3.2, Mistral, Qwen2/2.5, SmolLM2, Qwen3, OLMo 2 and Gemma 3
(text) in one definition.

Weights use Meta's key names and Meta's interleaved rotary layout, so Meta's own `consolidated.00.pth`
+ `params.json` load as they ship. The families differ only in `ModelArgs`: grouped-query attention
(`n_kv_heads`), q/k/v biases (Qwen2), tied input/output embeddings (Llama 3.2, SmolLM2, small Qwen2.5),
an explicit `head_dim`, and `llama3` rotary scaling (Llama 3.1, 3.2). The newer families add: QK-norm per
head (Qwen3, Gemma 3) or over the whole projection (OLMo 2); norms after each sublayer instead of (OLMo 2)
or as well as (Gemma 3) before it; and Gemma 3's scaled embeddings, (1 + w) norms, GELU-tanh MLP, attention
scale from `query_pre_attn_scalar`, and local sliding-window layers with their own rotary base between
global ones.
"""

import functools
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelArgs:
    # Meta's params.json schema ...
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    # ... plus the fields the other families need (all optional, Meta's files omit them).
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
    # Meta's Llama 3.1 files say only use_scaled_rope=true, which means factor 8 over 8192 positions.
    rope_scaling: dict | None = None
    max_seq_len: int = 8192
    sliding_window: int | None = None  # Mistral 7B v0.1: a token sees itself and the previous window - 1
    # Qwen3, OLMo 2, Gemma 3. Absent (the defaults) means Llama.
    qk_norm: str | None = None  # "head": RMSNorm over each head (Qwen3, Gemma 3); "full": over all of q, k (OLMo 2)
    pre_norm: bool = True  # norm each sublayer's input (Llama); OLMo 2 has only post_norm
    post_norm: bool = False  # norm each sublayer's output before the residual add (OLMo 2, Gemma 3)
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), weights stored centred on 0
    norm_fp32_weight: bool = False  # OLMo 2 (and Gemma): the weight multiplies in fp32, one rounding after it
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(dim)
    activation: str = "silu"  # gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    # Gemma 3: per layer "sliding_attention" (local, sees sliding_window tokens, rope_local_theta, no scaling) or
    # "full_attention" (global, rope_theta and rope_scaling). None: every layer alike (sliding iff sliding_window).
    layer_types: list | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be null, 'head' or 'full', got {self.qk_norm!r}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {self.activation!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or \
                    not set(self.layer_types) <= {"sliding_attention", "full_attention"}:
                raise ValueError(f"layer_types must list n_layers={self.n_layers} entries, each "
                                 f"'sliding_attention' or 'full_attention', got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    def is_local(self, layer: int) -> bool:
        """Whether this layer attends within the sliding window (and, for Gemma 3, rotates with the local base)."""
        if self.layer_types is None:
            return bool(self.sliding_window)
        return self.layer_types[layer] == "sliding_attention"

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        try:
            params = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object, found a {type(params).__name__}")
        if "rope_scaling_factor" in params and params.get("use_scaled_rope"):  # newer Meta files
            params.setdefault("rope_scaling", {"factor": params["rope_scaling_factor"]})
        known = {f.name for f in fields(cls)}
        # Meta's files carry inference-only keys (max_batch_size, vision_*, quantization_args): skip them.
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("rope_scaling", "sliding_window"):  # Meta's schema has neither
            if out[key] is None:
                del out[key]
        # The newer families' keys only where they differ from Llama: a Llama params.json stays Meta's schema.
        defaults = ModelArgs(vocab_size=1)
        for key in ("qk_norm", "pre_norm", "post_norm", "norm_unit_offset", "norm_fp32_weight", "scale_embeddings",
                    "activation",
                    "query_pre_attn_scalar", "layer_types", "rope_local_theta"):
            if out[key] == getattr(defaults, key):
                del out[key]
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False, fp32_weight: bool = False):
        super().__init__()
        self.eps, self.unit_offset, self.fp32_weight = eps, unit_offset, fp32_weight or unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # Recomputed in backward from x, which the graph keeps anyway, instead of keeping the normalised
            # x: one [N, dim] tensor less per norm, two per layer. The same ops run again, so the gradients are
            # the same to the bit.
            return torch.utils.checkpoint.checkpoint(self.normalise, x, use_reentrant=False, preserve_rng_state=False)
        return self.normalise(x)

    def normalise(self, x):
        # Normalise in fp32 even for bf16 activations: the mean of squares loses precision otherwise.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.fp32_weight:  # OLMo 2 scales by w, Gemma by (1 + w), in fp32 and round once, as transformers does
            return (xf * ((1.0 if self.unit_offset else 0.0) + self.weight.float())).type_as(x)
        return xf.type_as(x) * self.weight  # Llama: round, then scale


def rope_frequencies(args: ModelArgs, local: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1's `llama3` scaling or `linear` scaling when asked for.
    local: Gemma 3's sliding-window layers, which rotate with their own base and no scaling."""
    d = args.head_dim
    theta = args.rope_local_theta if local and args.rope_local_theta else args.rope_theta
    # fp32 as Meta and transformers compute them: a float64 table would differ from both. On the CPU even when
    # the model is built on the meta device: the table is computed, never loaded.
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu")[: d // 2] / d))
    if not (args.use_scaled_rope or args.rope_scaling) or (local and args.layer_types is not None):
        return freqs
    if (args.rope_scaling or {}).get("rope_type") == "linear":  # Gemma 3's global layers: positions / factor
        return freqs / args.rope_scaling["factor"]
    s = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, **(args.rope_scaling or {})}
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the band in
    # between interpolated smoothly.
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smooth = smooth.clamp(0, 1)
    return (1 - smooth) * freqs / s["factor"] + smooth * freqs


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, H, T, D] by per-position angles [B, 1, T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# -- attention over packed rows ------------------------------------------------------------------------------
@torch.compiler.disable  # a Python loop over this batch's documents: compiled blocks call it as it is
def segment_attention(q, k, v, segments, window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each segment of packed rows, never across: q [B, H, T, D], k and v [B, Hkv, T, D]
    -> [B, H, T, D]. `segments` holds (row, start, end, prefix_start, prefix_end) tuples: the queries of
    row[start:end] see, causally, its keys and, before them, the keys of row[prefix_start:prefix_end] (a prompt
    that several responses share; empty for a plain document). Positions in no segment (padding) get zeros.

    Each segment is one SDPA call on its own slice, so attention costs O(length^2) within documents only and
    stays on SDPA's causal kernel: no [T, T] mask. Shared-prompt keys are concatenated in front of the
    segment's own, which moves the causal diagonal to the bottom right; that (and a sliding window) is the
    only case that spells out a mask, of [end - start, keys] for that segment alone. `scale` is SDPA's (None:
    1/sqrt(D))."""
    B, H, T, D = q.shape
    gqa = k.shape[1] != H
    extra = {} if scale is None else {"scale": scale}
    rows = [[] for _ in range(B)]
    for r, a, b, pa, pb in segments:
        qs, ks, vs = q[r:r + 1, :, a:b], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b]
        if pb > pa:
            ks, vs = torch.cat([k[r:r + 1, :, pa:pb], ks], 2), torch.cat([v[r:r + 1, :, pa:pb], vs], 2)
        n_q, n_k = b - a, ks.shape[2]
        if n_k == n_q and not (window and n_k > window):
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa, **extra)
        else:
            i = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)  # each query's index among the keys
            j = torch.arange(n_k, device=q.device)[None, :]
            mask = (j <= i) & ((i - j < window) if window else True)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa, **extra)
        rows[r].append((a, b, out))
    out_rows = []
    for row in rows:
        pieces, cursor = [], 0
        for a, b, out in sorted(row, key=lambda s: s[0]):
            pieces += [q.new_zeros(1, H, a - cursor, D)] if a > cursor else []
            pieces.append(out)
            cursor = b
        pieces += [q.new_zeros(1, H, T - cursor, D)] if cursor < T else []
        out_rows.append(torch.cat(pieces, 2))
    return torch.cat(out_rows, 0)


class Segments:
    """A packed batch's segment tuples for segment_attention, in an object that a compiled block passes along
    without looking inside: a tuple argument would be guarded on its length and every value (a recompile for
    almost every batch), this only on its type."""

    def __init__(self, tuples: tuple):
        self.tuples = tuples

    def __iter__(self):
        return iter(self.tuples)


def segment_mask_mod(segments: torch.Tensor, rows: int, T: int, window: int | None = None, device=None):
    """segment_attention's rule as a FlexAttention mask_mod(b, h, q, kv) -> may attend: the query's own segment
    up to itself and its segment's shared prefix; with a window, only keys fewer than `window` tokens back in
    the document's own order (the prefix, then the segment). It reads per-position tables of shape [rows, T]
    and the window as a tensor (no window: 2T, beyond any distance in document order), so a compiled kernel
    sees the same code and shapes batch after batch and layer after layer: a global and a sliding-window layer
    differ in data only, and do not recompile each other."""
    table = torch.full((4, rows, T), -1, dtype=torch.long)  # segment id, its start, its prefix's start and end
    for i, (r, a, b, pa, pb) in enumerate(segments.tolist()):
        table[:, r, a:b] = torch.tensor([i, a, pa, pb])[:, None]
    seg, start, pa, pb = table.to(device)
    limit = torch.tensor(window or 2 * T, device=device)

    def mask_mod(b, h, q, kv):
        own = (seg[b, kv] == seg[b, q]) & (kv <= q)
        distance = torch.where(own, q - kv, q - start[b, q] + pb[b, q] - kv)
        return (seg[b, q] >= 0) & (own | ((kv >= pa[b, q]) & (kv < pb[b, q]))) & (distance < limit)
    return mask_mod


def segment_block_mask(segments: torch.Tensor, rows: int, T: int, window: int | None = None, device=None,
                       block: int = 128):
    """segment_mask_mod's FlexAttention BlockMask, built from the segment table. Each (row, query block, key
    block) tile is full (every pair may attend: the kernel skips mask_mod), partial (mask_mod decides pair by
    pair) or empty (skipped). create_block_mask would evaluate mask_mod on all [rows, T, T] pairs (GBs at 16k
    tokens). Here the queries of one segment within one query block are a piece, and a query's keys are two
    intervals (the prefix's, and its own segment's up to itself), so a piece meets, or covers, at most two runs
    of key blocks: O(pieces + rows x blocks^2) small integers. Assumes, as segment_attention does, disjoint
    segments and a prefix outside its segment."""
    seg = segments.detach().to("cpu", torch.long).reshape(-1, 5)
    seg = seg[seg[:, 2] > seg[:, 1]]  # a segment without queries attends nothing
    if len(seg) and (seg[:, 0].max() >= rows or seg[:, 2].max() > T):
        raise ValueError(f"a segment lies outside the batch's {rows} rows of {T} tokens: {seg.tolist()}")
    n = (T + block - 1) // block  # query blocks, and key blocks
    r, a, b, pa, pb = seg.unbind(1)
    first = a // block
    count = (b - 1) // block - first + 1  # the query blocks each segment spans
    idx = torch.repeat_interleave(torch.arange(len(seg)), count)
    qb = first[idx] + torch.arange(len(idx)) - torch.repeat_interleave(count.cumsum(0) - count, count)
    r, a, b, pa, pb = r[idx], a[idx], b[idx], pa[idx], pb[idx]
    q_first, q_last = torch.maximum(a, qb * block), torch.minimum(b, (qb + 1) * block) - 1
    tile = r * n + qb
    W = window or 2 * T  # no window: a bound beyond any distance in document order (< 2T)

    def own(q):  # the keys of its own segment that query q sees, inclusive: from the window's edge to itself
        return torch.maximum(a, q - W + 1), q

    def prefix(q):  # the prefix's keys that q sees: in document order the prefix runs just before the segment
        return torch.maximum(pa, pb + q - a - W + 1), pb - 1

    def blocks(lo, hi, inside=False):  # the key blocks meeting [lo, hi], or lying inside it: first, last
        first, last = ((lo + block - 1) // block, (hi + 1) // block - 1) if inside else (lo // block, hi // block)
        return first, torch.where(lo <= hi, last, first - 1)

    def per_tile(*runs):  # for each tile and key block, how many pieces' runs hold it: [rows * n, n]
        diff = torch.zeros(rows * n, n + 1, dtype=torch.long)
        for first, last in runs:
            keep = first <= last
            diff.index_put_((tile[keep], first[keep]), torch.tensor(1), accumulate=True)
            diff.index_put_((tile[keep], last[keep] + 1), torch.tensor(-1), accumulate=True)
        return diff.cumsum(1)[:, :n]

    # Over a piece's queries, both ends of both intervals only move right. So some query sees the keys from the
    # first query's lower ends to the last query's upper ends, and every query sees those from the last query's
    # lower ends to the first query's upper ends (the prefix's upper end is fixed).
    some = per_tile(blocks(own(q_first)[0], q_last), blocks(*prefix(q_first))) > 0
    (o_lo, _), (p_lo, p_hi), o_hi = own(q_last), prefix(q_last), q_first
    # A prefix that ends where its segment starts: the key block across the seam is seen whole too.
    touch = (o_lo <= o_hi) & (p_lo <= p_hi) & (p_lo <= o_hi + 1) & (o_lo <= p_hi + 1)
    o_lo = torch.where(touch, torch.minimum(o_lo, p_lo), o_lo)  # one run, their hull
    o_hi = torch.where(touch, torch.maximum(o_hi, p_hi), o_hi)
    p_hi = torch.where(touch, p_lo - 1, p_hi)
    every = per_tile(blocks(o_lo, o_hi, inside=True), blocks(p_lo, p_hi, inside=True))
    pieces = torch.zeros(rows * n, dtype=torch.long).index_add_(0, tile, torch.ones_like(tile))
    queries = torch.zeros(rows * n, dtype=torch.long).index_add_(0, tile, q_last - q_first + 1)
    # Full: every piece sees the key block whole, and the pieces fill the query block (padding queries see
    # nothing, and a block reaching past T is never whole, as in create_block_mask).
    full = (every == pieces[:, None]) & (queries == block)[:, None]
    partial = some & ~full

    def ordered(dense):  # [rows * n, n] -> per query block, how many, and their indices first (ascending)
        dense = dense.view(rows, 1, n, n).to(torch.int32)
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1, dtype=torch.int32).to(device), order.to(device, torch.int32)
    from torch.nn.attention.flex_attention import BlockMask
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, seq_lengths=(T, T),
                                    mask_mod=segment_mask_mod(segments, rows, T, window, device))


# Which attention packed rows take: None picks by device (packed_kernel); "flex" or "sdpa" forces one. "flex" on
# the CPU is how the tests run the CUDA path here (torch 2.13 refuses FlexAttention's backward on CPU: the tests
# lift that check, see tests/test_packing.py).
PACKED_KERNEL: str | None = None


def packed_kernel(device: torch.device) -> str:
    """Which attention packed rows take. CUDA: FlexAttention, one compiled kernel per layer that skips the
    blocks no query may see, with the block mask built once per batch. Elsewhere: segment_attention, because
    FlexAttention has no backward on CPU (torch 2.13). PACKED_KERNEL overrides the choice."""
    if PACKED_KERNEL not in (None, "flex", "sdpa"):
        raise ValueError(f"model.PACKED_KERNEL must be None, 'flex' or 'sdpa', got {PACKED_KERNEL!r}")
    return PACKED_KERNEL or ("flex" if device.type == "cuda" else "sdpa")


def flex_attention(q, k, v, block_mask, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled. Inside a compiled block it is traced into the block's own graph (and built by
    the block's backend); called eagerly, it goes through one compiled function of its own, made lazily:
    uncompiled, flex_attention is a reference that materialises every score."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    fn = flex if torch.compiler.is_compiling() else compiled_flex_attention()
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex)


def packed_layouts(segments: torch.Tensor, rows: int, T: int, args: "ModelArgs", device) -> tuple:
    """What the global and the sliding-window layers get for a packed batch: FlexAttention block masks, or
    segment_attention's tuples (which apply the window per layer themselves)."""
    if packed_kernel(device) != "flex":
        tuples = Segments(tuple(map(tuple, segments.tolist())))
        return tuples, tuples
    full = segment_block_mask(segments, rows, T, None, device)
    return full, (segment_block_mask(segments, rows, T, args.sliding_window, device) if args.sliding_window else full)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            # Per head: one weight of head_dim shared by all heads; full: one over all heads' concatenated rows.
            q_dim, k_dim = (args.head_dim, args.head_dim) if args.qk_norm == "head" else \
                (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim)
            self.q_norm = RMSNorm(q_dim, args.norm_eps, args.norm_unit_offset, args.norm_fp32_weight)
            self.k_norm = RMSNorm(k_dim, args.norm_eps, args.norm_unit_offset, args.norm_fp32_weight)
        self.window = args.sliding_window if args.is_local(layer) else None
        self.scale = None if args.query_pre_attn_scalar is None else args.query_pre_attn_scalar ** -0.5
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, start_pos, segments=None):
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":  # OLMo 2: before splitting into heads
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head's vector, before the rotary embedding
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(segments, Segments):
            out = segment_attention(q, k, v, segments, self.window, self.scale)
        elif segments is not None:  # a FlexAttention block mask
            out = flex_attention(q, k, v, segments, self.scale, gqa)
        else:
            causal = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
            if self.scale is not None:
                causal["scale"] = self.scale
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **causal)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.gelu = args.activation == "gelu_tanh"

    def forward(self, x):
        gate, up = self.w1(x), self.w3(x)
        if type(self.w2) is nn.Linear:  # a LoRA-wrapped w2 is a subclass: it gets the product as its input
            return _GatedDown.apply(gate, up, self.w2.weight, self.gelu)
        return self.w2(_activation(gate, self.gelu) * up)


def _activation(x, gelu: bool):
    return F.gelu(x, approximate="tanh") if gelu else F.silu(x)


class _GatedDown(torch.autograd.Function):
    """w2 (act(gate) * up), keeping only gate and up for backward. Autograd would also keep act(gate) and the
    product: two more [N, hidden_dim] tensors per layer, over a quarter of a block's activations. Backward
    recomputes both (two elementwise ops) and then runs autograd's own formulas for the same ops, with the same
    operands in the same order, so the gradients equal the plain module's to the bit (tests/test_model.py
    checks torch.equal, fp32 and bf16 autocast). Under autocast the weight is cast as autocast's F.linear
    would cast it, and its gradient cast back."""

    @staticmethod
    def forward(ctx, gate, up, weight, gelu: bool):
        ctx.save_for_backward(gate, up, weight)
        ctx.gelu = gelu
        with torch.autocast(gate.device.type, enabled=False):
            return F.linear(_activation(gate, gelu) * up, weight.to(gate.dtype))

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        act = _activation(gate, ctx.gelu)
        product = act * up
        g = grad.reshape(-1, grad.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[2]:  # a frozen w2 (LoRA on the other projections) needs none
            grad_weight = g.t().mm(product.reshape(-1, product.shape[-1])).to(weight.dtype)
        grad_product = g.mm(weight.to(gate.dtype)).view(product.shape)
        grad_act, grad_up = grad_product * up, grad_product * act
        if ctx.gelu:
            grad_gate = torch.ops.aten.gelu_backward(grad_act, gate, approximate="tanh")
        else:
            grad_gate = torch.ops.aten.silu_backward(grad_act, gate)
        return grad_gate, grad_up, grad_weight, None


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset, args.norm_fp32_weight)  # noqa: E731
        if args.pre_norm:
            self.attention_norm, self.ffn_norm = norm(), norm()
        if args.post_norm:  # on each sublayer's output, before it joins the residual stream
            self.post_attention_norm, self.post_ffn_norm = norm(), norm()
        self.pre_norm, self.post_norm = args.pre_norm, args.post_norm

    def forward(self, x, cos, sin, mask, start_pos, segments=None):
        if not self.post_norm:  # Llama: the pre-norm residual block, as it always was
            h = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos, segments)
            return h + self.feed_forward(self.ffn_norm(h))
        a = self.attention(self.attention_norm(x) if self.pre_norm else x, cos, sin, mask, start_pos, segments)
        h = x + self.post_attention_norm(a)
        f = self.feed_forward(self.ffn_norm(h) if self.pre_norm else h)
        return h + self.post_ffn_norm(f)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset, args.norm_fp32_weight)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # A plain attribute, not a buffer: model.to(bf16) must not round the rotary frequencies.
        self.inv_freq = rope_frequencies(args)
        self.inv_freq_local = rope_frequencies(args, local=True)  # Gemma 3's local layers; else the same values

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, start_pos: int = 0, labels: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V], or with `labels` [B, T] the fp32 log-probs [B, T] of the labels.

        position_ids [B, T] default to start_pos + arange(T). Attention is causal over each row, or, for
        packed rows, within each of the row's documents: `segments` [S, 5] (row, start, end, prefix_start,
        prefix_end), see segment_attention (on CUDA: FlexAttention, segment_mask_mod); packed batches pass it
        with per-document positions. A boolean `mask` [B, 1, T, T] (True = may attend) serves the tests as the
        dense reference.
        `start_pos` is where these tokens go in the KV cache, when one is set up.
        Training passes labels: the log-probs are computed here, inside the model's forward, because under
        FSDP2 the output projection's weight is only gathered while the root module runs.
        """
        h = self.hidden_states(tokens, position_ids, mask, start_pos, segments)
        if labels is not None:
            return token_logprobs(h, self.output.weight, labels)
        return self.output(h)

    def hidden_states(self, tokens, position_ids=None, mask=None, start_pos: int = 0,
                      segments=None, mask_local=None) -> torch.Tensor:
        """The final normalised hidden states [B, T, dim], before the output projection. A caller's `mask` is
        complete as given; `mask_local`, when given, replaces it on the sliding-window layers (batched
        generation passes the window there)."""
        B, T = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(start_pos, start_pos + T, device=tokens.device).expand(B, T)
        if self.inv_freq.device != tokens.device:
            self.inv_freq = self.inv_freq.to(tokens.device)
            self.inv_freq_local = self.inv_freq_local.to(tokens.device)
        angles = position_ids[:, None, :, None].float() * self.inv_freq  # [B, 1, T, D/2]
        cos, sin = angles.cos(), angles.sin()
        cos_local, sin_local = cos, sin
        if self.args.layer_types is not None:  # Gemma 3: the local layers' own rotary base
            angles = position_ids[:, None, :, None].float() * self.inv_freq_local
            cos_local, sin_local = angles.cos(), angles.sin()
        window = self.args.sliding_window
        mask_local = mask if mask_local is None else mask_local
        segments_local = None
        if segments is not None:  # read once per batch, not once per layer
            segments, segments_local = packed_layouts(segments, B, T, self.args, tokens.device)
        elif mask is None:  # a caller's mask is complete as given (window included)
            queries = torch.arange(start_pos, start_pos + T, device=tokens.device)[:, None]
            keys = torch.arange(start_pos + T, device=tokens.device)[None, :]
            if start_pos > 0:
                # Decoding after a prefill: SDPA's is_causal aligns queries to the first key, so spell out that
                # query i (at position start_pos + i) sees every cached key and the new ones up to itself.
                mask = keys <= queries
            mask_local = mask
            if window and start_pos + T > window:  # only then does the window hide anything
                mask_local = (keys <= queries) & (queries - keys < window)
            if self.args.layer_types is None:  # Mistral: every layer is local
                mask = mask_local
        h = self.tok_embeddings(tokens)
        if self.args.scale_embeddings:  # Gemma: sqrt(dim), rounded to the embedding's dtype as transformers does
            h = h * torch.tensor(self.args.dim ** 0.5, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            if self.args.is_local(i):
                h = layer(h, cos_local, sin_local, mask_local, start_pos, segments_local)
            else:
                h = layer(h, cos, sin, mask, start_pos, segments)
        return self.norm(h)

    # -- inference ---------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int):
        p = self.output.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim,
                                            p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    # -- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "Transformer":
        """Load a native dir, or its `consolidated.00.pth` (a base with adapters stacked on it: lora.load_model)."""
        weights = resolve_weights(path)
        return cls.from_state_dict(native_args(weights), load_state_dict(weights), str(weights), dtype, device)

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state: dict, source: str, dtype=None, device=None) -> "Transformer":
        """The model is built on the meta device and the (memory-mapped) tensors assigned in, so loading costs
        no random init and no second copy. Every tensor must be present with the right shape; anything
        missing or unexpected is an error that names it."""
        with torch.device("meta"):
            model = cls(args)
        check_state_dict(model, state, source)
        model.load_state_dict(state, assign=True, strict=True)
        if args.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            model.output.weight = model.tok_embeddings.weight
        return model.to(device=device, dtype=dtype)


IGNORE_INDEX = -100  # the label of a position that is not trained (as torch's cross_entropy default)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the command lines' names
LOGITS_CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32 logits per chunk


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t]) in fp32 for every position, 0 where labels == IGNORE_INDEX.

    Only positions with a target go through the output projection: prompts and padding, often most of a
    chat or preference batch, cost nothing there. The full fp32 [N, V] logits never exist (128k vocab x 8k
    tokens would be 4 GB): positions go a chunk at a time. Backward needs each chunk's softmax: the last
    chunk keeps its logits and turns them into the gradient in place; the others recompute them.
    """
    B, T, D = hidden.shape
    y = labels.reshape(B * T)
    # At least one position, even when none is trained, so the result stays attached to the graph and
    # backward still runs (and syncs gradients) on a rank whose micro-batch is all filler.
    keep = (y != IGNORE_INDEX).nonzero()[:, 0] if (y != IGNORE_INDEX).any() else y.new_zeros(1)
    h, y_kept = hidden.reshape(B * T, D)[keep], y[keep]
    if torch.is_autocast_enabled(h.device.type):  # the matmul's dtype, made explicit for the recompute
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    rows = max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    chunks = [_TargetLogprob.apply(h[i:i + rows], weight, y_kept[i:i + rows], i + rows >= len(keep))
              for i in range(0, len(keep), rows)]
    # A fresh [B, T] tensor, not a view of a flat one: FSDP2 warns about a root module that returns a view.
    out = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
    return out.index_put((keep // T, keep % T), torch.cat(chunks))


class _TargetLogprob(torch.autograd.Function):
    """log p(y) = logits[y] - logsumexp(logits), logits = h W^T in fp32, per row; 0 where y is ignored.
    Saves only the log-normaliser (and, with keep_logits, the logits themselves): the gradient with respect to
    the logits, g (onehot(y) - softmax), is rebuilt from them in one [N, V] buffer."""

    @staticmethod
    def forward(ctx, h, weight, y, keep_logits: bool):
        with torch.autocast(h.device.type, enabled=False):
            logits = F.linear(h, weight).float()
        lse = logits.logsumexp(-1)
        target = y.clamp(min=0)
        out = (logits.gather(1, target[:, None])[:, 0] - lse).masked_fill(y == IGNORE_INDEX, 0.0)
        ctx.save_for_backward(h, weight, target, (y != IGNORE_INDEX), lse, logits if keep_logits else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, target, trained, lse, logits = ctx.saved_tensors
        if logits is None:
            logits = F.linear(h, weight).float()
        g = grad * trained
        dlogits = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # in place: the saved logits die here
        dlogits[torch.arange(len(target), device=target.device), target] += g
        dlogits = dlogits.to(h.dtype)
        grad_h = dlogits @ weight if ctx.needs_input_grad[0] else None
        grad_w = dlogits.T @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def resolve_weights(path) -> Path:
    """A native dir -> its consolidated.00.pth; a file as is. A Hugging Face dir (or one of its weight files) is
    refused with the convert.py command that makes a native dir of it."""
    path = Path(path)
    hf = path if path.is_dir() else path.parent if path.suffix in (".safetensors", ".bin") else None
    if hf is not None and not (hf / "consolidated.00.pth").is_file() and (hf / "config.json").is_file() \
            and [*hf.glob("*.safetensors"), *hf.glob("pytorch_model*.bin")]:
        import shlex

        native = shlex.quote(f"{hf}_native")
        raise FileNotFoundError(f"{hf} is a Hugging Face checkpoint (config.json and its weights); this repo "
                                f"trains and samples native dirs: run `python convert.py --ckpt_paths "
                                f"{shlex.quote(str(hf))} --output_dir {native}`, then pass {native}")
    if path.is_dir():
        path = path / "consolidated.00.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.name == "consolidated.00.pth" and (path.parent / "consolidated.01.pth").exists():
        raise ValueError(f"{path.parent} holds a model-parallel checkpoint in several consolidated.*.pth "
                         f"files; this repo loads single-file checkpoints (convert the HF version instead)")
    return path


def native_args(weights: Path) -> ModelArgs:
    params = weights.parent / "params.json"
    if not params.is_file():
        raise FileNotFoundError(f"{params} not found: a native checkpoint dir needs params.json beside "
                                f"{weights.name} (convert an HF dir with convert.py)")
    return ModelArgs.from_json(params)


def load_state_dict(path: Path) -> dict:
    """A flat {name: tensor} checkpoint, memory-mapped. weights_only refuses pickled code."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except Exception as e:
        # torch's messages run to a page: keep what names the problem. weights_only's is the text after
        # "WeightsUnpickler error:" (the offending global, or the opcode random bytes decode to); miniz's is
        # its first sentence.
        text = str(e)
        if "WeightsUnpickler error:" in text:
            detail = text.split("WeightsUnpickler error:", 1)[1].strip()
            reason = "WeightsUnpickler error: " + detail.splitlines()[0].split(". ")[0]
        else:
            reason = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
            reason = reason.split(". ")[0]
        raise ValueError(f"cannot load {path} as a tensor-only checkpoint (torch.load weights_only=True; "
                         f"a pickled object or a truncated file?): {reason}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors")
    return state


def release_pages(t: torch.Tensor):
    """Let the kernel take back the pages of a tensor memory-mapped by load_state_dict, once it has been copied
    out: a mapping's pages otherwise stay in the process's resident set until the whole file is unmapped, so a
    process that reads its FSDP shards out of a checkpoint would end up holding the file's share twice. Only for
    pages never written (they are clean: touched again, they come back from the page cache); Linux and macOS,
    a no-op elsewhere."""
    if not t.numel() or not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return
    import ctypes
    import mmap

    start = t.data_ptr() - t.data_ptr() % mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    MADV_DONTNEED = 4
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def check_state_dict(model: nn.Module, state: dict, source: str):
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        expected.pop("output.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        msg = [f"checkpoint {source} does not match params.json:"]
        if missing:
            msg.append(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            msg.append(f"unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if "output.weight" in missing:
            msg.append("(a model with tied embeddings needs tie_word_embeddings: true in params.json)")
        raise ValueError(" ".join(msg))  # one line: it ends a trainer's or converter's run
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"checkpoint {source}: tensor {k} has shape {tuple(state[k].shape)}, "
                             f"params.json implies {tuple(shape)}")
    if model.args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop_ids=(), generator: torch.Generator | None = None):
    """Sample a continuation of one prompt with the KV cache. Yields token ids as they are produced.

    temperature 0 is greedy. The stop token, when reached, is yielded and ends generation: ids are the reply as
    the model produced it (the end-of-turn token is part of a trained reply, and a rollout trains it) and say
    whether it stopped or ran out of max_new_tokens. Text leaves it out: generate.py prints and writes the reply
    without it (generate.split_stop gives those ids and the finish reason, for Python callers too).
    """
    device = model.output.weight.device
    model.setup_cache(1, len(prompt) + max_new_tokens)
    try:
        tokens = torch.tensor([prompt], device=device)
        pos = 0
        for _ in range(max_new_tokens):
            # Only the last position's logits are needed: a long prompt never makes [T, vocab] logits.
            logits = model.output(model.hidden_states(tokens, start_pos=pos)[:, -1])[0].float()
            pos += tokens.shape[1]
            next_id = sample(logits, temperature, top_p, top_k, generator)
            yield next_id
            if next_id in stop_ids:
                return
            tokens = torch.tensor([[next_id]], device=device)
    finally:
        model.clear_cache()


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator=None) -> int:
    """One token id from logits [V]: sample_rows on one row."""
    return int(sample_rows(logits[None], temperature, top_p, top_k, generator)[0])


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator=None) -> torch.Tensor:
    """One token id per row of logits [B, V] -> [B], all rows at once: temperature (0: greedy), then the top_k
    likeliest, then the smallest set whose mass reaches top_p (the likeliest token always stays). The draw is
    the exponential race, argmax p_i / E_i with E_i ~ Exp(1), distributed as the categorical p: each row reads
    its own block of the generator's [B, V] noise, so a row's token depends on its logits and its row index, not
    on how its logits were computed (a prompt prefilled once for G rows samples as G prefills would)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = (logits.float() - logits.max(-1, keepdim=True).values) / temperature  # a tiny temperature: no overflow
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # -log U, U in [0, 1): E in (0, inf], never 0, so a zero probability never wins (0 / inf = 0).
    noise = -torch.rand(probs.shape, generator=generator, device=probs.device).log()
    return (probs / noise).argmax(-1)
