"""Linears that share their input, at the few rows of a decode step, in one launch: `gemma4_fx::skinny_linear`.

For x: [M, K] (M <= MAX_ROWS) and weights W_i: [N_i, K] in nn.Linear's layout (K contiguous), i < MAX_WEIGHTS:

    y_i = x @ W_i.T                          # fp32 accumulation, rounded once to x.dtype, as a cuBLAS GEMM writes it

or, `gated` (two weights of one shape, the MLP's gate and up projections), one output:

    y = gelu_tanh(x @ gate.T) * (x @ up.T)   # each GEMM rounded, then gelu in fp32 and the product, each rounded

or, given `gelu_times` t: [M, N] (one weight, the PLE's gate, whose gelu meets the per-layer input), one output:

    y = gelu_tanh(x @ W.T) * t               # the GEMM rounded, then the gelu and the product, each rounded

Why: at a few rows a linear layer is a read of its weights, yet each cuBLAS launch costs microseconds and reads them
well under the copy bandwidth. A Gemma-4 layer's q/k/v projections share their input, as do the MLP's gate and up:
one launch per group streams all the group's weights, and the gated form also drops eager's gelu and product
(`gelu_times` the same for a lone linear).

The kernel, grid (column blocks, SPLIT_K):
- axis 0 walks the column blocks of W_0, then W_1, ...: a program finds its weight by comparing its id with the
  compile-time block counts, and reads BLOCK_N rows of that weight (gated: of gate and of up) once, over its run of
  K, against all M rows of x. M is padded to BLOCK_M >= 16 for `tl.dot`; the padding costs tensor-core time, which
  a memory-bound GEMM has to spare.
- axis 1 splits K, when the column blocks alone number fewer than the GPU's SMs (BLOCK_N shrinks from 64 to 16
  first): SPLIT_K equal runs of BLOCK_K steps (a divisor of their count), fp32 partial sums into a
  [SPLIT_K, M, sum N_i] workspace, then a second launch adds them in split order, rounds and applies the gated
  epilogue. No atomics, so every run gives the same bits. The split stops where the partials (written and read
  back in fp32) would pass a quarter of the weight bytes. On Hopper the second launch starts early (programmatic
  dependent launch) and waits for the partials.

Against cuBLAS only the order of the fp32 sum along K differs (so the rounded outputs, by an ulp here and there).

Block configs: tuned per shape and GPU where swept (`skinny_linear_configs.py`, `benchmarks/skinny_linear.py
--sweep`), else `default_config`'s rule. Timed at E2B/E4B widths in BENCHMARKS.md (skinny linears): with tuned
configs one launch beats separate cuBLAS linears for every q/k/v and gate/up group measured, and cuBLAS's GEMM for
most lone linears (the table lists those).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .gemm import dot, gelu_tanh_mul
from .launch import sm_count, tuned_gpus
from .skinny_linear_configs import CONFIGS
from .rows import DTYPES

MAX_ROWS = 64  # x's rows live in one BLOCK_M
MAX_WEIGHTS = 3  # q, k and v
TUNED_MAX_ROWS = 16  # the tuned configs' rows: one 16-row tile, as at M = 1 where they were swept
SHARED_MEMORY = 96 << 10  # the stages of a config fit any CUDA GPU's shared memory


def skinny_linear_reference(x: Tensor, weights: list[Tensor], gated: bool = False,
                            gelu_times: Tensor | None = None) -> list[Tensor]:
    """The eager ops: a linear per weight (gated: `gelu_tanh(x @ gate.T) * (x @ up.T)`, one output; `gelu_times`:
    `gelu_tanh(x @ w.T) * gelu_times`)."""
    ys = [F.linear(x, w) for w in weights]
    if gated or gelu_times is not None:
        return [F.gelu(ys[0], approximate="tanh") * (ys[1] if gated else gelu_times)]
    return ys


# --------------------------------------------------------------------------------------------------------------------
# Configs


class Config(NamedTuple):
    block_n: int
    block_k: int
    split_k: int  # runs of K: the largest divisor of the BLOCK_K steps up to this
    num_warps: int
    num_stages: int


def default_config(rows: int, hidden: int, widths: list[int], dtype: torch.dtype, gated: bool, sms: int) -> Config:
    """The widest BLOCK_N (64, 32, 16) whose blocks fill `sms` programs; short of that, K split to fill them, as far
    as the fp32 partials stay under a quarter of the weight bytes. fp32 halves BLOCK_K."""
    elem = torch.empty((), dtype=dtype).element_size()
    block_k = min(128 if elem == 2 else 64, max(16, triton.next_power_of_2(hidden)))
    columns = widths[:1] if gated else widths
    for block_n in (64, 32, 16):
        blocks = sum(triton.cdiv(n, block_n) for n in columns)
        if blocks >= sms:
            break
    steps = triton.cdiv(hidden, block_k)
    # Per column, the partials' split * rows * 4 bytes (written, then read) against the weight's hidden * elem bytes.
    split = max(1, min(triton.cdiv(sms, blocks), steps, hidden * elem // (4 * 2 * 4 * max(rows, 1))))
    stage_bytes = (block_m(rows) + (2 if gated else 1) * block_n) * block_k * elem
    return Config(block_n, block_k, split, 4, max(2, min(4, SHARED_MEMORY // stage_bytes)))


def tuned_config(rows: int, hidden: int, widths: list[int], dtype: torch.dtype, gated: bool,
                 device: torch.device) -> Config | None:
    """The table's config (`skinny_linear_configs.py`) for this shape on this GPU, at most TUNED_MAX_ROWS rows of a
    2-byte dtype (as swept), else None."""
    if rows > TUNED_MAX_ROWS or dtype.itemsize != 2:
        return None
    for gpu in tuned_gpus(device):
        if (value := CONFIGS.get((hidden, tuple(widths), gated, gpu))) is not None:
            return Config(*value)
    return None


def config_for(rows: int, hidden: int, widths: list[int], dtype: torch.dtype, gated: bool,
               device: torch.device) -> Config:
    """`tuned_config`, else `default_config`."""
    return tuned_config(rows, hidden, widths, dtype, gated, device) or default_config(
        rows, hidden, widths, dtype, gated, sm_count(device))


def block_m(rows: int) -> int:
    """The rows a program's tile holds: x's rows padded to a power of two, at least 16 (`tl.dot`'s least)."""
    return max(16, triton.next_power_of_2(rows))


def split_runs(steps: int, split_k: int) -> int:
    """The runs K's `steps` BLOCK_K steps are split into: the largest divisor of `steps` up to `split_k`, so that
    every run has the same compile-time length."""
    return max(d for d in range(1, min(split_k, steps) + 1) if steps % d == 0)


# --------------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _locate(pid, ptrs, WIDTHS: tl.constexpr, NUM_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
    """(pointer, width, first column among all weights' columns, block within it) of the weight whose BLOCK-column
    blocks hold block `pid` of the concatenated columns."""
    ptr = ptrs[0]
    width = pid * 0 + WIDTHS[0]
    first_col = pid * 0
    block = pid
    start = 0
    col = 0
    for i in tl.static_range(1, NUM_WEIGHTS):
        start += (WIDTHS[i - 1] + BLOCK - 1) // BLOCK
        col += WIDTHS[i - 1]
        if pid >= start:
            ptr = ptrs[i]
            width = pid * 0 + WIDTHS[i]
            first_col = pid * 0 + col
            block = pid - start
    return ptr, width, first_col, block


@triton.jit
def _store(acc, acc_up, out_ptr, times_ptr, times_row_stride, rows, cols, mask, width, GATED: tl.constexpr,
           TIMES: tl.constexpr):
    """Round to the output's dtype (gated: eager's gelu_tanh(gate) * up; TIMES: gelu_tanh(acc) * times) and store a
    [BLOCK_M, BLOCK_N] tile."""
    dtype = out_ptr.dtype.element_ty
    if TIMES:
        times = tl.load(times_ptr + rows[:, None] * times_row_stride + cols[None, :], mask=mask, other=0.0)
        out = gelu_tanh_mul(acc, times.to(tl.float32), dtype)
    elif GATED:
        out = gelu_tanh_mul(acc, acc_up, dtype)
    else:
        out = acc.to(dtype)
    tl.store(out_ptr + rows[:, None] * width + cols[None, :], out, mask=mask)


@triton.jit
def _skinny_kernel(x_ptr, w_ptrs, out_ptrs, times_ptr, part_ptr, m, x_row_stride, times_row_stride,
                   WIDTHS: tl.constexpr, NUM_WEIGHTS: tl.constexpr, TOTAL: tl.constexpr, HIDDEN: tl.constexpr,
                   GATED: tl.constexpr, TIMES: tl.constexpr, SPLIT_K: tl.constexpr, STEPS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                   PDL: tl.constexpr):
    """One BLOCK_N column block of one weight (gated: of gate and up) over STEPS BLOCK_K steps of K: rounded
    outputs (TIMES: gelu_tanh of them times `times`), or (SPLIT_K > 1) fp32 partial sums at
    part[split, row, first_col + col]."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if GATED:
        w_ptr, width, first_col, block = _locate(pid, w_ptrs, WIDTHS, 1, BLOCK_N)
        up_ptr = w_ptrs[1]
        out_ptr = out_ptrs[0]
    else:
        w_ptr, width, first_col, block = _locate(pid, w_ptrs, WIDTHS, NUM_WEIGHTS, BLOCK_N)
        up_ptr = w_ptr
        out_ptr = _locate(pid, out_ptrs, WIDTHS, NUM_WEIGHTS, BLOCK_N)[0]
    rows = tl.arange(0, BLOCK_M)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_first = split * (STEPS * BLOCK_K)
    # x rows past M load row M-1 and weight columns past the width its last row: only the stores are masked.
    x_ptrs = x_ptr + tl.minimum(rows, m - 1)[:, None] * x_row_stride + (k_first + ks)[None, :]
    w_offsets = tl.minimum(cols, width - 1).to(tl.int64)[None, :] * HIDDEN + (k_first + ks)[:, None]  # [K, N] view
    w_tile = w_ptr + w_offsets
    up_tile = up_ptr + w_offsets
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(STEPS):
        if HIDDEN % BLOCK_K == 0:
            xs = tl.load(x_ptrs)
            w = tl.load(w_tile)
            if GATED:
                up = tl.load(up_tile)
        else:
            k_in = ks < HIDDEN - k_first - step * BLOCK_K
            xs = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_tile, mask=k_in[:, None], other=0.0)
            if GATED:
                up = tl.load(up_tile, mask=k_in[:, None], other=0.0)
        acc = dot(xs, w, acc, PRECISION)
        if GATED:
            acc_up = dot(xs, up, acc_up, PRECISION)
            up_tile += BLOCK_K
        x_ptrs += BLOCK_K
        w_tile += BLOCK_K
    mask = (rows < m)[:, None] & (cols < width)[None, :]
    if SPLIT_K == 1:
        _store(acc, acc_up, out_ptr, times_ptr, times_row_stride, rows, cols, mask, width, GATED, TIMES)
    else:
        part = part_ptr + (split * m + rows[:, None]) * TOTAL + first_col + cols[None, :]
        tl.store(part, acc, mask=mask)
        if GATED:
            tl.store(part + WIDTHS[0], acc_up, mask=mask)


@triton.jit
def _reduce_kernel(part_ptr, out_ptrs, times_ptr, m, times_row_stride, WIDTHS: tl.constexpr,
                   NUM_WEIGHTS: tl.constexpr, TOTAL: tl.constexpr, GATED: tl.constexpr, TIMES: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """The split-K partials of one column block added in split order, rounded and stored (gated, TIMES: the
    epilogue)."""
    if PDL:
        gdc_wait()
    out_ptr, width, first_col, block = _locate(tl.program_id(0), out_ptrs, WIDTHS, 1 if GATED else NUM_WEIGHTS,
                                               BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < m)[:, None] & (cols < width)[None, :]
    part = part_ptr + rows[:, None] * TOTAL + first_col + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part + split * m * TOTAL, mask=mask, other=0.0)
        if GATED:
            acc_up += tl.load(part + split * m * TOTAL + WIDTHS[0], mask=mask, other=0.0)
    _store(acc, acc_up, out_ptr, times_ptr, times_row_stride, rows, cols, mask, width, GATED, TIMES)


# --------------------------------------------------------------------------------------------------------------------
# Launcher, custom op


def skinny_linear_triton(x: Tensor, weights: list[Tensor], gated: bool = False, gelu_times: Tensor | None = None,
                         *, config: Config | None = None) -> list[Tensor]:
    """Launch the kernel (and, split along K, the reduction); `config` overrides `config_for`'s (tests and
    `benchmarks/skinny_linear.py`)."""
    check_inputs(x, weights, gated, gelu_times)
    rows, hidden = x.shape
    widths = [w.shape[0] for w in weights]
    outs = [x.new_empty((rows, n)) for n in (widths[:1] if gated else widths)]
    if rows == 0:
        return outs
    config = config or config_for(rows, hidden, widths, x.dtype, gated, x.device)
    steps = triton.cdiv(hidden, config.block_k)
    split_k = split_runs(steps, config.split_k)
    blocks = sum(triton.cdiv(o.shape[1], config.block_n) for o in outs)
    total = sum(widths)
    part = torch.empty((split_k, rows, total) if split_k > 1 else (0,), dtype=torch.float32, device=x.device)
    # Split, the reduction may start as the partials' programs run, and waits for them: Hopper and later only.
    pdl = split_k > 1 and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    shared = dict(WIDTHS=tuple(widths), NUM_WEIGHTS=len(weights), TOTAL=total, GATED=gated,
                  TIMES=gelu_times is not None, SPLIT_K=split_k, BLOCK_M=block_m(rows), BLOCK_N=config.block_n,
                  PDL=pdl)
    times, times_row_stride = (x, 0) if gelu_times is None else (gelu_times, gelu_times.stride(0))
    _skinny_kernel[(blocks, split_k)](
        x, tuple(weights), tuple(outs), times, part, rows, x.stride(0), times_row_stride, HIDDEN=hidden,
        STEPS=steps // split_k, BLOCK_K=config.block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **shared,
    )
    if split_k > 1:
        _reduce_kernel[(blocks,)](part, tuple(outs), times, rows, times_row_stride, num_warps=4, launch_pdl=pdl,
                                  **shared)
    return outs


def check_inputs(x: Tensor, weights: list[Tensor], gated: bool, gelu_times: Tensor | None = None) -> None:
    """A ValueError naming the first argument the kernel cannot take."""
    if x.dim() != 2 or x.dtype not in DTYPES or x.stride(-1) != 1 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny_linear: x must be 2-D [rows, hidden] with at most {MAX_ROWS} rows, unit last "
                         f"stride, dtype in {DTYPES}; got shape {tuple(x.shape)}, stride {x.stride()}, dtype "
                         f"{x.dtype}")
    count = "2 (gate, up)" if gated else f"1 to {MAX_WEIGHTS}"
    if not (len(weights) == 2 if gated else 1 <= len(weights) <= MAX_WEIGHTS):
        raise ValueError(f"skinny_linear: weights must hold {count} tensors; got {len(weights)}")
    hidden = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != hidden or w.shape[0] < 1 or w.dtype != x.dtype or not w.is_contiguous():
            raise ValueError(f"skinny_linear: weights[{i}] must be a contiguous [out_features, {hidden}] {x.dtype} "
                             f"tensor; got shape {tuple(w.shape)}, stride {w.stride()}, dtype {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"skinny_linear: weights[{i}] is on {w.device}, x on {x.device}")
    if gated and weights[0].shape != weights[1].shape:
        raise ValueError(f"skinny_linear: gated weights must have one shape; weights[0] is {tuple(weights[0].shape)}, "
                         f"weights[1] {tuple(weights[1].shape)}")
    if gelu_times is not None:
        shape = (x.shape[0], weights[0].shape[0])
        if gated or len(weights) != 1:
            raise ValueError(f"skinny_linear: gelu_times takes one weight, not gated; got {len(weights)} weights, "
                             f"gated={gated}")
        if tuple(gelu_times.shape) != shape or gelu_times.dtype != x.dtype or gelu_times.stride(-1) != 1 \
                or gelu_times.device != x.device:
            raise ValueError(f"skinny_linear: gelu_times must be a {list(shape)} {x.dtype} tensor on {x.device} with "
                             f"unit last stride; got shape {tuple(gelu_times.shape)}, stride {gelu_times.stride()}, "
                             f"dtype {gelu_times.dtype} on {gelu_times.device}")


@torch.library.custom_op("gemma4_fx::skinny_linear", mutates_args=())
def skinny_linear(x: Tensor, weights: list[Tensor], gated: bool = False,
                  gelu_times: Tensor | None = None) -> list[Tensor]:
    """[x @ w.T for w in weights] in x.dtype (gated: [gelu_tanh(x @ gate.T) * (x @ up.T)]; gelu_times:
    [gelu_tanh(x @ w.T) * gelu_times]): on CUDA one Triton launch (two when K is split), elsewhere the eager
    reference."""
    check_inputs(x, weights, gated, gelu_times)
    if x.is_cuda:
        return skinny_linear_triton(x, weights, gated, gelu_times)
    return skinny_linear_reference(x, weights, gated, gelu_times)


@skinny_linear.register_fake
def _(x, weights, gated=False, gelu_times=None):
    check_inputs(x, weights, gated, gelu_times)
    return [x.new_empty((x.shape[0], w.shape[0])) for w in (weights[:1] if gated or gelu_times is not None
                                                            else weights)]
