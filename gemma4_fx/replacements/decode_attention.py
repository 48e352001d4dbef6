"""Attention of one query token per sequence over a KV cache, split along the keys: `gemma4_fx::decode_attention`.

For q: [B, H, 1, D], k and v: [B, Hkv, S, D] (H a multiple of Hkv: query head h reads kv head h // (H / Hkv)), and
`mask`: [B, 1, 1, S], True where a key may be attended (a bool mask, as transformers passes SDPA), or None where
every key is (transformers passes none to a full-attention layer over a dynamic cache):

    s_j = scale * (q . k_j)            # fp32
    p = softmax(s over the keys j with mask_j)
    out = sum_j p_j v_j                # fp32, rounded once to q.dtype

which is what SDPA's fused kernels compute, up to the order of the fp32 sums.

Why: at decode, SDPA runs kernels built for many query rows. A Gemma-4 global layer (head dim 512) gets the
memory-efficient kernel, a few programs per call that each walk the whole cache: 112 us for the 2 MB an E2B
global layer reads (H200; BENCHMARKS.md, decode step). Here the keys are split over enough programs to fill the GPU
(flash-decoding): grid (B * Hkv, SPLITS); each program takes the H / Hkv query heads of one kv head, so the cache is
read once, not once per query head, and keeps a running max, sum and weighted sum of v over its keys (online
softmax, in base 2). A second launch combines the splits: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.

A key the mask hides contributes exactly nothing; a split with no visible key has m = -inf and weight 0. A query
with no visible key at all is undefined (SDPA gives NaN); decode always sees its own token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemm import LOG2E, dot, online_softmax_step
from .launch import between_graphs_op, launcher, sm_count

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUP = 16  # query heads per kv head: one tl.dot tile of rows


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The math above in float64 (tests) or fp32, GQA by repeating k and v, rounded once to q.dtype."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k, v = (t.to(work).repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.to(work) @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -float("inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def splits(batch_kv_heads: int, keys: int, block: int, sms: int) -> int:
    """Key splits per (sequence, kv head): enough programs to fill `sms`, each at least one BLOCK of keys."""
    return max(1, min(triton.cdiv(sms, batch_kv_heads), triton.cdiv(keys, block)))


@triton.jit
def _decode_attention_split(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, stats_ptr, qk_scale, keys, heads, kv_heads,
                  q_stride_b, q_stride_h, k_stride_b, k_stride_h, k_stride_s, v_stride_b, v_stride_h, v_stride_s,
                  mask_stride_b, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, KEYS_PER_SPLIT: tl.constexpr, HAS_MASK: tl.constexpr):
    """Keys [split * KEYS_PER_SPLIT, +KEYS_PER_SPLIT) of one (sequence, kv head) against its GROUP query heads:
    acc[bh, split, g, :] = sum_j 2^(s_j - m) v_j, stats[bh, split, g] = (m, l = sum_j 2^(s_j - m)), with s_j the
    scores in base 2 (`qk_scale`: scale * log2(e); `online_softmax_step`)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    kv_head = bh % kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D  # dims past D load zeros: they add nothing to the scores and are not stored
    q_rows = kv_head * GROUP + tl.minimum(g, GROUP - 1)  # rows past the group repeat its last head; not stored
    q = tl.load(q_ptr + b * q_stride_b + q_rows[:, None] * q_stride_h + d[None, :], mask=in_d[None, :], other=0.0)
    m = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for block in range(KEYS_PER_SPLIT // BLOCK_S):
        s_idx = split * KEYS_PER_SPLIT + block * BLOCK_S + tl.arange(0, BLOCK_S)
        inside = s_idx < keys
        if HAS_MASK:
            visible = tl.load(mask_ptr + b * mask_stride_b + s_idx, mask=inside, other=0) != 0
        else:
            visible = inside
        k = tl.load(k_ptr + b * k_stride_b + kv_head * k_stride_h + s_idx[:, None] * k_stride_s + d[None, :],
                    mask=inside[:, None] & in_d[None, :], other=0.0)
        scores = dot(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_S], tl.float32), "ieee") * qk_scale
        scores = tl.where(visible[None, :], scores, -float("inf"))
        v = tl.load(v_ptr + b * v_stride_b + kv_head * v_stride_h + s_idx[:, None] * v_stride_s + d[None, :],
                    mask=inside[:, None] & in_d[None, :], other=0.0)
        m, l, acc = online_softmax_step(scores, v, m, l, acc)
    row = (bh * SPLITS + split) * BLOCK_G + g
    tl.store(acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc)
    tl.store(stats_ptr + row * 2, m)
    tl.store(stats_ptr + row * 2 + 1, l)


@triton.jit
def _decode_attention_combine(acc_ptr, stats_ptr, out_ptr, heads, kv_heads, out_stride_b, out_stride_h,
                              GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                              SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """out[b, h] = sum over splits of 2^(m_s - M) acc_s / sum of 2^(m_s - M) l_s, rounded to out's dtype."""
    bh_q = tl.program_id(0)
    b = bh_q // heads
    head = bh_q % heads
    bh = b * kv_heads + head // GROUP
    g = head % GROUP
    s = tl.arange(0, BLOCK_SPLITS)
    real = s < SPLITS
    rows = (bh * SPLITS + s) * BLOCK_G + g
    m = tl.load(stats_ptr + rows * 2, mask=real, other=-float("inf"))
    l = tl.load(stats_ptr + rows * 2 + 1, mask=real, other=0.0)
    top = tl.max(m, 0)
    weight = tl.where(m == -float("inf"), 0.0, tl.exp2(m - top))
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + rows[:, None] * BLOCK_D + d[None, :], mask=real[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(out_ptr + b * out_stride_b + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def decode_attention_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, *,
                            block_s: int | None = None, split_count: int | None = None,
                            out: Tensor | None = None) -> Tensor:
    """Launch the split and combine kernels into `out` (a new tensor like q by default); `block_s` and
    `split_count` override the defaults (tests)."""
    check_inputs(q, k, v, mask)
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_g = max(16, triton.next_power_of_2(group))
    block_s = block_s or (32 if dim > 256 else 64)
    count = split_count or splits(batch * kv_heads, keys, block_s, sm_count(q.device))
    keys_per_split = triton.cdiv(triton.cdiv(keys, count), block_s) * block_s
    count = triton.cdiv(keys, keys_per_split)
    block_d = triton.next_power_of_2(dim)
    acc = torch.empty((batch * kv_heads, count, block_g, block_d), dtype=torch.float32, device=q.device)
    stats = torch.empty((batch * kv_heads, count, block_g, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if mask is not None:
        mask = mask.expand(batch, 1, 1, keys).reshape(batch, keys)  # a view unless the mask is shared
    launcher(_decode_attention_split)[(batch * kv_heads, count)](
        q, k, v, q if mask is None else mask, acc, stats, float(scale) * LOG2E, keys, heads, kv_heads, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        0 if mask is None else mask.stride(0), GROUP=group, BLOCK_G=block_g, D=dim, BLOCK_D=block_d, BLOCK_S=block_s,
        SPLITS=count, KEYS_PER_SPLIT=keys_per_split, HAS_MASK=mask is not None, num_warps=4 if dim <= 256 else 8)
    launcher(_decode_attention_combine)[(batch * heads,)](
        acc, stats, out, heads, kv_heads, out.stride(0), out.stride(1), GROUP=group, BLOCK_G=block_g, D=dim,
        BLOCK_D=block_d, SPLITS=count, BLOCK_SPLITS=triton.next_power_of_2(count), num_warps=4)
    return out


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """A ValueError naming the first argument the kernels cannot take."""
    if q.dim() != 4 or q.shape[2] != 1 or q.dtype not in DTYPES or q.stride(-1) != 1:
        raise ValueError(f"decode_attention: q must be [batch, heads, 1, dim] with unit last stride, dtype in "
                         f"{DTYPES}; got shape {tuple(q.shape)}, stride {q.stride()}, dtype {q.dtype}")
    batch, heads, _, dim = q.shape
    if not 1 <= dim <= 512:
        raise ValueError(f"decode_attention: q's head dim must be at most 512, got {dim}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[3] != dim or t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} must be [{batch}, kv_heads, keys, {dim}] {q.dtype} with unit "
                             f"last stride; got shape {tuple(t.shape)}, stride {t.stride()}, dtype {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"decode_attention: v's shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    kv_heads, keys = k.shape[1], k.shape[2]
    if heads % kv_heads or heads // kv_heads > MAX_GROUP:
        raise ValueError(f"decode_attention: q's {heads} heads must be a multiple of k's {kv_heads}, at most "
                         f"{MAX_GROUP} per kv head")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, batch)
                             or tuple(mask.shape[1:]) != (1, 1, keys)):
        raise ValueError(f"decode_attention: mask must be None or a bool [{batch} or 1, 1, 1, {keys}] tensor; got "
                         f"{mask.dtype} {tuple(mask.shape)}")


@between_graphs_op("gemma4_fx::decode_attention")
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(scale * q k^T over the visible keys) v for one query token per sequence: on CUDA the split-KV Triton
    launches, elsewhere the reference."""
    if q.is_cuda:
        return decode_attention_triton(q, k, v, mask, scale)  # checks its inputs
    check_inputs(q, k, v, mask)
    return decode_attention_reference(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    check_inputs(q, k, v, mask)
    return q.new_empty(q.shape)
