"""Fused ops for the Gemma-4 MoE router (`Gemma4TextRouter.forward`) that match CUDA eager bit for bit.

The router computes, for x: [N, H],

    h = rmsnorm(x) * scale * H**-0.5                    # router_input
    logits = h @ proj.T                                 # a plain torch.mm (cuBLAS): not replaced
    w, ids = topk(softmax(logits, fp32), k)             # router_select
    w = w / w.sum(-1) * per_expert_scale[ids]

Inductor fuses this and keeps intermediates in fp32, which changes the chosen experts of ~4% of bf16 tokens. The
kernels below instead round where eager rounds and repeat the arithmetic order of the CUDA kernels eager launches:
the mean is `sum * float(N / numel)` (ATen's MeanOps), `pow(t, -0.5)` is rsqrt (PowKernel.cu), the softmax sums in
the order of ATen's `softmax_warp_forward`, the top-k ties come out in the order of `torch.topk` on CUDA (a radix
select, then a 32-wide bitonic network), and the renormalising sum follows ATen's reduce tree. router_select is
bitwise eager's (but for probabilities below 2**-126, which may differ: `eager_math.exp`); only router_input's sum
of squares is added in another order, so a few of its elements differ from eager's (on an H100, 0.0004% of bf16
elements, by at most 3 ulps: one at the first rounding, grown by the next two).

Each op has its eager reference (used on CPU, and as the test oracle) next to its Triton kernel (used on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager_math import exp, mean_square
from .launch import cuda_kernel, launcher
from .rows import DTYPES, MAX_HIDDEN, launch_rows, rms_norm, row_output

MAX_EXPERTS = 1024  # CUDA softmax takes its warp-per-row path, whose order we copy, up to 1024 fp32 columns
MAX_TOP_K = 32  # torch.topk sorts k <= 32 with the 32-wide bitonic network we copy


def supports(hidden_size: int, num_experts: int, top_k: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels handle a router of this size and activation dtype."""
    return (dtype in DTYPES and 1 <= hidden_size <= MAX_HIDDEN and 1 <= top_k <= num_experts
            and num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K)


# --------------------------------------------------------------------------------------------------------------------
# router_input: h = ((x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype) * scale) * root_size


def router_input_reference(x: Tensor, scale: Tensor, eps: float, root_size: float) -> Tensor:
    """The eager ops of `Gemma4RMSNorm(with_scale=False)` followed by `* scale * root_size`."""
    return rms_norm(x, None, eps) * scale * root_size


@triton.jit
def _router_input_kernel(x_ptr, scale_ptr, out_ptr, x_row_stride, rows, eps, root_size,
                         HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    # Float arguments come as fp64 from Inductor's launches: cast, as the arithmetic is fp32's.
    h = (xf * tl.math.rsqrt(mean_square(xf, rows, HIDDEN) + tl.cast(eps, tl.float32))).to(x.dtype)
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0)
    h = (h.to(tl.float32) * scale.to(tl.float32)).to(x.dtype)
    h = (h.to(tl.float32) * tl.cast(root_size, tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * HIDDEN + cols, h, mask=mask)


def router_input_triton(x: Tensor, scale: Tensor, eps: float, root_size: float, *, out: Tensor | None = None) -> Tensor:
    """Launch the router_input kernel; writes into `out` ([N, H] contiguous, x.dtype) when given."""
    _check_router_input(x, scale)
    out = row_output("router_input", x, out)
    rows, hidden = x.shape
    launch_rows("router_input", _router_input_kernel, rows, hidden,
                x, scale, out, x.stride(0), rows, eps, root_size)
    return out


def _check_router_input(x: Tensor, scale: Tensor) -> None:
    if x.dim() != 2 or x.dtype not in DTYPES or x.stride(-1) != 1:
        raise ValueError(f"router_input: x must be 2-D [tokens, hidden] with unit last stride, dtype in {DTYPES}; "
                         f"got shape {tuple(x.shape)}, stride {x.stride()}, dtype {x.dtype}")
    if scale.shape != (x.shape[1],) or scale.dtype != x.dtype or not scale.is_contiguous():
        raise ValueError(f"router_input: scale must be a contiguous [{x.shape[1]}] {x.dtype} tensor; "
                         f"got shape {tuple(scale.shape)}, dtype {scale.dtype}")
    if scale.device != x.device:
        raise ValueError(f"router_input: scale is on {scale.device}, x on {x.device}")


@torch.library.custom_op("gemma4_fx::router_input", mutates_args=())
def router_input(x: Tensor, scale: Tensor, eps: float, root_size: float, exact: bool) -> Tensor:
    """The router's norm-and-scale prologue. On CUDA one Triton launch, or with `exact` the eager ops themselves."""
    _check_router_input(x, scale)
    return router_input_reference(x, scale, eps, root_size)


@cuda_kernel(router_input)
def _router_input_cuda(x, scale, eps, root_size, exact):
    if exact:
        return router_input_reference(x, scale, eps, root_size)
    return router_input_triton(x, scale, eps, root_size)


@router_input.register_fake
def _router_input_fake(x, scale, eps, root_size, exact):
    _check_router_input(x, scale)
    return x.new_empty(x.shape)


@torch.library.custom_op("gemma4_fx::router_input_scalar_tensors", mutates_args=())
def router_input_scalar_tensors(x: Tensor, scale: Tensor, eps: Tensor, root_size: Tensor, exact: bool) -> Tensor:
    """`router_input` with eps and root_size as 0-d tensors: under `dynamic=True` Dynamo passes a module's float
    attributes to the graph as 0-d CPU tensors, so reading them here is a host read, not a device sync."""
    return router_input(x, scale, eps.item(), root_size.item(), exact)


router_input_scalar_tensors.register_fake(_router_input_fake)


# --------------------------------------------------------------------------------------------------------------------
# router_select: softmax -> top-k -> renormalise -> * per_expert_scale[ids], in one launch


def router_select_reference(logits: Tensor, per_expert_scale: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The eager ops of `Gemma4TextRouter.forward` after the projection."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[ids], ids


_SLOTS = tl.constexpr(32)  # torch.topk sorts k <= 32 winners in a 32-slot bitonic network


@triton.jit
def _halves_tree_sum(x, WIDTH: tl.constexpr):
    """Sum of x [WIDTH] that adds element j to element j + WIDTH/2, then halves again: the order of a warp's xor
    butterfly (softmax_warp_forward) and of ATen's shuffle-down block reduce (Reduce.cuh, offsets decreasing)."""
    for t in tl.static_range(1, 6):
        if (WIDTH >> t) > 0:
            a, b = tl.split(tl.permute(tl.reshape(x, [2, WIDTH >> t]), (1, 0)))
            x = a + b
    return tl.sum(x, axis=0)


@triton.jit
def _bitonic_step(p, i, SIZE: tl.constexpr, STRIDE: tl.constexpr):
    """One compare-exchange step of ATen's bitonicSort (SortUtils.cuh) over 32 (probability, expert) slots.

    Sorts descending; slots with i < 0 are invalid and sink to the end. Equal probabilities are swapped exactly when
    ATen swaps them, which is what puts ties in torch.topk's order.
    """
    p = tl.permute(tl.reshape(p, [_SLOTS // (2 * STRIDE), 2, STRIDE]), (0, 2, 1))
    i = tl.permute(tl.reshape(i, [_SLOTS // (2 * STRIDE), 2, STRIDE]), (0, 2, 1))
    pa, pb = tl.split(p)
    ia, ib = tl.split(i)
    ascending = (tl.arange(0, _SLOTS // (2 * STRIDE))[:, None] & (SIZE // (2 * STRIDE))) != 0
    swap = (((pa > pb) & (ia >= 0)) | (ib < 0)) == ascending
    p = tl.join(tl.where(swap, pb, pa), tl.where(swap, pa, pb))
    i = tl.join(tl.where(swap, ib, ia), tl.where(swap, ia, ib))
    return tl.reshape(tl.permute(p, (0, 2, 1)), [_SLOTS]), tl.reshape(tl.permute(i, (0, 2, 1)), [_SLOTS])


@triton.jit
def _router_select_kernel(logits_ptr, scale_ptr, w_ptr, ids_ptr, experts, logits_row_stride,
                          K: tl.constexpr, K_PAD: tl.constexpr, SUM_WIDTH: tl.constexpr, BLOCK_E: tl.constexpr,
                          LANES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(row_ptr + cols, mask=cols < experts, other=float("-inf")).to(tl.float32)
    row_max = tl.max(logits, axis=0)

    # Softmax as ATen's softmax_warp_forward sums it: lane j of a LANES-wide warp adds exp(l - max) of columns
    # j, j + LANES, ... in turn, then the lanes meet in an xor butterfly. Eager divides (IEEE) by that sum.
    lanes = tl.arange(0, LANES)
    lane_sums = tl.zeros([LANES], tl.float32)
    for it in tl.static_range(BLOCK_E // LANES):
        c = it * LANES + lanes
        lane_sums += exp(tl.load(row_ptr + c, mask=c < experts, other=float("-inf")).to(tl.float32) - row_max)
    probs = tl.math.div_rn(exp(logits - row_max), _halves_tree_sum(lane_sums, LANES))

    # Top-k by (probability desc, index asc), one max per round over (probability bits << 32 | reversed index):
    # probabilities are >= 0, so their bits order like them. Padding and winners drop to -1.
    key = (probs.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - cols)
    key = tl.where(cols < experts, key, -1)
    slot = tl.arange(0, K_PAD)
    top = tl.full([K_PAD], -1, tl.int64)
    for j in range(K):
        best = tl.max(key, axis=0)
        top = tl.where(slot == j, best, top)
        key = tl.where(key == best, -1, key)
    top_p = tl.where(slot < K, (top >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    top_i = BLOCK_E - 1 - (top & 0xFFFFFFFF).to(tl.int32)
    top_scale = tl.load(scale_ptr + top_i, mask=slot < K, other=0.0).to(tl.float32)  # in flight during the sort

    # torch.topk's radix select writes the winners above the k-th value in index order, then those equal to it in
    # index order (already last here), and sorts that with its bitonic network. Rank the winners in that write order,
    # scatter them into the network's 32 slots, and run the same network.
    kth = tl.min(tl.where(slot < K, top_p, float("inf")), axis=0)
    order = tl.where(slot < K, tl.where(top_p > kth, 0, BLOCK_E) + top_i, 2 * BLOCK_E + slot)
    rank = tl.sum((order[None, :] < order[:, None]).to(tl.int32), axis=1)
    slots = tl.arange(0, _SLOTS)
    hit = rank[:, None] == slots[None, :]
    p = tl.sum(tl.where(hit, top_p[:, None], 0.0), axis=0)
    i = tl.where(slots < K, tl.sum(tl.where(hit, top_i[:, None], 0), axis=0), -1)
    for log_size in tl.static_range(1, 6):
        for t in tl.static_range(log_size):
            p, i = _bitonic_step(p, i, 1 << log_size, 1 << (log_size - 1 - t))

    # w / w.sum(-1): ATen's reduce gives lane j of last_pow2(k) lanes the slots j and j + SUM_WIDTH, then combines
    # the lanes halves first. Invalid slots hold 0.
    denom = _halves_tree_sum(tl.sum(tl.reshape(p, [_SLOTS // SUM_WIDTH, SUM_WIDTH]), axis=0), SUM_WIDTH)
    valid = slots < K
    scale = tl.max(tl.where(i[:, None] == top_i[None, :], top_scale[None, :], float("-inf")), axis=1)
    scale = tl.where(valid, scale, 0.0)
    tl.store(w_ptr + row * K + slots, tl.math.div_rn(p, denom) * scale, mask=valid)
    tl.store(ids_ptr + row * K + slots, i.to(tl.int64), mask=valid)


def router_select_triton(logits: Tensor, per_expert_scale: Tensor, k: int, *,
                         out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Launch the router_select kernel; writes into `out` = (weights fp32 [N, k], ids int64 [N, k]) when given."""
    _check_router_select(logits, per_expert_scale, k)
    rows, experts = logits.shape
    if experts > MAX_EXPERTS or k > MAX_TOP_K:
        raise ValueError(f"router_select: the kernel handles at most {MAX_EXPERTS} experts and k <= {MAX_TOP_K}; "
                         f"got {experts} experts, k={k}")
    if out is None:
        out = (torch.empty((rows, k), dtype=torch.float32, device=logits.device),
               torch.empty((rows, k), dtype=torch.int64, device=logits.device))
    weights, ids = out
    for name, t, dtype in (("weights", weights, torch.float32), ("ids", ids, torch.int64)):
        if t.shape != (rows, k) or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"router_select: out {name} must be a contiguous ({rows}, {k}) {dtype} tensor")
    block_e = triton.next_power_of_2(int(experts))  # a launch setting: specialised where symbolic
    # One row per single-warp program: the work is a chain of small reductions, and a warp does them in shuffles.
    # (On an H100 this beat 2-16 rows over 2-8 warps at 1, 64 and 4096 tokens.)
    launcher(_router_select_kernel)[(rows,)](
        logits, per_expert_scale, weights, ids, experts, logits.stride(0),
        K=k, K_PAD=triton.next_power_of_2(k), SUM_WIDTH=1 << (k.bit_length() - 1), BLOCK_E=block_e,
        LANES=min(block_e, 32), num_warps=1,
    )
    return weights, ids


def _check_router_select(logits: Tensor, per_expert_scale: Tensor, k: int) -> None:
    if logits.dim() != 2 or logits.dtype not in DTYPES or logits.stride(-1) != 1:
        raise ValueError(f"router_select: logits must be 2-D [tokens, experts] with unit last stride, dtype in "
                         f"{DTYPES}; got shape {tuple(logits.shape)}, stride {logits.stride()}, dtype {logits.dtype}")
    experts = logits.shape[1]
    if (per_expert_scale.shape != (experts,) or per_expert_scale.dtype not in DTYPES
            or not per_expert_scale.is_contiguous()):
        raise ValueError(f"router_select: per_expert_scale must be a contiguous [{experts}] tensor, dtype in "
                         f"{DTYPES}; got shape {tuple(per_expert_scale.shape)}, dtype {per_expert_scale.dtype}")
    if per_expert_scale.device != logits.device:
        raise ValueError(f"router_select: per_expert_scale is on {per_expert_scale.device}, logits on {logits.device}")
    if not 1 <= k <= experts:
        raise ValueError(f"router_select: k must be in [1, {experts}] (the number of experts); got {k}")


@torch.library.custom_op("gemma4_fx::router_select", mutates_args=())
def router_select(logits: Tensor, per_expert_scale: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Routing weights (fp32 [N, k]) and expert ids (int64 [N, k]); on CUDA one Triton launch."""
    _check_router_select(logits, per_expert_scale, k)
    return router_select_reference(logits, per_expert_scale, k)


cuda_kernel(router_select)(router_select_triton)


@router_select.register_fake
def _(logits, per_expert_scale, k):
    _check_router_select(logits, per_expert_scale, k)
    rows = logits.shape[0]
    return logits.new_empty((rows, k), dtype=torch.float32), logits.new_empty((rows, k), dtype=torch.int64)
