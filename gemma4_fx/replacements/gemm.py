"""What the GEMM kernels (`moe_experts.py`, `skinny_linear.py`) share: a `tl.dot` that the Triton interpreter gets
right, and eager's gelu-tanh gate as an epilogue on fp32 accumulators."""

from __future__ import annotations

import triton
import triton.language as tl

from .eager_math import INTERPRET, gelu_tanh


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b on tensor cores; the interpreter's dot multiplies bf16 operands' raw bits, so there it gets them
    in fp32, where their products are exact."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def gelu_tanh_mul(acc_gate, acc_up, dtype: tl.constexpr):
    """`gelu_tanh(gate) * up` in `dtype` as eager computes it after two GEMMs that accumulate in fp32: each GEMM's
    output rounded to `dtype`, the gelu in fp32 and rounded, the product in fp32 and rounded."""
    gate = acc_gate.to(dtype).to(tl.float32)
    return (gelu_tanh(gate).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
