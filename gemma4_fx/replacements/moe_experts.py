"""The Gemma-4 MoE experts (`Gemma4TextExperts.forward`) as four Triton launches with no host sync.

For x: [T, H], top_k_index and top_k_weights: [T, K], gate_up_proj: [E, 2N, H] and down_proj: [E, H, N], every
(token t, slot k) pair with e = top_k_index[t, k] computes what transformers' "grouped_mm" and "batched_mm" experts
compute, rounding where they round:

    gate, up = (x[t] @ gate_up_proj[e].T).chunk(2)      # fp32 accumulation, rounded to x.dtype
    a = gelu_tanh(gate) * up                            # gelu in fp32 on the rounded gate; each op rounded
    y = a @ down_proj[e].T                              # fp32 accumulation, rounded to x.dtype
    out[t] = sum over k of y * top_k_weights[t, k]      # product in the promoted dtype, summed in fp32, rounded

The launches, each of a size fixed by (T, K, E, N, H), so that a CUDA graph replays them for any routing:

1. route: a stable counting sort of the P = T*K pairs by expert (sorted row -> pair), and a table of M-blocks
   (expert, first row, end row), BLOCK_M sorted rows of one expert each. There are at most
   min(P, cdiv(P, BLOCK_M) + min(E, P)) blocks; the GEMM grids are sized by that bound and their programs past the
   real count return at once. Above one chunk of pairs a first launch counts each chunk's experts.
2. gate_up: a grouped GEMM over (M-block, N-block): the block's gathered x rows against BLOCK_N gate rows and the
   matching BLOCK_N up rows of its expert, gelu-tanh(gate) * up in the epilogue; writes a [P, N] in sorted order.
3. down: a grouped GEMM of a's rows against down_proj[e]; writes y [P, H] (x.dtype) at each pair's own row.
4. combine: out[t] = the sum over k of y[t, k] * w[t, k], in CUDA eager's order (that of `.sum(dim=1)`), rounded
   once. Applying the weight here rather than in the down epilogue moves y in x.dtype, half the bytes of fp32
   products, for the same arithmetic.

Two regimes, chosen by P (T is static in a compiled graph): up to STREAM_MAX_PAIRS pairs the weights dominate, so
BLOCK_M covers every row an expert can get (T) and each touched expert's weights are read once, split along N over
many programs to keep all SMs streaming, the launches chained by programmatic dependent launch (Hopper); above that
the GEMMs are tiled with configs tuned per tokens bucket (`moe_experts_configs.py`, `benchmarks/moe.py --tune`),
GROUP_M M-blocks of one expert in a row sharing weights in L2, and an expert's last block, when at most a quarter or
half full, computed as a quarter- or half-height tile (and gate_up's last N-block, when at most half of N, as a
half-width one: N = 704 in 128-column blocks). On Hopper and later the tiled GEMMs read the weights, and down its
activation rows, through tensor descriptors (TMA: the copy engine fills shared memory; 6-8% faster GEMMs at 4096
tokens on an H200, the same bits); x's gathered rows stay pointer loads.

Against eager (same device), everything but the GEMMs' accumulation order is eager's arithmetic: the same roundings,
ATen's gelu formula with the same tanhf, the weight product, and the sum's order. So results differ only where a
GEMM's other order flips a rounding (by an ulp, then carried through the later steps). The tensor-core GEMMs add
along K in order, as the CUTLASS grouped GEMM of HF's "grouped_mm" does: on an H200 the op was bitwise that forward at
1 to 4096 tokens (against per-expert cuBLAS mm, which splits K at few rows, 96-100% of elements). Ids outside [0, E)
are not checked on the device: as in eager, the result is then undefined.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from .gemm import dot, gelu_tanh_mul
from .launch import tuned_gpus
from .moe_experts_configs import CONFIGS
from .eager_math import mul_rn
from .rows import DTYPES

MAX_EXPERTS = 1024  # the route kernel holds per-expert counts in registers
MAX_TOP_K = 32  # the combine kernel unrolls over k
STREAM_MAX_PAIRS = 64  # up to this many (token, expert) pairs, the weight-streaming regime


def supports(hidden: int, intermediate: int, num_experts: int, top_k: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels handle experts of this size and activation dtype."""
    return (dtype in DTYPES and hidden >= 1 and intermediate >= 1 and 1 <= top_k <= num_experts
            and num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K)


# --------------------------------------------------------------------------------------------------------------------
# The eager reference


def moe_experts_reference(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                          down_proj: Tensor) -> Tensor:
    """The eager ops of transformers' `grouped_mm_experts_forward`, each expert's GEMM the `torch.mm` of its
    `_grouped_mm_fallback` (on CPU bitwise what `torch.nn.functional.grouped_mm` gives). One host sync."""
    tokens, top_k = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    ends = torch.searchsorted(expert_ids, torch.arange(1, gate_up_proj.shape[0] + 1, device=x.device)).tolist()
    gate, up = _grouped_mm(x[perm // top_k], gate_up_proj, ends).chunk(2, dim=-1)
    y = _grouped_mm(F.gelu(gate, approximate="tanh") * up, down_proj, ends)
    weighted = torch.empty((perm.numel(), y.shape[1]), dtype=torch.promote_types(y.dtype, top_k_weights.dtype),
                           device=x.device)
    weighted[perm] = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    return weighted.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)


def moe_experts_loop_reference(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                               down_proj: Tensor) -> Tensor:
    """The ops of transformers' "eager" experts (`Gemma4TextExperts.forward` as written): a loop over the experts
    the tokens hit, by ascending id, each adding its rows' weighted outputs into a zeroed x.dtype output with
    `index_add_`; ids >= E (expert-parallel sentinels) are skipped. A host sync per expert."""
    out = torch.zeros_like(x)
    for expert in top_k_index.unique().tolist():
        if expert >= gate_up_proj.shape[0]:
            continue
        slot, token = torch.where(top_k_index.T == expert)  # eager's rows: by slot, then by token
        gate, up = F.linear(x[token], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.gelu(gate, approximate="tanh") * up, down_proj[expert])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _grouped_mm(rows: Tensor, weights: Tensor, ends: list[int]) -> Tensor:
    out = torch.zeros((rows.shape[0], weights.shape[1]), dtype=rows.dtype, device=rows.device)
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            torch.mm(rows[start:end], weights[expert].T, out=out[start:end])
        start = end
    return out


# --------------------------------------------------------------------------------------------------------------------
# Block configs


class GemmConfig(NamedTuple):
    block_n: int
    block_k: int
    group_m: int  # M-blocks visited in a row per N-block (tiled regime): one expert's blocks share weights in L2
    num_warps: int
    num_stages: int


class Config(NamedTuple):
    block_m: int  # shared by both GEMMs: they walk the same block table
    gate_up: GemmConfig
    down: GemmConfig


def default_config(tokens: int, top_k: int, experts: int, dtype: torch.dtype) -> Config:
    """Tiles that fit any CUDA GPU's shared memory (3 stages under 100 KB): small M and N in the streaming regime,
    BLOCK_M near the mean rows per expert above it. fp32 halves BLOCK_K."""
    k = 64 if dtype == torch.float32 else 128
    if tokens * top_k <= STREAM_MAX_PAIRS:
        return Config(16, GemmConfig(32, k, 1, 4, 3), GemmConfig(64, k, 1, 4, 3))
    block_m = min(64, max(16, triton.next_power_of_2(tokens * top_k // experts)))
    return Config(block_m, GemmConfig(64, k // 2, 8, 4, 3), GemmConfig(64, k // 2, 8, 4, 3))


def tuned_config(tokens: int, top_k: int, experts: int, inter: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> Config:
    """The table's config for the nearest tokens bucket of this shape on this GPU, else `default_config`."""
    gpu = tuned_gpus(device)
    entries = {bucket: value for (bucket, *shape, name), value in CONFIGS.items()
               if tuple(shape) == (experts, inter, hidden) and name in gpu}
    if dtype == torch.float32 or not entries:
        return default_config(tokens, top_k, experts, dtype)
    bucket = min(entries, key=lambda b: abs(math.log2(b) - math.log2(tokens)))
    block_m, gate_up, down = entries[bucket]
    return Config(block_m, GemmConfig(*gate_up), GemmConfig(*down))


# --------------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _route_count_kernel(ids_ptr, counts_ptr, pairs, experts, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Each chunk's pairs per expert, for the route kernel's prefix over chunks."""
    chunk = tl.program_id(0)
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    expert = tl.load(ids_ptr + pair, mask=pair < pairs, other=0).to(tl.int32)
    tl.store(counts_ptr + chunk * NUM_BINS + tl.arange(0, NUM_BINS),
             tl.histogram(expert, NUM_BINS, mask=(pair < pairs) & (expert < experts)))


@triton.jit
def _route_kernel(ids_ptr, counts_ptr, order_ptr, table_ptr, pairs, experts, max_blocks, NUM_BINS: tl.constexpr,
                  CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                  TABLE_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """One chunk of pairs to its rows in expert order (stable), and a share of the M-block table. Pairs of ids >= E
    (expert-parallel sentinels) get no row."""
    if PDL:
        gdc_launch_dependents()
    chunk = tl.program_id(0)
    slot = tl.arange(0, CHUNK)
    pair = chunk * CHUNK + slot
    expert = tl.load(ids_ptr + pair, mask=pair < pairs, other=0).to(tl.int32)
    valid = (pair < pairs) & (expert < experts)
    here = tl.histogram(expert, NUM_BINS, mask=valid)
    if NUM_CHUNKS == 1:
        counts = here
        before = tl.zeros([NUM_BINS], tl.int32)
    else:
        chunks = tl.arange(0, CHUNKS_PAD)[:, None]
        per_chunk = tl.load(counts_ptr + chunks * NUM_BINS + tl.arange(0, NUM_BINS)[None, :],
                            mask=chunks < NUM_CHUNKS, other=0)
        counts = tl.sum(per_chunk, axis=0)
        before = tl.sum(tl.where(chunks < chunk, per_chunk, 0), axis=0)
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts

    # Sorting (expert, slot) keys puts the chunk's pairs in expert order, each expert's in pair order; the pair at
    # sorted place s goes to its expert's start, past the earlier chunks' pairs, at s - (the expert's first place).
    key = tl.sort(tl.where(valid, expert * CHUNK + slot, NUM_BINS * CHUNK))
    sorted_expert = tl.minimum(key // CHUNK, NUM_BINS - 1)
    offset = starts + before - (tl.cumsum(here, axis=0) - here)
    tl.store(order_ptr + tl.gather(offset, sorted_expert, axis=0) + slot, chunk * CHUNK + key % CHUNK,
             mask=slot < tl.sum(valid.to(tl.int32), axis=0))

    # Block b belongs to the expert whose blocks end after it: the count of experts whose blocks end at or before b.
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_ends = tl.cumsum(blocks, axis=0)
    b = chunk * TABLE_CHUNK + tl.arange(0, TABLE_CHUNK)
    owner = tl.sum((block_ends[None, :] <= b[:, None]).to(tl.int32), axis=1)
    live = owner < NUM_BINS
    owner = tl.minimum(owner, NUM_BINS - 1)
    first = tl.gather(starts, owner, axis=0) + (b - tl.gather(block_ends - blocks, owner, axis=0)) * BLOCK_M
    in_table = b < max_blocks
    tl.store(table_ptr + b, tl.where(live, owner, -1), mask=in_table)
    tl.store(table_ptr + max_blocks + b, first, mask=in_table)
    tl.store(table_ptr + 2 * max_blocks + b, tl.gather(ends, owner, axis=0), mask=in_table)


@triton.jit
def _block(table_ptr, max_blocks, blocks_n, group_m):
    """This program's (expert, first row, expert's end row, N-block): `group_m` M-blocks in a row per N-block."""
    pid = tl.program_id(0)
    width = group_m * blocks_n
    first_m = pid // width * group_m
    size = tl.minimum(max_blocks - first_m, group_m)
    m = first_m + pid % width % size
    return (tl.load(table_ptr + m), tl.load(table_ptr + max_blocks + m), tl.load(table_ptr + 2 * max_blocks + m),
            pid % width // size)


@triton.jit
def _gate_up_tile(w_desc, x_ptr, w_ptr, order_ptr, act_ptr, x_row_stride, expert, first, end, first_col,
                  HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = first + tl.arange(0, BLOCK_M)
    tokens = (tl.load(order_ptr + tl.minimum(rows, end - 1)) // TOP_K).to(tl.int64)  # past the end: the last row
    cols = first_col + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * x_row_stride + ks[None, :]
    # [BLOCK_K, BLOCK_N] views of the expert's gate rows and the matching up rows; columns past N load row N-1 (or,
    # through the descriptor, the rows after them: either way not stored).
    gate_row = expert * (2 * INTER) + first_col
    gate_ptrs = (w_ptr + expert.to(tl.int64) * (2 * INTER * HIDDEN)
                 + tl.minimum(cols, INTER - 1)[None, :] * HIDDEN + ks[:, None])
    up_ptrs = gate_ptrs + INTER * HIDDEN
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(tl.cdiv(HIDDEN, BLOCK_K)):
        if HIDDEN % BLOCK_K == 0:
            xs = tl.load(x_ptrs)
        else:
            xs = tl.load(x_ptrs, mask=(ks < HIDDEN - k * BLOCK_K)[None, :], other=0.0)
        if w_desc is not None:  # TMA: K past HIDDEN reads zeros
            gate = w_desc.load([gate_row, k * BLOCK_K]).T
            up = w_desc.load([gate_row + INTER, k * BLOCK_K]).T
        elif HIDDEN % BLOCK_K == 0:
            gate = tl.load(gate_ptrs)
            up = tl.load(up_ptrs)
        else:
            k_in = ks < HIDDEN - k * BLOCK_K
            gate = tl.load(gate_ptrs, mask=k_in[:, None], other=0.0)
            up = tl.load(up_ptrs, mask=k_in[:, None], other=0.0)
        acc_gate = dot(xs, gate, acc_gate, PRECISION)
        acc_up = dot(xs, up, acc_up, PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    act = gelu_tanh_mul(acc_gate, acc_up, act_ptr.dtype.element_ty)
    tl.store(act_ptr + rows[:, None].to(tl.int64) * INTER + cols[None, :], act,
             mask=(rows < end)[:, None] & (cols < INTER)[None, :])


@triton.jit(do_not_specialize=["max_blocks", "group_m"])
def _gate_up_kernel(x_ptr, w_ptr, w_desc, w_tail_desc, order_ptr, table_ptr, act_ptr, x_row_stride, max_blocks,
                    group_m, HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, NARROW_TAIL: tl.constexpr,
                    PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    expert, first, end, n = _block(table_ptr, max_blocks, tl.cdiv(INTER, BLOCK_N), group_m)
    if expert < 0:
        return
    args = (x_ptr, w_ptr, order_ptr, act_ptr, x_row_stride, expert, first, end, n * BLOCK_N, HIDDEN, INTER, TOP_K)
    if NARROW_TAIL and n == INTER // BLOCK_N:  # the last N-block, at most half of it in N: a half-width tile
        _gate_up_rows(args, w_tail_desc, end - first, BLOCK_M, BLOCK_N // 2, BLOCK_K, PRECISION)
    else:
        _gate_up_rows(args, w_desc, end - first, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _gate_up_rows(args, w_desc, rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    """An M-block of `rows` rows: an expert's last block, when at most a quarter or half full, as a quarter- or
    half-height tile (BLOCK_M >= 64)."""
    if BLOCK_M >= 64 and rows <= BLOCK_M // 4:
        _gate_up_tile(w_desc, *args, BLOCK_M // 4, BLOCK_N, BLOCK_K, PRECISION)
    elif BLOCK_M >= 64 and rows <= BLOCK_M // 2:
        _gate_up_tile(w_desc, *args, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION)
    else:
        _gate_up_tile(w_desc, *args, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _down_tile(act_ptr, act_desc, w_ptr, w_desc, order_ptr, y_ptr, expert, first, end, n, HIDDEN: tl.constexpr,
               INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    rows = first + tl.arange(0, BLOCK_M)
    rows_in = tl.minimum(rows, end - 1)  # past the end: the last row
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    act_ptrs = act_ptr + rows_in[:, None].to(tl.int64) * INTER + ks[None, :]
    w_ptrs = (w_ptr + expert.to(tl.int64) * (HIDDEN * INTER)
              + tl.minimum(cols, HIDDEN - 1)[None, :] * INTER + ks[:, None])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_row = expert * HIDDEN + n * BLOCK_N
    for k in range(tl.cdiv(INTER, BLOCK_K)):
        if act_desc is not None:  # rows past the expert's are read and not stored; past P and INTER, zeros
            act = act_desc.load([first, k * BLOCK_K])
        elif INTER % BLOCK_K == 0:
            act = tl.load(act_ptrs)
        else:
            act = tl.load(act_ptrs, mask=(ks < INTER - k * BLOCK_K)[None, :], other=0.0)
        if w_desc is not None:  # TMA: K past INTER reads zeros
            w = w_desc.load([w_row, k * BLOCK_K]).T
        elif INTER % BLOCK_K == 0:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(ks < INTER - k * BLOCK_K)[:, None], other=0.0)
        acc = dot(act, w, acc, PRECISION)
        act_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pairs = tl.load(order_ptr + rows_in).to(tl.int64)
    tl.store(y_ptr + pairs[:, None] * HIDDEN + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < end)[:, None] & (cols < HIDDEN)[None, :])


@triton.jit(do_not_specialize=["max_blocks", "group_m"])
def _down_kernel(act_ptr, act_desc, act_half_desc, act_quarter_desc, w_ptr, w_desc, order_ptr, table_ptr, y_ptr,
                 max_blocks, group_m, HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    expert, first, end, n = _block(table_ptr, max_blocks, tl.cdiv(HIDDEN, BLOCK_N), group_m)
    if expert < 0:
        return
    args = (w_ptr, w_desc, order_ptr, y_ptr, expert, first, end, n, HIDDEN, INTER)
    rows = end - first  # as in _gate_up_rows
    if BLOCK_M >= 64 and rows <= BLOCK_M // 4:
        _down_tile(act_ptr, act_quarter_desc, *args, BLOCK_M // 4, BLOCK_N, BLOCK_K, PRECISION)
    elif BLOCK_M >= 64 and rows <= BLOCK_M // 2:
        _down_tile(act_ptr, act_half_desc, *args, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION)
    else:
        _down_tile(act_ptr, act_desc, *args, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def _combine_kernel(y_ptr, w_ptr, ids_ptr, out_ptr, hidden, experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                    BLOCK_H: tl.constexpr, ROUND_PRODUCT: tl.constexpr, EXPERT_ORDER: tl.constexpr,
                    PDL: tl.constexpr):
    """out[t] = sum_k y[t, k] * w[t, k].

    In slot order, as CUDA eager's `.sum(dim=1)` adds a [T, K, H] tensor: each thread keeps 4 accumulators, adds
    slot k to accumulator k % 4 in k order, then adds accumulators 1, 2, 3 to the first (Reduce.cuh's
    thread_reduce, vt0 = 4); the product is rounded to x.dtype when the weights are x.dtype.
    In expert order (EXPERT_ORDER), as transformers' "eager" experts loop adds one expert after the other into a
    zeroed x.dtype output with `index_add_`: the slots by ascending id, each product and each sum rounded to
    x.dtype; ids >= E (expert-parallel sentinels) are skipped."""
    if PDL:
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    if EXPERT_ORDER:
        slots = tl.arange(0, K_PAD)
        ids = tl.load(ids_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=experts)
        weights = tl.load(w_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=0.0).to(tl.float32)
        # each slot's place in the sum: the number of slots with a smaller id (ties: an earlier slot) before it
        before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (slots[None, :] < slots[:, None]))
        place = tl.sum(before.to(tl.int32), axis=1)
        acc = tl.zeros([BLOCK_H], tl.float32)
        for r in tl.static_range(TOP_K):
            here = place == r
            if tl.sum(tl.where(here, ids, 0)) < experts:
                slot = tl.sum(tl.where(here, slots, 0))
                y = tl.load(y_ptr + (token * TOP_K + slot) * hidden + cols, mask=mask, other=0.0)
                p = mul_rn(y.to(tl.float32), tl.sum(tl.where(here, weights, 0.0))).to(dtype).to(tl.float32)
                acc = (acc + p).to(dtype).to(tl.float32)
        tl.store(out_ptr + token * hidden + cols, acc.to(dtype), mask=mask)
    else:
        acc0 = tl.zeros([BLOCK_H], tl.float32)
        acc1 = tl.zeros([BLOCK_H], tl.float32)
        acc2 = tl.zeros([BLOCK_H], tl.float32)
        acc3 = tl.zeros([BLOCK_H], tl.float32)
        for k in tl.static_range(TOP_K):
            y = tl.load(y_ptr + (token * TOP_K + k) * hidden + cols, mask=mask, other=0.0)
            p = mul_rn(y.to(tl.float32), tl.load(w_ptr + token * TOP_K + k).to(tl.float32))  # not fused into the sum
            if ROUND_PRODUCT:
                p = p.to(y.dtype).to(tl.float32)
            if k % 4 == 0:
                acc0 += p
            elif k % 4 == 1:
                acc1 += p
            elif k % 4 == 2:
                acc2 += p
            else:
                acc3 += p
        out = ((acc0 + acc1) + acc2) + acc3
        tl.store(out_ptr + token * hidden + cols, out.to(dtype), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Launcher, custom op


def moe_experts_triton(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                       down_proj: Tensor, *, out: Tensor | None = None, path: str | None = None,
                       config: Config | None = None, tma: bool | None = None, expert_order: bool = False) -> Tensor:
    """Launch the kernels; writes into `out` ([T, H] contiguous, x.dtype) when given. `expert_order`: sum over k as
    transformers' "eager" experts loop does (`moe_experts_loop_reference`). `path` ("stream" or "tiled"), `config`
    and `tma` (weights read through tensor descriptors) override the choice by pair count, the tuned table and the
    device (tests and `benchmarks/moe.py --tune`)."""
    check_inputs(x, top_k_index, top_k_weights, gate_up_proj, down_proj)
    tokens, hidden = x.shape
    top_k = top_k_index.shape[1]
    experts, inter = gate_up_proj.shape[0], down_proj.shape[2]
    if experts > MAX_EXPERTS or top_k > MAX_TOP_K:
        raise ValueError(f"moe_experts: the kernels handle at most {MAX_EXPERTS} experts and top_k <= {MAX_TOP_K}; "
                         f"got {experts} experts, top_k={top_k}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"moe_experts: out must be a contiguous {tuple(x.shape)} {x.dtype} tensor on {x.device}")
    if tokens == 0:
        return out
    pairs = tokens * top_k
    path = path or ("stream" if pairs <= STREAM_MAX_PAIRS else "tiled")
    if path not in ("stream", "tiled"):
        raise ValueError(f"moe_experts: path must be 'stream' or 'tiled'; got {path!r}")
    config = config or tuned_config(tokens, top_k, experts, inter, hidden, x.dtype, x.device)
    block_m = config.block_m
    if path == "stream":  # BLOCK_M holds all of an expert's rows (at most T), so its weights are read once
        block_m = max(block_m, min(128, triton.next_power_of_2(tokens)))
    max_blocks = min(pairs, triton.cdiv(pairs, block_m) + min(experts, pairs))

    # Streaming, each launch is short: programmatic dependent launch lets the next one's programs start as the
    # last ones of this one run (each waits for this one's writes before reading them). Hopper and later only.
    pdl = path == "stream" and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    order, table = _route(top_k_index, experts, block_m, max_blocks, pdl)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # no tf32 rounding of fp32 inputs
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    gate_up = _fit(config.gate_up, inter, hidden)
    down = _fit(config.down, hidden, inter)
    if tma is None:  # tensor descriptors, read by the copy engine (TMA): Hopper and later
        tma = path == "tiled" and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    tma = tma and _descriptor_ok(gate_up_proj) and _descriptor_ok(down_proj)  # act's rows are down_proj's
    gate_up_w = gate_up_proj.view(-1, hidden)
    narrow = _narrow_tail(inter, gate_up.block_n)
    w_descs = ((_descriptor(gate_up_w, gate_up.block_n, gate_up.block_k),
                _descriptor(gate_up_w, gate_up.block_n // 2 if narrow else gate_up.block_n, gate_up.block_k),
                _descriptor(down_proj.view(-1, inter), down.block_n, down.block_k)) if tma else (None, None, None))
    # one descriptor of act's rows per tile height (the half and quarter are taken only when BLOCK_M >= 64)
    act_descs = tuple(_descriptor(act, max(block_m // d, 16), down.block_k) if tma else None for d in (1, 2, 4))
    _gate_up_kernel[(max_blocks * triton.cdiv(inter, gate_up.block_n),)](
        x, gate_up_proj, w_descs[0], w_descs[1], order, table, act, x.stride(0), max_blocks,
        max_blocks if path == "stream" else gate_up.group_m,
        HIDDEN=hidden, INTER=inter, TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=gate_up.block_n, BLOCK_K=gate_up.block_k,
        PRECISION=precision, NARROW_TAIL=narrow, PDL=pdl,
        num_warps=gate_up.num_warps, num_stages=gate_up.num_stages, launch_pdl=pdl,
    )
    y = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)
    _down_kernel[(max_blocks * triton.cdiv(hidden, down.block_n),)](
        act, *act_descs, down_proj, w_descs[2], order, table, y, max_blocks,
        max_blocks if path == "stream" else down.group_m,
        HIDDEN=hidden, INTER=inter, BLOCK_M=block_m, BLOCK_N=down.block_n, BLOCK_K=down.block_k, PRECISION=precision,
        PDL=pdl, num_warps=down.num_warps, num_stages=down.num_stages, launch_pdl=pdl,
    )
    return _combine(y, top_k_weights, out, pdl, top_k_index if expert_order else None, experts)


def _combine(y: Tensor, top_k_weights: Tensor, out: Tensor, pdl: bool = False, expert_order_ids: Tensor | None = None,
             experts: int = 0) -> Tensor:
    """out [T, H] = the sum over k of y [T*K, H] times top_k_weights [T, K], as eager sums it on CUDA; with
    `expert_order_ids` (top_k_index), as transformers' "eager" experts loop sums it, skipping ids >= `experts`."""
    tokens, top_k = top_k_weights.shape
    hidden = out.shape[1]
    block_h = min(1024, triton.next_power_of_2(hidden), max(128, triton.next_power_of_2(hidden * tokens // 512)))
    expert_order = expert_order_ids is not None
    _combine_kernel[(tokens, triton.cdiv(hidden, block_h))](
        y, top_k_weights, expert_order_ids if expert_order else top_k_weights, out, hidden, experts, TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k), BLOCK_H=block_h,
        ROUND_PRODUCT=top_k_weights.dtype == out.dtype != torch.float32, EXPERT_ORDER=expert_order, PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )
    return out


def _descriptor_ok(weights: Tensor) -> bool:
    """Whether a tensor descriptor (TMA) can read these weights' rows: 16-byte aligned base and rows."""
    return weights.data_ptr() % 16 == 0 and weights.stride(-2) * weights.element_size() % 16 == 0


def _descriptor(rows: Tensor, block_rows: int, block_k: int) -> TensorDescriptor:
    """A descriptor of [block_rows, block_k] tiles of a 2-D weight view; reads past its edges give zeros."""
    return TensorDescriptor.from_tensor(rows, [block_rows, block_k])


def _narrow_tail(n: int, block_n: int) -> bool:
    """Whether the last N-block, at most half of it in N, runs as a half-width tile (tl.dot takes 16 at least)."""
    return block_n >= 32 and 0 < n % block_n <= block_n // 2


def _fit(config: GemmConfig, n: int, k: int) -> GemmConfig:
    """`config` with its N and K blocks cut to the problem (tl.dot needs at least 16)."""
    return config._replace(block_n=min(config.block_n, max(16, triton.next_power_of_2(n))),
                           block_k=min(config.block_k, max(16, triton.next_power_of_2(k))))


def _route(top_k_index: Tensor, experts: int, block_m: int, max_blocks: int, pdl: bool) -> tuple[Tensor, Tensor]:
    """(order: int32 [P], sorted row -> pair; table: int32 [3, max_blocks], each block's expert (-1 past the real
    blocks), first row and its expert's end row)."""
    ids = top_k_index.reshape(-1)
    pairs = ids.numel()
    num_bins = triton.next_power_of_2(experts)
    chunk = min(triton.next_power_of_2(pairs), max(1024, triton.next_power_of_2(triton.cdiv(pairs, 128))))
    num_chunks = triton.cdiv(pairs, chunk)
    order = torch.empty(pairs, dtype=torch.int32, device=ids.device)
    table = torch.empty((3, max_blocks), dtype=torch.int32, device=ids.device)
    counts = torch.empty((num_chunks, num_bins), dtype=torch.int32, device=ids.device)
    if num_chunks > 1:
        _route_count_kernel[(num_chunks,)](ids, counts, pairs, experts, NUM_BINS=num_bins, CHUNK=chunk)
    _route_kernel[(num_chunks,)](
        ids, counts, order, table, pairs, experts, max_blocks, NUM_BINS=num_bins, CHUNK=chunk, NUM_CHUNKS=num_chunks,
        CHUNKS_PAD=triton.next_power_of_2(num_chunks), BLOCK_M=block_m,
        TABLE_CHUNK=triton.next_power_of_2(triton.cdiv(max_blocks, num_chunks)), PDL=pdl, num_warps=4,
    )
    return order, table


def check_inputs(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                 down_proj: Tensor) -> None:
    """A ValueError naming the first argument the kernels cannot take (the pattern reports it as its reason)."""
    if x.dim() != 2 or x.dtype not in DTYPES or x.stride(-1) != 1:
        raise ValueError(f"moe_experts: x must be 2-D [tokens, hidden] with unit last stride, dtype in {DTYPES}; "
                         f"got shape {tuple(x.shape)}, stride {x.stride()}, dtype {x.dtype}")
    tokens, hidden = x.shape
    if top_k_index.dim() != 2 or top_k_index.shape[0] != tokens or top_k_index.dtype != torch.int64 \
            or not top_k_index.is_contiguous():
        raise ValueError(f"moe_experts: top_k_index must be a contiguous [{tokens}, top_k] torch.int64 tensor; "
                         f"got shape {tuple(top_k_index.shape)}, dtype {top_k_index.dtype}")
    if top_k_weights.shape != top_k_index.shape or top_k_weights.dtype not in (torch.float32, x.dtype) \
            or not top_k_weights.is_contiguous():
        raise ValueError(f"moe_experts: top_k_weights must be a contiguous {tuple(top_k_index.shape)} tensor of "
                         f"torch.float32 or {x.dtype}; got shape {tuple(top_k_weights.shape)}, "
                         f"dtype {top_k_weights.dtype}")
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != hidden or gate_up_proj.shape[1] % 2 \
            or gate_up_proj.dtype != x.dtype or not gate_up_proj.is_contiguous():
        raise ValueError(f"moe_experts: gate_up_proj must be a contiguous [experts, 2 * intermediate, {hidden}] "
                         f"{x.dtype} tensor; got shape {tuple(gate_up_proj.shape)}, dtype {gate_up_proj.dtype}")
    experts, inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    if down_proj.shape != (experts, hidden, inter) or down_proj.dtype != x.dtype or not down_proj.is_contiguous():
        raise ValueError(f"moe_experts: down_proj must be a contiguous [{experts}, {hidden}, {inter}] {x.dtype} "
                         f"tensor; got shape {tuple(down_proj.shape)}, dtype {down_proj.dtype}")
    if top_k_index.shape[1] > experts:
        raise ValueError(f"moe_experts: top_k_index has {top_k_index.shape[1]} slots per token, more than the "
                         f"{experts} experts")
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights), ("gate_up_proj", gate_up_proj),
                    ("down_proj", down_proj)):
        if t.device != x.device:
            raise ValueError(f"moe_experts: {name} is on {t.device}, x on {x.device}")


@torch.library.custom_op("gemma4_fx::moe_experts", mutates_args=())
def moe_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                expert_order: bool = False) -> Tensor:
    """`Gemma4TextExperts.forward` ([T, H], x.dtype): on CUDA the Triton kernels, elsewhere the eager reference.
    `expert_order`: summed over k as transformers' "eager" experts loop sums it (else as its "grouped_mm")."""
    check_inputs(x, top_k_index, top_k_weights, gate_up_proj, down_proj)
    if x.is_cuda:
        return moe_experts_triton(x, top_k_index, top_k_weights, gate_up_proj, down_proj, expert_order=expert_order)
    reference = moe_experts_loop_reference if expert_order else moe_experts_reference
    return reference(x, top_k_index, top_k_weights, gate_up_proj, down_proj)


@moe_experts.register_fake
def _(x, top_k_index, top_k_weights, gate_up_proj, down_proj, expert_order=False):
    check_inputs(x, top_k_index, top_k_weights, gate_up_proj, down_proj)
    return x.new_empty(x.shape)


@torch.library.custom_op("gemma4_fx::moe_experts_loop", mutates_args=())
def moe_experts_loop(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
                     down_proj: Tensor) -> Tensor:
    """transformers' "eager" experts loop as one op (`moe_experts_loop_reference`, on any device): what a
    Gemma4Backend's trace puts in the graph for that loop (`patterns/moe_experts.py`), which Dynamo would otherwise
    break at the experts it hits; the moe_experts rewrite replaces it by `moe_experts(..., expert_order=True)`."""
    return moe_experts_loop_reference(x, top_k_index, top_k_weights, gate_up_proj, down_proj)


@moe_experts_loop.register_fake
def _(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return torch.empty_like(x)
