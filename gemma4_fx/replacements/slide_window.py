"""A full sliding-window cache takes one new token per sequence, in place: `gemma4_fx::slide_window`.

For a cache [B, H, W, D] (a sliding layer's keys or values, its W rows the window) and new [B, H, 1, D]:

    cache[:, :, :W-1] = cache[:, :, 1:]      # every row moves one toward the start, the oldest drops out
    cache[:, :, W-1] = new                   # and the new token takes the last row

Why: transformers' `StaticSlidingWindowLayer` does this with a roll into a new tensor, the new row written there and
a copy back (`cache.copy_(rolled)`): the window is read twice and written twice per step, per sliding layer, for K
and for V (at 26B-A4B and bs 64, a third of the decode step: BENCHMARKS.md). In place it is read once and written
once.

The kernel, grid (B * H, chunks of CHUNK rows): each program moves the rows of one chunk, loading all of them before
it stores any (a barrier between), so it overwrites only rows it has read. The row after a chunk belongs to the next
program, which may already have overwritten it: those rows ("edges") are copied out first, by one strided copy of
(W / CHUNK) rows per (sequence, head). The last chunk's last row takes `new`. Every element is copied, so the result
is bitwise the eager one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 8192  # elements a program holds: CHUNK rows of BLOCK_D


def slide_window_reference(cache: Tensor, new: Tensor) -> None:
    """The math above with eager ops (what transformers' roll, write and copy back leave in the cache)."""
    cache.copy_(torch.cat([cache[:, :, 1:], new], dim=2))


@triton.jit
def _slide_window_kernel(cache_ptr, new_ptr, edges_ptr, rows, heads, new_stride_b, new_stride_h,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """Rows [chunk * CHUNK, +CHUNK) of one (sequence, head) take the row after each: from the chunk itself, or for
    its last row from edges[bh, chunk] (the next chunk's first row, copied before the launch) or from `new`."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    r = chunk * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    last = tl.minimum(chunk * CHUNK + CHUNK, rows) - 1  # the chunk's last row: its source is outside the chunk
    window = cache_ptr + bh.to(tl.int64) * rows * D
    x = tl.load(window + (r + 1)[:, None] * D + d[None, :], mask=(r < last)[:, None] & in_d[None, :], other=0.0)
    b = bh // heads
    from_new = tl.load(new_ptr + b * new_stride_b + (bh % heads) * new_stride_h + d,
                       mask=in_d & (last == rows - 1), other=0.0)
    from_edge = tl.load(edges_ptr + (bh * (chunks - 1) + chunk) * D + d, mask=in_d & (last < rows - 1), other=0.0)
    tail = tl.where(last == rows - 1, from_new, from_edge)
    x = tl.where((r == last)[:, None], tail[None, :], x)
    tl.debug_barrier()  # every thread's loads done before any store overwrites a row another thread reads
    tl.store(window + r[:, None] * D + d[None, :], x, mask=(r <= last)[:, None] & in_d[None, :])


def slide_window_triton(cache: Tensor, new: Tensor, *, chunk: int | None = None) -> None:
    """The edge copy and the launch; `chunk` (a power of two) overrides the rows per program (tests)."""
    check_inputs(cache, new)
    batch, heads, rows, dim = cache.shape
    if batch * heads == 0:
        return
    block_d = triton.next_power_of_2(dim)
    chunk = chunk or min(max(1, TILE // block_d), triton.next_power_of_2(rows))
    chunks = triton.cdiv(rows, chunk)
    edges = cache.view(batch * heads, rows, dim)[:, chunk::chunk].contiguous()  # [B * H, chunks - 1, D]
    _slide_window_kernel[(batch * heads, chunks)](
        cache, new, edges if edges.numel() else cache, rows, heads, new.stride(0), new.stride(1), D=dim,
        BLOCK_D=block_d, CHUNK=chunk, num_warps=4)


def check_inputs(cache: Tensor, new: Tensor) -> None:
    """A ValueError naming the first argument the kernel cannot take."""
    if cache.dim() != 4 or cache.dtype not in DTYPES or not cache.is_contiguous() or cache.shape[2] < 1:
        raise ValueError(f"slide_window: cache must be a contiguous [batch, heads, window, dim] tensor with a window "
                         f"of at least one row, dtype in {DTYPES}; got shape {tuple(cache.shape)}, stride "
                         f"{cache.stride()}, dtype {cache.dtype}")
    batch, heads, _, dim = cache.shape
    if tuple(new.shape) != (batch, heads, 1, dim) or new.dtype != cache.dtype or new.device != cache.device \
            or new.stride(-1) != 1:
        raise ValueError(f"slide_window: new must be a [{batch}, {heads}, 1, {dim}] {cache.dtype} tensor on "
                         f"{cache.device} with unit last stride; got shape {tuple(new.shape)}, stride "
                         f"{new.stride()}, dtype {new.dtype} on {new.device}")


@torch.library.custom_op("gemma4_fx::slide_window", mutates_args=("cache",))
def slide_window(cache: Tensor, new: Tensor) -> None:
    """Shift `cache`'s rows one toward the start and write `new` in the last, in place: on CUDA the Triton kernel,
    elsewhere the reference."""
    check_inputs(cache, new)
    if cache.is_cuda:
        slide_window_triton(cache, new)
    else:
        slide_window_reference(cache, new)


@slide_window.register_fake
def _(cache, new):
    check_inputs(cache, new)
