"""What the row kernels share: one program per row of a [tokens, hidden] activation, rounding where eager rounds, and
the Gemma RMSNorm that their references (and the patterns that match them) are written in.

They reproduce eager's CUDA arithmetic (`eager_math`) however they are compiled, and launch through `launch.launcher`
so that Inductor can launch them itself.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .launch import launcher

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 16384  # a whole row lives in one program's registers


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """`Gemma4RMSNorm.forward`: normalise and weigh in fp32, round once to x.dtype (no weight: `with_scale=False`)."""
    out = x.float()
    out = out * torch.pow(out.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def row_output(op: str, x: Tensor, out: Tensor | None) -> Tensor:
    """`out` if it can hold the op's result, shaped and typed as `x` (contiguous), else a clear error; a new
    buffer when None."""
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    return out


def rows_of(x: Tensor) -> tuple[Tensor, int]:
    """(x or a [N, H] view or copy of it, its row stride): what a row kernel reads x's rows [.., H] through. A
    contiguous x is passed as it is (Inductor's launch then needs no view of it, which costs host time per call)."""
    if x.is_contiguous():
        return x, x.shape[-1]
    flat = x.reshape(-1, x.shape[-1])
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    return flat, flat.stride(0)


def launch_rows(op: str, kernel, rows: int, hidden: int, *args, **constexprs) -> None:
    """Launch `kernel` over `rows` programs, each holding one row of HIDDEN values (in BLOCK_H, a power of two).

    The width and the kernels' other constants (eps) are constexprs: Triton then compiles a kernel per model width,
    and each launch passes fewer arguments (each costs host time)."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {hidden}; the kernel handles at most {MAX_HIDDEN}")
    hidden = int(hidden)  # a launch setting: specialised where the width is symbolic
    block_h = triton.next_power_of_2(hidden)
    launcher(kernel)[(rows,)](*args, HIDDEN=hidden, BLOCK_H=block_h, num_warps=min(16, max(1, block_h // 512)),
                              **constexprs)
