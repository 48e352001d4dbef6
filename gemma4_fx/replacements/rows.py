"""What the row kernels share: one program per row of a [tokens, hidden] activation, rounding where eager rounds, and
the Gemma RMSNorm that their references (and the patterns that match them) are written in.

They reproduce eager's CUDA arithmetic, so they compile the way eager's kernels compute: products that eager
rounds to fp32 stay out of FMAs (`enable_fp_fusion=False`) and libdevice's rsqrt is the non-flushing
`rsqrt.approx.f32` that eager's `rsqrtf` is (`enable_reflect_ftz=False`).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 16384  # a whole row lives in one program's registers
EAGER_ARITHMETIC = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """`Gemma4RMSNorm.forward`: normalise and weigh in fp32, round once to x.dtype (no weight: `with_scale=False`)."""
    out = x.float()
    out = out * torch.pow(out.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def mean_factor(rows: int, hidden: int) -> float:
    """What ATen's CUDA mean multiplies the sum by: float(num_outputs) / numel in fp32, which is fp32(1/H) whenever
    N*H is exact in fp32 (e.g. N*H <= 2**24)."""
    return float(np.float32(rows) / np.float32(rows * hidden))


def row_output(op: str, x: Tensor, out: Tensor | None) -> Tensor:
    """`out` if it can hold the op's [N, H] result for `x` (contiguous, x.dtype), else a clear error; a new
    buffer when None."""
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    return out


def launch_rows(op: str, kernel, rows: int, hidden: int, *args, **constexprs) -> None:
    """Launch `kernel` over `rows` programs, each holding one row of `hidden` values (BLOCK_H, a power of two)."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {hidden}; the kernel handles at most {MAX_HIDDEN}")
    if rows == 0:
        return
    block_h = triton.next_power_of_2(hidden)
    kernel[(rows,)](*args, BLOCK_H=block_h, num_warps=min(16, max(1, block_h // 512)), **constexprs,
                    **EAGER_ARITHMETIC)
