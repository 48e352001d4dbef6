"""Fused ops for the per-layer-input (PLE) tail of Gemma-4 E2B/E4B decoder layers, rounding exactly where eager does.

After the MLP, `Gemma4TextDecoderLayer.forward` computes, for m (the MLP output), r (the residual), x: [N, H]:

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

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager_math import gelu_tanh, mean_square
from .launch import cuda_kernel, launcher
from .rows import DTYPES, MAX_HIDDEN, launch_rows, rms_norm, row_output


def supports(hidden_size: int, ple_size: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels handle a PLE tail of this width, per-layer-input width and activation dtype."""
    return dtype in DTYPES and 1 <= hidden_size <= MAX_HIDDEN and ple_size >= 1


# --------------------------------------------------------------------------------------------------------------------
# ple_norm_add: out = (residual + rmsnorm(x) * weight) [* scale], rounding after the norm, the add and the scale


def norm_add_reference(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None, eps: float) -> Tensor:
    """The eager ops of `residual + Gemma4RMSNorm(x)`, then `*= layer_scalar` when `scale` is given."""
    out = residual + rms_norm(x, weight, eps)
    return out if scale is None else out * scale


@triton.jit
def _norm_add_kernel(x_ptr, res_ptr, w_ptr, scale_ptr, out_ptr, x_row_stride, res_row_stride, rows, hidden, eps,
                     HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # eps comes as fp64 from Inductor's launches: cast, as the arithmetic is fp32's.
    rstd = tl.math.rsqrt(mean_square(x, rows, hidden) + tl.cast(eps, tl.float32))
    normed = (x * rstd * w).to(res.dtype)
    out = (res.to(tl.float32) + normed.to(tl.float32)).to(res.dtype)
    if HAS_SCALE:
        out = (out.to(tl.float32) * tl.load(scale_ptr).to(tl.float32)).to(res.dtype)
    tl.store(out_ptr + row * hidden + cols, out, mask=mask)


def norm_add_triton(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None, eps: float, *,
                    out: Tensor | None = None) -> Tensor:
    """Launch the ple_norm_add kernel; writes into `out` ([N, H] contiguous, x.dtype) when given."""
    _check_norm_add(x, residual, weight, scale)
    out = row_output("ple_norm_add", x, out)
    rows, hidden = x.shape
    launch_rows("ple_norm_add", _norm_add_kernel, rows, hidden,
                x, residual, weight, weight if scale is None else scale, out, x.stride(0), residual.stride(0), rows,
                hidden, eps, HAS_SCALE=scale is not None)
    return out


def _check_norm_add(x: Tensor, residual: Tensor, weight: Tensor, scale: Tensor | None) -> None:
    if x.dim() != 2 or x.dtype not in DTYPES or x.stride(-1) != 1:
        raise ValueError(f"ple_norm_add: x must be 2-D [tokens, hidden] with unit last stride, dtype in {DTYPES}; "
                         f"got shape {tuple(x.shape)}, stride {x.stride()}, dtype {x.dtype}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
        raise ValueError(f"ple_norm_add: residual must be a {tuple(x.shape)} {x.dtype} tensor with unit last stride; "
                         f"got shape {tuple(residual.shape)}, stride {residual.stride()}, dtype {residual.dtype}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"ple_norm_add: weight must be a contiguous [{x.shape[1]}] {x.dtype} tensor; "
                         f"got shape {tuple(weight.shape)}, dtype {weight.dtype}")
    if scale is not None and (scale.numel() != 1 or scale.dtype != x.dtype):
        raise ValueError(f"ple_norm_add: scale must be a one-element {x.dtype} tensor; "
                         f"got shape {tuple(scale.shape)}, dtype {scale.dtype}")
    for name, t in (("residual", residual), ("weight", weight), ("scale", scale)):
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
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------------------------------------------------
# ple_gate: g = gelu_tanh(gate) * per_layer_input, rounding after the gelu and the product


def gate_reference(gate: Tensor, per_layer_input: Tensor) -> Tensor:
    """The eager ops of `act_fn(per_layer_input_gate(h)) * per_layer_input` after the GEMM."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * per_layer_input


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


def gate_triton(gate: Tensor, per_layer_input: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Launch the ple_gate kernel; writes into `out` ([N, P] contiguous, gate.dtype) when given."""
    _check_gate(gate, per_layer_input)
    out = row_output("ple_gate", gate, out)
    rows, cols = gate.shape
    block_c = min(triton.next_power_of_2(int(cols)), 1024)  # a launch setting: specialised where symbolic
    block_r = max(1, 2048 // block_c)
    launcher(_gate_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
        gate, per_layer_input, out, rows, cols, gate.stride(0), per_layer_input.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


def _check_gate(gate: Tensor, per_layer_input: Tensor) -> None:
    if gate.dim() != 2 or gate.dtype not in DTYPES or gate.stride(-1) != 1:
        raise ValueError(f"ple_gate: gate must be 2-D [tokens, ple] with unit last stride, dtype in {DTYPES}; "
                         f"got shape {tuple(gate.shape)}, stride {gate.stride()}, dtype {gate.dtype}")
    if (per_layer_input.shape != gate.shape or per_layer_input.dtype != gate.dtype
            or per_layer_input.stride(-1) != 1):
        raise ValueError(f"ple_gate: per_layer_input must be a {tuple(gate.shape)} {gate.dtype} tensor with unit last "
                         f"stride; got shape {tuple(per_layer_input.shape)}, stride {per_layer_input.stride()}, "
                         f"dtype {per_layer_input.dtype}")
    if per_layer_input.device != gate.device:
        raise ValueError(f"ple_gate: per_layer_input is on {per_layer_input.device}, gate on {gate.device}")


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
