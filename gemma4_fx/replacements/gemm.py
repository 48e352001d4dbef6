"""What the GEMM kernels (`moe_experts.py`, `skinny_linear.py`) share: a `tl.dot` that the Triton interpreter gets
right, and eager's gelu-tanh gate as an epilogue on fp32 accumulators."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _mma_dot(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _fp32_dot(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


# The interpreter's dot multiplies bf16 operands' raw bits: it gets them in fp32, where their products are exact.
dot = _fp32_dot if triton.knobs.runtime.interpret else _mma_dot


@triton.jit
def _libdevice_tanh(x):
    return libdevice.tanh(x)


@triton.jit
def _exp_tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(x, 20.0)) + 1.0)  # tanh(20) is 1 in fp32


# CUDA eager's gelu calls tanhf, libdevice's __nv_tanhf. The interpreter has no libdevice: an exp form stands in.
_tanh = _exp_tanh if triton.knobs.runtime.interpret else _libdevice_tanh


@triton.jit
def gelu_tanh(x):
    """ATen's GeluCUDAKernelImpl (approximate="tanh") in fp32: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + _tanh(inner))


@triton.jit
def gelu_tanh_mul(acc_gate, acc_up, dtype: tl.constexpr):
    """`gelu_tanh(gate) * up` in `dtype` as eager computes it after two GEMMs that accumulate in fp32: each GEMM's
    output rounded to `dtype`, the gelu in fp32 and rounded, the product in fp32 and rounded."""
    gate = acc_gate.to(dtype).to(tl.float32)
    return (gelu_tanh(gate).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
