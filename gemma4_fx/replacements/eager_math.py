"""Eager's CUDA arithmetic in Triton: the few operations whose bits depend on how they are compiled.

The kernels reproduce what eager's CUDA kernels compute, and they must do so however they are compiled: launched by
us with Triton's defaults, or by Inductor from its own generated code (`passes/inductor_launch.py`), whose compile
options we do not choose. Two things differ between those builds and eager's:
- FP contraction: with Triton's default `enable_fp_fusion`, a product feeding an add may become one FMA, which eager's
  kernels round twice. `mul_rn` is a multiply the compiler never fuses (PTX `mul.rn.f32`).
- Special functions: eager's softmax and gelu call `expf` / `tanhf`, i.e. libdevice's `__nv_expf` / `__nv_tanhf`;
  so do `exp` and `tanh` here. Triton links libdevice flushing subnormals (`enable_reflect_ftz`, on by default and
  under Inductor): where expf's result is subnormal (below 2**-126), `exp` gives another value below 2**-126;
  elsewhere both are eager's bit for bit (`tests/test_router_kernels.py`, on the GPU).

The interpreter (TRITON_INTERPRET=1, CPU) has no libdevice and does not fuse: plain numpy-backed ops stand in.
Each helper branches on `INTERPRET` inside one function (not an alias per build): Inductor copies a kernel's helpers
into its generated code by the names the kernel calls them.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def mul_rn(a, b):
    """a * b in fp32, rounded, never fused into a following add."""
    if INTERPRET:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def exp(x):
    """libdevice's expf (eager's softmax); where its result is subnormal, another value below 2**-126."""
    if INTERPRET:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def tanh(x):
    """libdevice's tanhf (eager's gelu)."""
    if INTERPRET:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def gelu_tanh(x):
    """ATen's GeluCUDAKernelImpl (approximate="tanh") on fp32 x: 0.5x * (1 + tanh(kBeta * (x + kKappa * x³))),
    where nvcc contracts `x + kKappa * x³` into one fma and nothing else (kBeta = sqrt(2/pi), kKappa = 0.044715,
    both fp32)."""
    inner = 0.7978845608028654 * tl.fma(0.044715, x * x * x, x)
    return (0.5 * x) * (1.0 + tanh(inner))


@triton.jit
def mean_square(x, rows, hidden):
    """ATen's CUDA `x.pow(2).mean(-1)` of a row x (fp32, padded with 0) of a [rows, hidden] tensor: squares rounded
    to fp32, summed, times float(rows) / float(rows * hidden) in fp32 (MeanOps' factor, fp32(1/hidden) whenever
    rows * hidden is exact in fp32)."""
    factor = tl.math.div_rn(tl.cast(rows, tl.float32), tl.cast(tl.cast(rows, tl.int64) * hidden, tl.float32))
    return mul_rn(tl.sum(mul_rn(x, x), axis=0), factor)
