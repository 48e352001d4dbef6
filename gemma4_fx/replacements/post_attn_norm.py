"""One fused op for the norms around a Gemma-4 decoder layer's attention residual (`Gemma4TextDecoderLayer.forward`).

After `o_proj` the layer computes, per row of attn: [.., H] and residual: [.., H],

    h = residual + rmsnorm(attn, w_post)                          # post_attention_layernorm, residual add
    ff_in = rmsnorm(h, w_pre)                                     # pre_feedforward_layernorm
    moe_in = rmsnorm(h, w_moe)                                    # pre_feedforward_layernorm_2 (MoE layers)
    router_in = rmsnorm(h) * scale * H**-0.5                      # the router's prologue (MoE layers)

Every norm of h shares one sum of squares, so one program per row reads attn and residual once and writes h and each
normalised output, rounding to the model dtype where eager rounds (each norm's output; h after the add; the router
input after the norm, after ·scale, after ·root_size). As in `router.router_input`, only the order in which the sums of
squares are added differs from eager's.

The op has its eager reference (used on CPU, and as the test oracle) next to its Triton kernel (used on CUDA).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager_math import mean_square
from .launch import cuda_kernel, may_overwrite
from .rows import DTYPES, MAX_HIDDEN, launch_rows, rms_norm, rows_of

def supports(hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel handles rows of this width and dtype (one row per program)."""
    return dtype in DTYPES and 1 <= hidden_size <= MAX_HIDDEN


def post_attn_norm_reference(attn: Tensor, residual: Tensor, post_weight: Tensor, pre_weight: Tensor,
                             eps: list[float], moe_weight: Tensor | None = None, router_scale: Tensor | None = None,
                             root_size: float = 1.0) -> list[Tensor]:
    """The eager ops: [h, ff_in] for dense layers, then moe_in when `moe_weight`, then router_in when `router_scale`.
    moe_in and router_in are [tokens, H], as the MoE block flattens h."""
    h = residual + rms_norm(attn, post_weight, eps[0])
    outs = [h, rms_norm(h, pre_weight, eps[1])]
    flat = h.reshape(-1, h.shape[-1])
    if moe_weight is not None:
        outs.append(rms_norm(flat, moe_weight, eps[2]))
    if router_scale is not None:
        outs.append(rms_norm(flat, None, eps[-1]) * router_scale * root_size)
    return outs


@triton.jit
def _post_attn_norm_kernel(attn_ptr, res_ptr, post_w_ptr, pre_w_ptr, moe_w_ptr, scale_ptr,
                           h_ptr, ff_ptr, moe_ptr, router_ptr, attn_row_stride, res_row_stride, rows,
                           EPS_POST: tl.constexpr, EPS_PRE: tl.constexpr, EPS_MOE: tl.constexpr,
                           EPS_ROUTER: tl.constexpr, ROOT_SIZE: tl.constexpr, MOE: tl.constexpr, ROUTER: tl.constexpr,
                           HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < HIDDEN
    attn = tl.load(attn_ptr + row * attn_row_stride + cols, mask=mask, other=0.0)
    dtype = attn.dtype
    a = attn.to(tl.float32)
    res = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(post_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # pow(t, -0.5) is CUDA's rsqrtf.
    normed = (a * tl.math.rsqrt(mean_square(a, rows, HIDDEN) + EPS_POST) * w).to(dtype)
    h = (res + normed.to(tl.float32)).to(dtype)
    out = row * HIDDEN + cols
    tl.store(h_ptr + out, h, mask=mask)

    hf = h.to(tl.float32)
    mean_sq = mean_square(hf, rows, HIDDEN)
    w = tl.load(pre_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ff_ptr + out, (hf * tl.math.rsqrt(mean_sq + EPS_PRE) * w).to(dtype), mask=mask)
    if MOE:
        w = tl.load(moe_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(moe_ptr + out, (hf * tl.math.rsqrt(mean_sq + EPS_MOE) * w).to(dtype), mask=mask)
    if ROUTER:
        scale = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        r = (hf * tl.math.rsqrt(mean_sq + EPS_ROUTER)).to(dtype)
        r = (r.to(tl.float32) * scale).to(dtype)
        tl.store(router_ptr + out, (r.to(tl.float32) * ROOT_SIZE).to(dtype), mask=mask)


# h replaces the residual stream. (Declared over the attention output too, ff got a copy of it from Inductor on the
# GPU instead of its buffer.)
may_overwrite(_post_attn_norm_kernel, h_ptr=("res_ptr",))


def post_attn_norm_triton(attn: Tensor, residual: Tensor, post_weight: Tensor, pre_weight: Tensor, eps: list[float],
                          moe_weight: Tensor | None = None, router_scale: Tensor | None = None,
                          root_size: float = 1.0, *, out: list[Tensor] | None = None) -> list[Tensor]:
    """Launch the kernel; writes into `out` (tensors shaped as the reference's outputs, contiguous) when given."""
    _check(attn, residual, post_weight, pre_weight, eps, moe_weight, router_scale)
    hidden = attn.shape[-1]
    want = _empty_outputs(residual, moe_weight, router_scale)
    if out is None:
        out = want
    elif len(out) != len(want) or any(o.shape != w.shape or o.dtype != w.dtype or not o.is_contiguous()
                                      for o, w in zip(out, want)):
        raise ValueError(f"post_attn_norm: out must be {len(want)} contiguous {attn.dtype} tensors shaped "
                         f"{[tuple(w.shape) for w in want]}")
    (a, a_stride), (r, r_stride) = rows_of(attn), rows_of(residual)
    h, ff, *rest = out
    # An absent output's pointer is never written: it points at a weight, so no output is passed twice (which
    # Inductor's launch would take for two writes into one buffer) and the residual once (h may then be stored over
    # it: `may_overwrite` below).
    moe = rest.pop(0) if moe_weight is not None else post_weight
    router = rest.pop(0) if router_scale is not None else post_weight
    rows = math.prod(attn.shape[:-1])
    launch_rows("post_attn_norm", _post_attn_norm_kernel, rows, hidden,
                a, r, post_weight, pre_weight, post_weight if moe_weight is None else moe_weight,
                post_weight if router_scale is None else router_scale, h, ff, moe, router, a_stride, r_stride,
                rows, EPS_POST=eps[0], EPS_PRE=eps[1],
                EPS_MOE=eps[2] if moe_weight is not None else 0.0, EPS_ROUTER=eps[-1], ROOT_SIZE=root_size,
                MOE=moe_weight is not None, ROUTER=router_scale is not None)
    return out


def _empty_outputs(residual: Tensor, moe_weight: Tensor | None, router_scale: Tensor | None) -> list[Tensor]:
    flat = (math.prod(residual.shape[:-1]), residual.shape[-1])
    outs = [residual.new_empty(residual.shape), residual.new_empty(residual.shape)]
    return outs + [residual.new_empty(flat) for t in (moe_weight, router_scale) if t is not None]


def _check(attn, residual, post_weight, pre_weight, eps, moe_weight, router_scale) -> None:
    if attn.dim() < 1 or attn.dtype not in DTYPES:
        raise ValueError(f"post_attn_norm: attn must be [..., hidden] with dtype in {DTYPES}; "
                         f"got shape {tuple(attn.shape)}, dtype {attn.dtype}")
    if residual.shape != attn.shape or residual.dtype != attn.dtype or residual.device != attn.device:
        raise ValueError(f"post_attn_norm: residual must be a {tuple(attn.shape)} {attn.dtype} tensor on "
                         f"{attn.device}; got {tuple(residual.shape)} {residual.dtype} on {residual.device}")
    hidden = attn.shape[-1]
    for name, w in (("post_weight", post_weight), ("pre_weight", pre_weight), ("moe_weight", moe_weight),
                    ("router_scale", router_scale)):
        if w is not None and (w.shape != (hidden,) or w.dtype not in DTYPES or not w.is_contiguous()
                              or w.device != attn.device):
            raise ValueError(f"post_attn_norm: {name} must be a contiguous [{hidden}] tensor on {attn.device}, dtype "
                             f"in {DTYPES}; got shape {tuple(w.shape)}, dtype {w.dtype} on {w.device}")
    norms = 2 + (moe_weight is not None) + (router_scale is not None)
    if len(eps) != norms:
        raise ValueError(f"post_attn_norm: eps must hold one value per norm ({norms}); got {len(eps)}")


@torch.library.custom_op("gemma4_fx::post_attn_norm", mutates_args=())
def post_attn_norm(attn: Tensor, residual: Tensor, post_weight: Tensor, pre_weight: Tensor, eps: list[float],
                   moe_weight: Tensor | None = None, router_scale: Tensor | None = None,
                   root_size: float = 1.0) -> list[Tensor]:
    """[h, ff_in, (moe_in), (router_in)] of a decoder layer after attention; on CUDA one Triton launch."""
    _check(attn, residual, post_weight, pre_weight, eps, moe_weight, router_scale)
    return post_attn_norm_reference(attn, residual, post_weight, pre_weight, eps, moe_weight, router_scale, root_size)


cuda_kernel(post_attn_norm)(post_attn_norm_triton)


@post_attn_norm.register_fake
def _(attn, residual, post_weight, pre_weight, eps, moe_weight=None, router_scale=None, root_size=1.0):
    _check(attn, residual, post_weight, pre_weight, eps, moe_weight, router_scale)
    return _empty_outputs(residual, moe_weight, router_scale)
