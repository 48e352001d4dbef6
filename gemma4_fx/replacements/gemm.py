"""What the GEMM and attention kernels (`moe_experts.py`, `skinny_linear.py`, `decode_attention.py`,
`prefill_attention.py`) share: a `tl.dot` that the Triton interpreter gets right, eager's gelu-tanh gate as an
epilogue on fp32 accumulators, and flash attention's online softmax step."""

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


LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x log2(e))


@triton.jit
def online_softmax_step(scores, v, m, l, acc):
    """One block of keys in flash attention's online softmax, in base 2: `scores` [R, S] (fp32, the scaled scores
    times log2(e), so that 2^s = e^(scaled score); -inf where a key is hidden) and `v` [S, D] update the running max
    `m` [R], sum `l` [R] and weighted sum of v `acc` [R, D] (fp32): m' = max(m, max_j s_j),
    l' = l 2^(m - m') + sum_j 2^(s_j - m'), acc' = acc 2^(m - m') + sum_j 2^(s_j - m') v_j, with p = 2^(s_j - m')
    rounded to v's dtype for the product, as flash kernels do (base 2 folds exp's multiply by log2(e) into the
    scale's). A row with no visible key so far keeps m = -inf, l = 0, acc = 0."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no visible key yet: nothing to rescale
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    return m_new, l * alpha + tl.sum(p, 1), dot(p.to(v.dtype), v, acc * alpha[:, None], "ieee")
