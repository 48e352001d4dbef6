"""Fused ops for the per-layer-input (PLE) tail of Gemma-4 E2B/E4B decoder layers, rounding exactly where eager does.

After the MLP, `Gemma4TextDecoderLayer.forward` computes, for m (the MLP output) and r (the residual), rows [.., H]:

    h = r + rmsnorm(m) * w_ff                             # ple_norm_add          (norm rounded, sum rounded)
    g = gelu_tanh(h @ gate.T) * per_layer_input           # torch.mm + ple_gate   (gelu rounded, product rounded)
    out = (h + rmsnorm(g @ proj.T) * w_ple) * layer_scalar  # torch.mm + ple_norm_add (norm, sum, scalar rounded)

The GEMMs stay eager's cuBLAS calls. The three elementwise/row steps around them are one launch each; each keeps its
intermediates in fp32 but rounds to the activation dtype at every point where eager writes a tensor, so bf16/fp16
results differ from eager only through the order of the sum of squares (as in router_input). gelu is ATen's CUDA
formula as nvcc compiles it (`eager_math.gelu_tanh`).

Each op has its eager reference (used on CPU, and as the test oracle) next to its Triton kernel (used on CUDA).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager_math import gelu_tanh, mean_square
from .launch import cuda_kernel, launcher, may_overwrite
from .rows import DTYPES, MAX_HIDDEN, launch_rows, rms_norm, row_output, rows_of


def supports(hidden_size: int, ple_size: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels handle a PLE tail of this width, per-layer-input width and activation dtype."""
    return dtype in DTYPES and 1 <= hidden_size <= MAX_HIDDEN and ple_size >= 1


# --------------------------------------------------------------------------------------------------------------------
# ple_norm_add: out = (residual + rmsnorm(x) * weight) [* scale], rounding after the norm, the add and the scale


def norm_add_reference(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None, eps: float) -> Tensor:
    """The eager ops of `residual + Gemma4RMSNorm(x)`, then `*= layer_scalar` when `scale` is given; x holds the
    residual's rows in any leading shape, and the result has the residual's."""
    out = residual + rms_norm(x, weight, eps).reshape(residual.shape)
    return out if scale is None else out * scale


@triton.jit
def _norm_add_kernel(x_ptr, res_ptr, w_ptr, scale_ptr, out_ptr, x_row_stride, res_row_stride, rows,
                     EPS: tl.constexpr, HAS_SCALE: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(mean_square(x, rows, HIDDEN) + EPS)
    normed = (x * rstd * w).to(res.dtype)
    out = (res.to(tl.float32) + normed.to(tl.float32)).to(res.dtype)
    if HAS_SCALE:
        out = (out.to(tl.float32) * tl.load(scale_ptr).to(tl.float32)).to(res.dtype)
    tl.store(out_ptr + row * HIDDEN + cols, out, mask=mask)


may_overwrite(_norm_add_kernel, out_ptr=("res_ptr",))


def norm_add_triton(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None, eps: float, *,
                    out: Tensor | None = None) -> Tensor:
    """Launch the ple_norm_add kernel; writes into `out` (shaped as the residual, contiguous) when given."""
    _check_norm_add(x, residual, weight, scale)
    out = row_output("ple_norm_add", residual, out)
    (x, x_stride), (residual, res_stride) = rows_of(x), rows_of(residual)
    rows = math.prod(out.shape[:-1])
    launch_rows("ple_norm_add", _norm_add_kernel, rows, out.shape[-1],
                x, residual, weight, weight if scale is None else scale, out, x_stride, res_stride, rows,
                EPS=eps, HAS_SCALE=scale is not None)
    return out


def _check_norm_add(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None) -> None:
    _check_rows("ple_norm_add", "x", x, "residual", residual)
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"ple_norm_add: weight must be a contiguous [{hidden}] {x.dtype} tensor; "
                         f"got shape {tuple(weight.shape)}, dtype {weight.dtype}")
    if scale is not None and (scale.numel() != 1 or scale.dtype != x.dtype):
        raise ValueError(f"ple_norm_add: scale must be a one-element {x.dtype} tensor; "
                         f"got shape {tuple(scale.shape)}, dtype {scale.dtype}")
    for name, t in (("weight", weight), ("scale", scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"ple_norm_add: {name} is on {t.device}, x on {x.device}")


@torch.library.custom_op("gemma4_fx::ple_norm_add", mutates_args=())
def ple_norm_add(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None, eps: float) -> Tensor:
    """`(residual + rmsnorm(x) * weight) * scale` rounded as eager rounds it; on CUDA one Triton launch."""
    _check_norm_add(x, residual, weight, scale)
    return norm_add_reference(x, residual, weight, scale, eps)


cuda_kernel(ple_norm_add)(norm_add_triton)


@ple_norm_add.register_fake
def _(x, residual, weight, scale, eps):
    _check_norm_add(x, residual, weight, scale)
    return residual.new_empty(residual.shape)


# --------------------------------------------------------------------------------------------------------------------
# ple_gate: g = gelu_tanh(gate) * per_layer_input, rounding after the gelu and the product


def gate_reference(gate: Tensor, per_layer_input: Tensor) -> Tensor:
    """The eager ops of `act_fn(per_layer_input_gate(h)) * per_layer_input` after the GEMM; per_layer_input holds
    gate's rows in any leading shape, and the result has gate's."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * per_layer_input.reshape(gate.shape)


@triton.jit
def _gate_kernel(gate_ptr, pli_ptr, out_ptr, rows, cols_n, gate_row_stride, pli_row_stride,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows_ = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (rows_ < rows) & (cols < cols_n)
    gate = tl.load(gate_ptr + rows_ * gate_row_stride + cols, mask=mask, other=0.0)
    pli = tl.load(pli_ptr + rows_ * pli_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gelu = gelu_tanh(gate.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + rows_ * cols_n + cols, (gelu.to(tl.float32) * pli).to(gate.dtype), mask=mask)


may_overwrite(_gate_kernel, out_ptr=("gate_ptr",))


def gate_triton(gate: Tensor, per_layer_input: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Launch the ple_gate kernel; writes into `out` (shaped as gate, contiguous) when given."""
    _check_gate(gate, per_layer_input)
    out = row_output("ple_gate", gate, out)
    (gate, gate_stride), (per_layer_input, pli_stride) = rows_of(gate), rows_of(per_layer_input)
    rows, cols = math.prod(out.shape[:-1]), out.shape[-1]
    block_c = min(triton.next_power_of_2(int(cols)), 1024)  # a launch setting: specialised where symbolic
    block_r = max(1, 2048 // block_c)
    launcher(_gate_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
        gate, per_layer_input, out, rows, cols, gate_stride, pli_stride,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


def _check_gate(gate: Tensor, per_layer_input: Tensor) -> None:
    _check_rows("ple_gate", "gate", gate, "per_layer_input", per_layer_input)


def _check_rows(op: str, name: str, x: Tensor, other_name: str, other: Tensor) -> None:
    """x is [..., width] in a kernel dtype; other holds as many rows of the same width and dtype, on x's device."""
    if x.dim() < 1 or x.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} must be [..., width] with dtype in {DTYPES}; got shape {tuple(x.shape)}, "
                         f"dtype {x.dtype}")
    rows = math.prod(x.shape[:-1])
    if (other.dim() < 1 or other.shape[-1] != x.shape[-1] or math.prod(other.shape[:-1]) != rows
            or other.dtype != x.dtype or other.device != x.device):
        raise ValueError(f"{op}: {other_name} must hold {rows} rows of {x.shape[-1]} {x.dtype} on {x.device}, as "
                         f"{name}; got shape {tuple(other.shape)}, dtype {other.dtype} on {other.device}")


@torch.library.custom_op("gemma4_fx::ple_gate", mutates_args=())
def ple_gate(gate: Tensor, per_layer_input: Tensor) -> Tensor:
    """`gelu_tanh(gate) * per_layer_input` rounded as eager rounds it; on CUDA one Triton launch."""
    _check_gate(gate, per_layer_input)
    return gate_reference(gate, per_layer_input)


cuda_kernel(ple_gate)(gate_triton)


@ple_gate.register_fake
def _(gate, per_layer_input):
    _check_gate(gate, per_layer_input)
    return gate.new_empty(gate.shape)
