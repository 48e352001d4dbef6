"""Attention of many query rows that skips the key blocks its mask hides: `gemma4_fx::prefill_attention`.

For q: [B, H, M, D], k and v: [B, Hkv, N, D] (H a multiple of Hkv: query head h reads kv head h // (H / Hkv)), and
either `mask`: [B or 1, 1, M or 1, N] (or fewer leading dims, as SDPA broadcasts), True where a key may be attended
(a bool mask, as transformers passes SDPA), or `causal` (SDPA's `is_causal`: key j visible to row i when j <= i), or
neither (every key visible):

    s_ij = scale * (q_i . k_j)          # fp32
    p_i = softmax(s_i over the keys j visible to row i)
    out_i = sum_j p_ij v_j              # p rounded to q.dtype for the product, as flash kernels do; fp32 sums

which is what SDPA's fused kernels compute, up to the order of the fp32 sums.

Why: transformers materialises its causal and sliding-window masks, so SDPA's kernels walk every key block of every
query block. At 26B-A4B widths and 4096 tokens a sliding layer (window 1024) computes all 4096 x 4096 scores, and a
global layer (head dim 512, which flash and cuDNN do not take) gets the memory-efficient kernel: attention took the
largest share of the prefill's GPU time (BENCHMARKS.md, prefill attention). Here
`gemma4_fx::prefill_attention_mask` reads the mask once, copies it into rows that start 16-byte aligned (rows of 772
keys would have the attention read it byte by byte, outside its pipelined loads) and finds, per 16 query rows, the
first and last visible key and the run of keys all of them see; the attention launch (flash attention: a running
max, sum and weighted sum of v over key blocks, in base 2) walks only the key blocks between the first and the last,
and reads the mask tile by tile only at the edges: the blocks inside the shared run (most of a sliding window, all
of a padding mask's visible keys, a causal prompt's blocks below the diagonal) need neither the mask nor a select.
The pass makes the mask ready once per mask node, so that a prompt's layers of one kind share it (and, between CUDA
graphs, each attention is one launch); a call without it makes it first. Head dims above 256 split the output dims
over programs (the grid's third axis): each computes the scores over the whole head dim and accumulates its share
of v, so the accumulator fits in registers.

A query row with no visible key gets zeros from the kernels (SDPA leaves it undefined: its math kernel gives NaN).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .eager_math import INTERPRET
from .gemm import LOG2E, dot, online_softmax_step
from .launch import between_graphs_op, cuda_kernel, launcher, sm_count

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 512
RANGE_ROWS = 16  # query rows per entry of a mask's key ranges
_SCAN_KEYS = 256  # keys per step of `_mask_key_ranges` (a power of 2)
_MASK_ALIGN = 16  # bytes: where the ready mask's rows start
MANY_BLOCKS = 1.5  # (sequence, head, 64 query rows) blocks per SM from which a call takes `config`'s tiles for many
_FITTING: dict = {}  # (device, dtype, head dim, masked, causal, many blocks) -> the tiles that launched on that device


def prefill_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                                causal: bool = False) -> Tensor:
    """The math above in float64 (tests) or fp32, GQA by repeating k and v, rounded once to q.dtype; rows with no
    visible key give zeros."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k, v = (t.to(work).repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.to(work) @ k.transpose(-1, -2)) * scale
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    if mask is not None:
        visible = visible & mask
    scores = scores.masked_fill(~visible, -float("inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)  # no visible key: -inf everywhere, NaN, then zeros
    return (weights @ v).to(q.dtype)


def mask_key_ranges_reference(mask: Tensor) -> Tensor:
    """The key ranges of a bool [B, 1, M, N] mask: int32 [B, ceil(M / RANGE_ROWS), 4], per group of RANGE_ROWS query
    rows (first, end, full_first, full_end): the first key any of them sees and one past the last ((N, 0) where none
    sees one), and the first key all of them see and the first after it that one of them does not ((N, N) where
    they share none): the keys in [full_first, full_end) need no mask for any row of the group."""
    batch, _, rows, keys = mask.shape
    groups = triton.cdiv(rows, RANGE_ROWS)
    grouped = mask.new_zeros(batch, groups * RANGE_ROWS, keys)
    grouped[:, :rows] = mask[:, 0]
    grouped = grouped.view(batch, groups, RANGE_ROWS, keys)
    seen = grouped.any(2)
    real = (torch.arange(groups * RANGE_ROWS, device=mask.device) < rows).view(groups, RANGE_ROWS, 1)
    shared = (grouped | ~real).all(2)  # rows past the mask's see every key
    key = torch.arange(keys, device=mask.device)
    first = torch.where(seen, key, keys).amin(-1)
    end = torch.where(seen, key + 1, 0).amax(-1)
    full_first = torch.where(shared, key, keys).amin(-1)
    full_end = torch.where(~shared & (key >= full_first[..., None]), key, keys).amin(-1)
    return torch.stack([first, end, full_first, full_end], -1).to(torch.int32)


def config(dim: int, masked: bool = False, many_blocks: bool = False) -> dict:
    """Tile sizes per head dim (output dims per program, query and key rows per tile, warps, pipeline stages), where
    `many_blocks` says the call has `MANY_BLOCKS` (sequence, head, 64 query rows) blocks per SM or more: for
    Gemma-4's head dims (its vision encoder's 64, its layers' 256 and 512) the fastest of
    `benchmarks/prefill_attention.py --tiles` on an H200; for 128 and the smaller ones (other models, tests) a rule,
    not measured. Few blocks (a short prompt) keep 64 query
    rows a program, so that the programs fill the SMs; at head dim 512 with a mask they also keep two programs per
    row block instead of four, each of which computes the scores over all 512 dims. With a mask, head dim 512 takes
    half the key rows and one stage more (the mask's tiles take 64 key rows past the H200's 227 KiB of shared
    memory)."""
    block_d = triton.next_power_of_2(dim)
    if block_d <= 64:
        return dict(BLOCK_DV=block_d, BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_DV=block_d, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if block_d <= 256:
        if many_blocks:
            return dict(BLOCK_DV=block_d, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_DV=block_d, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if masked:
        if not many_blocks:
            return dict(BLOCK_DV=256, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1)
        return dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
    return dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def smaller_tiles(tiles: dict) -> dict | None:
    """The next tiles to try where `tiles` need more shared memory than the GPU has: half the key rows down to 16,
    then one pipeline stage fewer; None past the smallest."""
    if tiles["BLOCK_N"] > 16:
        return {**tiles, "BLOCK_N": tiles["BLOCK_N"] // 2}
    if tiles["num_stages"] > 1:
        return {**tiles, "num_stages": tiles["num_stages"] - 1}
    return None


@triton.jit
def _mask_key_ranges(mask_ptr, ready_ptr, ranges_ptr, rows, keys, mask_stride_b, mask_stride_m, ready_stride_b,
                     ready_stride_m, ranges_stride_b, ROWS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """Query rows [g * ROWS, +ROWS) of sequence b: copied to `ready`, and ranges[b, g] as `mask_key_ranges_reference`
    finds them, read CHUNK keys a step in order (the first shared key is found in the step that holds it, its run's
    end in that step or a later one). (`CHUNKS`: the steps, for the interpreter alone, whose loops take no bound
    computed at run time.)"""
    b = tl.program_id(0)
    group = tl.program_id(1)
    m_idx = group * ROWS + tl.arange(0, ROWS)
    in_rows = m_idx < rows
    first = keys
    last = 0
    full_first = keys
    full_end = keys
    for chunk in range(CHUNKS if INTERPRET else tl.cdiv(keys, CHUNK)):
        n_idx = chunk * CHUNK + tl.arange(0, CHUNK)
        in_keys = n_idx < keys
        inside = in_rows[:, None] & in_keys[None, :]
        tile = tl.load(mask_ptr + b * mask_stride_b + m_idx[:, None] * mask_stride_m + n_idx[None, :], mask=inside,
                       other=0)
        tl.store(ready_ptr + b * ready_stride_b + m_idx[:, None] * ready_stride_m + n_idx[None, :], tile, mask=inside)
        seen = tl.max((tile != 0).to(tl.int32), 0)  # per key: one of the rows sees it
        shared = (tl.min(((tile != 0) | ~in_rows[:, None]).to(tl.int32), 0) > 0) & in_keys  # all of them do
        first = tl.minimum(first, tl.min(tl.where(seen > 0, n_idx, keys), 0))
        last = tl.maximum(last, tl.max(tl.where(seen > 0, n_idx + 1, 0), 0))
        full_first = tl.minimum(full_first, tl.min(tl.where(shared, n_idx, keys), 0))
        full_end = tl.minimum(full_end, tl.min(tl.where(~shared & (n_idx >= full_first), n_idx, keys), 0))
    entry = ranges_ptr + b * ranges_stride_b + group * 4
    tl.store(entry, first)
    tl.store(entry + 1, last)
    tl.store(entry + 2, full_first)
    tl.store(entry + 3, full_end)


@triton.jit
def _attend_keys(q, block_n, lo, hi, m, l, acc, k_ptrs, v_ptrs, mask_ptrs, m_idx, in_rows, in_d, in_dv, keys,
                 qk_scale, k_stride_n, v_stride_n, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Key block `block_n` into the online softmax of the program's rows. MASKED: only the keys that exist, lie in
    blocks [lo, hi), the mask shows and causality allows; otherwise every key of the block is visible to every row
    (the caller knows it), and the block costs no mask load and no select."""
    n_idx = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_keys = n_idx < keys
    if MASKED:
        in_keys = in_keys & (block_n >= lo) & (block_n < hi)
    k = tl.load(k_ptrs + n_idx[:, None] * k_stride_n, mask=in_keys[:, None] & in_d[None, :], other=0.0)
    scores = dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), "ieee") * qk_scale
    if MASKED:
        visible = in_rows[:, None] & in_keys[None, :]
        if HAS_MASK:
            visible = tl.load(mask_ptrs + n_idx[None, :], mask=visible, other=0) != 0
        if CAUSAL:
            visible = visible & (n_idx[None, :] <= m_idx[:, None])
        scores = tl.where(visible, scores, -float("inf"))
    v = tl.load(v_ptrs + n_idx[:, None] * v_stride_n, mask=in_keys[:, None] & in_dv[None, :], other=0.0)
    return online_softmax_step(scores, v, m, l, acc)


@triton.jit
def _prefill_attention(q_ptr, k_ptr, v_ptr, mask_ptr, ranges_ptr, out_ptr, qk_scale, rows, keys, heads, kv_heads,
                       q_stride_b, q_stride_h, q_stride_m, k_stride_b, k_stride_h, k_stride_n,
                       v_stride_b, v_stride_h, v_stride_n, mask_stride_b, mask_stride_m, ranges_stride_b,
                       ranges_stride_g, out_stride_b, out_stride_h, out_stride_m,
                       GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCKS_N: tl.constexpr, RANGE_ROWS: tl.constexpr):
    """Query rows [block_m * BLOCK_M, +BLOCK_M) of one (sequence, head), output dims [split * BLOCK_DV, +BLOCK_DV),
    over the key blocks [first, last) that hold the keys `ranges` names for its rows (all of them without a mask; up
    to the diagonal when causal). The blocks [full_lo, full_hi) inside them that every row sees whole (the groups'
    shared keys; below the diagonal) run unmasked; the edges run masked. Under the interpreter, whose loops take no
    bound computed at run time, every block (`BLOCKS_N`), each run the way the compiled kernel runs it."""
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // heads
    head = bh % heads
    kv_head = head // GROUP
    m_idx = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = m_idx < rows
    d = tl.arange(0, BLOCK_D)
    in_d = d < D  # dims past D load zeros: they add nothing to the scores
    dv = split * BLOCK_DV + tl.arange(0, BLOCK_DV)
    in_dv = dv < D
    q = tl.load(q_ptr + b * q_stride_b + head * q_stride_h + m_idx[:, None] * q_stride_m + d[None, :],
                mask=in_rows[:, None] & in_d[None, :], other=0.0)
    first = 0
    last = tl.cdiv(keys, BLOCK_N)
    full_lo = 0
    full_hi = keys // BLOCK_N
    if HAS_MASK:  # the key ranges of the block's groups of RANGE_ROWS rows, as key blocks
        group = block_m * (BLOCK_M // RANGE_ROWS) + tl.arange(0, BLOCK_M // RANGE_ROWS)
        in_groups = group * RANGE_ROWS < rows
        entry = ranges_ptr + b * ranges_stride_b + group * ranges_stride_g
        first = tl.min(tl.load(entry, mask=in_groups, other=keys), 0) // BLOCK_N
        last = tl.cdiv(tl.max(tl.load(entry + 1, mask=in_groups, other=0), 0), BLOCK_N)
        full_lo = tl.cdiv(tl.max(tl.load(entry + 2, mask=in_groups, other=0), 0), BLOCK_N)
        full_hi = tl.min(tl.load(entry + 3, mask=in_groups, other=keys), 0) // BLOCK_N
    if CAUSAL:
        last = tl.minimum(last, tl.cdiv((block_m + 1) * BLOCK_M, BLOCK_N))
        full_hi = tl.minimum(full_hi, (block_m * BLOCK_M + 1) // BLOCK_N)  # keys <= the block's first row
    full_lo = tl.minimum(tl.maximum(full_lo, first), last)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), last)
    k_ptrs = k_ptr + b * k_stride_b + kv_head * k_stride_h + d[None, :]
    v_ptrs = v_ptr + b * v_stride_b + kv_head * v_stride_h + dv[None, :]
    mask_ptrs = mask_ptr + b * mask_stride_b + m_idx[:, None] * mask_stride_m
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if INTERPRET:
        for block_n in range(BLOCKS_N):
            if (block_n >= full_lo) & (block_n < full_hi):
                m, l, acc = _attend_keys(q, block_n, first, last, m, l, acc, k_ptrs, v_ptrs, mask_ptrs, m_idx,
                                         in_rows, in_d, in_dv, keys, qk_scale, k_stride_n, v_stride_n, BLOCK_N,
                                         HAS_MASK, CAUSAL, False)
            else:
                m, l, acc = _attend_keys(q, block_n, first, last, m, l, acc, k_ptrs, v_ptrs, mask_ptrs, m_idx,
                                         in_rows, in_d, in_dv, keys, qk_scale, k_stride_n, v_stride_n, BLOCK_N,
                                         HAS_MASK, CAUSAL, True)
    else:
        for block_n in range(first, full_lo):
            m, l, acc = _attend_keys(q, block_n, first, last, m, l, acc, k_ptrs, v_ptrs, mask_ptrs, m_idx, in_rows,
                                     in_d, in_dv, keys, qk_scale, k_stride_n, v_stride_n, BLOCK_N, HAS_MASK, CAUSAL,
                                     True)
        for block_n in range(full_lo, full_hi):
            m, l, acc = _attend_keys(q, block_n, first, last, m, l, acc, k_ptrs, v_ptrs, mask_ptrs, m_idx, in_rows,
                                     in_d, in_dv, keys, qk_scale, k_stride_n, v_stride_n, BLOCK_N, HAS_MASK, CAUSAL,
                                     False)
        for block_n in range(full_hi, last):
            m, l, acc = _attend_keys(q, block_n, first, last, m, l, acc, k_ptrs, v_ptrs, mask_ptrs, m_idx, in_rows,
                                     in_d, in_dv, keys, qk_scale, k_stride_n, v_stride_n, BLOCK_N, HAS_MASK, CAUSAL,
                                     True)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # no visible key: acc is 0
    tl.store(out_ptr + b * out_stride_b + head * out_stride_h + m_idx[:, None] * out_stride_m + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_rows[:, None] & in_dv[None, :])


def prefill_attention_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                             causal: bool = False, mask_ranges: Tensor | None = None, *, tiles: dict | None = None,
                             out: Tensor | None = None) -> Tensor:
    """Launch the attention into `out` (a new tensor like q by default), making the mask ready first unless
    `mask_ranges` says it is (`prefill_attention_mask`); `tiles` overrides `config(dim)` (tests, tuning). Without
    `tiles`, tiles that do not fit the GPU's shared memory give way to `smaller_tiles` (once per kind of call: what
    fits is remembered); if none fits, SDPA computes it, with a warning."""
    check_inputs(q, k, v, mask, mask_ranges)
    if mask is not None and mask_ranges is None:
        mask, mask_ranges = prefill_attention_mask_triton(mask)
    if tiles is not None:
        return _launch(q, k, v, mask, mask_ranges, scale, causal, tiles, out)
    batch, heads, rows, dim = q.shape
    many_blocks = batch * heads * triton.cdiv(rows, 64) >= MANY_BLOCKS * sm_count(q.device)
    kind = (q.device, q.dtype, dim, mask is not None, causal, many_blocks)
    tiles = _FITTING.get(kind) or config(dim, mask is not None, many_blocks)
    while tiles is not None:
        try:
            result = _launch(q, k, v, mask, mask_ranges, scale, causal, tiles, out)
        except OutOfResources:
            tiles = smaller_tiles(tiles)
            continue
        _FITTING[kind] = tiles
        return result
    warnings.warn(f"prefill_attention: no tiles fit {q.device}'s shared memory for head dim {dim}; SDPA "
                  "computes this call")
    result = _sdpa(q, k, v, mask, scale, causal)
    return result if out is None else out.copy_(result)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    mask = None if mask is None else mask[..., :k.shape[2]]  # a ready mask's rows are padded
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                            enable_gqa=True).contiguous()  # as the fake says


def sdpa_additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive mask SDPA makes of a bool mask at every call (0 where True, -inf where False, in the query's
    dtype): made once, it serves every SDPA call over `mask` with the same result."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask.logical_not(), float("-inf"))


def _launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ranges: Tensor | None, scale: float, causal: bool,
            tiles: dict, out: Tensor | None) -> Tensor:
    batch, heads, rows, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    broadcast = mask is None or mask.shape[0] == 1  # one mask for every sequence
    one_row = mask is not None and mask.shape[2] == 1  # one mask row for every query row
    block_d = triton.next_power_of_2(dim)
    launcher(_prefill_attention)[(triton.cdiv(rows, block_m), batch * heads, triton.cdiv(dim, tiles["BLOCK_DV"]))](
        q, k, v, q if mask is None else mask, q if ranges is None else ranges, out, float(scale) * LOG2E, rows, keys,
        heads, kv_heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), 0 if broadcast else mask.stride(0), 0 if mask is None or one_row else mask.stride(2),
        0 if broadcast else ranges.stride(0), 0 if mask is None or one_row else ranges.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=heads // kv_heads, D=dim, BLOCK_D=block_d, BLOCK_DV=tiles["BLOCK_DV"], BLOCK_M=block_m,
        BLOCK_N=block_n, HAS_MASK=mask is not None, CAUSAL=causal,
        BLOCKS_N=triton.cdiv(keys, block_n) if INTERPRET else 0,  # a constant only where the interpreter needs it
        RANGE_ROWS=RANGE_ROWS, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return out


def _shape_4d(mask: Tensor) -> tuple:
    return (1,) * (4 - mask.dim()) + tuple(mask.shape)  # SDPA broadcasts a mask from the left


def _as_4d(mask: Tensor) -> Tensor:
    return mask.view(_shape_4d(mask))


def ready_width(keys):
    """The row length of a ready mask over `keys` keys: rows that start 16-byte aligned."""
    return (keys + _MASK_ALIGN - 1) // _MASK_ALIGN * _MASK_ALIGN


def _ready_shapes(shape: tuple) -> tuple[tuple, tuple]:
    """The shapes of a ready mask and of its key ranges, for a mask of 4-d `shape` (symbolic sizes too)."""
    batch, _, rows, keys = shape
    return (batch, 1, rows, ready_width(keys)), (batch, triton.cdiv(rows, RANGE_ROWS), 4)


def _check_mask(mask: Tensor) -> None:
    if mask.dtype != torch.bool or not 2 <= mask.dim() <= 4 or _shape_4d(mask)[1] != 1:
        raise ValueError(f"prefill_attention_mask: mask must be a bool [B, 1, M, N] tensor (leading dims may be left "
                         f"out); got {mask.dtype} {tuple(mask.shape)}")


def prefill_attention_mask_triton(mask: Tensor) -> tuple[Tensor, Tensor]:
    """`prefill_attention_mask` as one Triton launch, on any device (the interpreter on CPU)."""
    _check_mask(mask)
    mask = _as_4d(mask)
    batch, _, rows, keys = mask.shape
    ready_shape, ranges_shape = _ready_shapes(mask.shape)
    ready = mask.new_empty(ready_shape)  # the padding is never read
    ranges = mask.new_empty(ranges_shape, dtype=torch.int32)
    launcher(_mask_key_ranges)[(batch, ranges.shape[1])](
        mask, ready, ranges, rows, keys, mask.stride(0), mask.stride(2), ready.stride(0), ready.stride(2),
        ranges.stride(0), ROWS=RANGE_ROWS, CHUNK=_SCAN_KEYS,
        CHUNKS=triton.cdiv(keys, _SCAN_KEYS) if INTERPRET else 0,  # a constant only where the interpreter needs it
        num_warps=4)
    return ready, ranges


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mask_ranges: Tensor | None = None) -> None:
    """A ValueError naming the first argument the kernels cannot take."""
    if q.dim() != 4 or q.dtype not in DTYPES or q.stride(-1) != 1:
        raise ValueError(f"prefill_attention: q must be [batch, heads, rows, dim] with unit last stride, dtype in "
                         f"{DTYPES}; got shape {tuple(q.shape)}, stride {q.stride()}, dtype {q.dtype}")
    batch, heads, rows, dim = q.shape
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"prefill_attention: q's head dim must be at most {MAX_HEAD_DIM}, got {dim}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[3] != dim or t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError(f"prefill_attention: {name} must be [{batch}, kv_heads, keys, {dim}] {q.dtype} with "
                             f"unit last stride; got shape {tuple(t.shape)}, stride {t.stride()}, dtype {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"prefill_attention: v's shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if heads % k.shape[1]:
        raise ValueError(f"prefill_attention: q's {heads} heads must be a multiple of k's {k.shape[1]}")
    keys = k.shape[2]
    if mask is None:
        if mask_ranges is not None:
            raise ValueError("prefill_attention: mask_ranges given without a mask")
        return
    shape = _shape_4d(mask)
    width = keys if mask_ranges is None else ready_width(keys)  # a ready mask's rows are padded
    if mask.dtype != torch.bool or not 2 <= mask.dim() <= 4 or shape[0] not in (1, batch) or shape[1] != 1 \
            or shape[2] not in (1, rows) or shape[3] != width:
        ready = "; with mask_ranges, a ready mask: keys padded to 16" if mask_ranges is not None else ""
        raise ValueError(f"prefill_attention: mask must be None or a bool [{batch} or 1, 1, {rows} or 1, {width}] "
                         f"tensor (leading dims may be left out{ready}); got {mask.dtype} {tuple(mask.shape)}")
    expected = _ready_shapes(shape)[1]
    if mask_ranges is not None and (mask_ranges.dtype != torch.int32 or tuple(mask_ranges.shape) != expected
                                    or mask.dim() != 4 or mask.stride(-1) != 1):
        raise ValueError(f"prefill_attention: mask_ranges must be the int32 {list(expected)} ranges that "
                         f"prefill_attention_mask made with its mask; got {mask_ranges.dtype} "
                         f"{tuple(mask_ranges.shape)} with a {mask.dim()}-d mask")


@torch.library.custom_op("gemma4_fx::prefill_attention_mask", mutates_args=())
def prefill_attention_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(the mask as a bool [B, 1, M, ready_width(N)] tensor, its rows padded, and its key ranges
    `mask_key_ranges_reference`): what `prefill_attention` reads of a bool mask, made once for all the attentions
    over it. On CUDA one Triton launch (`prefill_attention_mask_triton`), captured in the graphs."""
    _check_mask(mask)
    mask = _as_4d(mask)
    ready = mask.new_zeros(_ready_shapes(mask.shape)[0])
    ready[..., :mask.shape[3]] = mask
    return ready, mask_key_ranges_reference(mask)


cuda_kernel(prefill_attention_mask)(prefill_attention_mask_triton)


@prefill_attention_mask.register_fake
def _(mask):
    ready_shape, ranges_shape = _ready_shapes(_shape_4d(mask))
    return mask.new_empty(ready_shape), mask.new_empty(ranges_shape, dtype=torch.int32)


@between_graphs_op("gemma4_fx::prefill_attention")
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False,
                      mask_ranges: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T over the visible keys) v for many query rows: on CUDA the block-skipping Triton
    launch (`mask_ranges`: the mask was made ready by `prefill_attention_mask`); elsewhere SDPA itself, which is what
    the graph computed there, to the bit (the fp32 reference would move bf16 results by an ulp, enough to flip a tiny
    MoE model's experts on a CPU test)."""
    if q.is_cuda:
        return prefill_attention_triton(q, k, v, mask, scale, causal, mask_ranges)  # checks its inputs
    check_inputs(q, k, v, mask, mask_ranges)
    return _sdpa(q, k, v, mask, scale, causal)


@prefill_attention.register_fake
def _(q, k, v, mask, scale, causal=False, mask_ranges=None):
    check_inputs(q, k, v, mask, mask_ranges)
    return q.new_empty(q.shape)
