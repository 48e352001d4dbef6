"""Gemma-4 decoder layer after attention: post-attention norm, residual add, and every norm of the new residual.

    h = residual + rmsnorm(attn, w_post)
    ff_in = rmsnorm(h, w_pre)                               dense and MoE layers
    moe_in = rmsnorm(h.reshape(-1, H), w_moe)               MoE layers
    router_in = router_input(h.reshape(-1, H), ...)         MoE layers whose router the router pattern rewrote

becomes one `gemma4_fx.post_attn_norm` launch: h is read back from registers, not memory, and its norms share one
sum of squares. Three variants, tried widest first so that a MoE layer is never taken by the dense one: with the
rewritten router's input (not under `router_exact`, whose point is eager's own kernels there), MoE (the router's own
norm, if left, reads h), dense. Matched at the aten level, so any module with this math matches.
"""

from __future__ import annotations

import functools

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement

from ..passes.context import current
from ..replacements import post_attn_norm as norm_ops
from ..replacements import router as router_ops
from ..replacements.rows import rms_norm
from .matcher_utils import stand_ins, trace

NAME = "post_attn_norm"
aten = torch.ops.aten


def dense_pattern(attn, residual, post_weight, pre_weight, eps_post, eps_pre):
    h = residual + rms_norm(attn, post_weight, eps_post)
    return h, rms_norm(h, pre_weight, eps_pre)


def moe_pattern(attn, residual, post_weight, pre_weight, moe_weight, eps_post, eps_pre, eps_moe):
    """`flat` is an output because the router reads it too: the pattern matcher rejects inner nodes with outside
    users."""
    h, ff_in = dense_pattern(attn, residual, post_weight, pre_weight, eps_post, eps_pre)
    flat = h.reshape(-1, h.shape[-1])
    return h, ff_in, flat, rms_norm(flat, moe_weight, eps_moe)


def moe_router_pattern(attn, residual, post_weight, pre_weight, moe_weight, router_scale, eps_post, eps_pre, eps_moe,
                       eps_router, root_size):
    h, ff_in, flat, moe_in = moe_pattern(attn, residual, post_weight, pre_weight, moe_weight, eps_post, eps_pre,
                                         eps_moe)
    return h, ff_in, router_ops.router_input(flat, router_scale, eps_router, root_size, False), moe_in


def dense_replacement(attn, residual, post_weight, pre_weight, eps_post, eps_pre):
    h, ff_in = torch.ops.gemma4_fx.post_attn_norm(attn, residual, post_weight, pre_weight, [eps_post, eps_pre])
    return h, ff_in


def moe_replacement(attn, residual, post_weight, pre_weight, moe_weight, eps_post, eps_pre, eps_moe):
    h, ff_in, moe_in = torch.ops.gemma4_fx.post_attn_norm(attn, residual, post_weight, pre_weight,
                                                          [eps_post, eps_pre, eps_moe], moe_weight)
    return h, ff_in, h.reshape(-1, h.shape[-1]), moe_in


def moe_router_replacement(attn, residual, post_weight, pre_weight, moe_weight, router_scale, eps_post, eps_pre,
                           eps_moe, eps_router, root_size):
    h, ff_in, moe_in, router_in = torch.ops.gemma4_fx.post_attn_norm(
        attn, residual, post_weight, pre_weight, [eps_post, eps_pre, eps_moe, eps_router], moe_weight, router_scale,
        root_size)
    return h, ff_in, router_in, moe_in


_SCALARS = stand_ins(NAME)  # traced as wildcards (`matcher_utils.STAND_INS`)
_TENSORS = ("attn", "residual", "post_weight", "pre_weight", "moe_weight", "router_scale")
_VARIANTS = (  # widest first; (pattern, replacement, weights, scalars)
    ("moe_router", moe_router_pattern, moe_router_replacement, 4, ("eps_post", "eps_pre", "eps_moe", "eps_router",
                                                                   "root_size")),
    ("moe", moe_pattern, moe_replacement, 3, ("eps_post", "eps_pre", "eps_moe")),
    ("dense", dense_pattern, dense_replacement, 2, ("eps_post", "eps_pre")),
)


def _unsupported(match: Match) -> str | None:
    """Why the kernel cannot take this match's operands, or None."""
    attn, residual, *weights = (match.kwargs[name].meta["val"] for name in _TENSORS if name in match.kwargs)
    hidden = attn.shape[-1]
    if not isinstance(hidden, int):
        return "symbolic hidden size"
    if attn.device.type not in ("cuda", "cpu"):
        return f"device {attn.device.type}"
    if not norm_ops.supports(hidden, attn.dtype):
        return (f"{attn.dtype} rows of {hidden} are outside the kernel's range (dtypes "
                f"{', '.join(map(str, norm_ops.DTYPES))}, hidden <= {norm_ops.MAX_HIDDEN})")
    if residual.shape != attn.shape or residual.dtype != attn.dtype:
        return f"residual {residual.dtype} {tuple(residual.shape)} differs from attn {attn.dtype} {tuple(attn.shape)}"
    for w in weights:
        if tuple(w.shape) != (hidden,) or w.dtype not in norm_ops.DTYPES or w.stride(-1) != 1:
            return f"norm weight is {w.dtype} {tuple(w.shape)} stride {w.stride()}, want a contiguous ({hidden},) vector"
    # Some Inductors hand this check a re-traced match whose float literals are not keyword args: floats then.
    if any(not isinstance(match.kwargs.get(name, 0.0), (int, float)) for name in _SCALARS):
        return "eps or root_size is not a Python float (under dynamic=True they are 0-d tensors)"
    return None


def _check(match: Match) -> bool:
    anchor = match.output_nodes()[0]  # h, the residual add
    if all(user in match.nodes for user in anchor.users):
        return False  # h only feeds its norms: not the residual stream (MoE layers' h1 + h2 -> post_ff norm)
    return current().decide(NAME, anchor, _unsupported(match))


@functools.cache
def _patterns(variant: str) -> PatternMatcherPass:
    """One variant's patterns in every supported dtype, and in float64 to say why it is left alone (the rewritten
    router's input exists in supported dtypes only)."""
    _, pattern, replacement, weights, scalars = next(v for v in _VARIANTS if v[0] == variant)
    patterns = PatternMatcherPass(pass_name=f"gemma4_fx_post_attn_norm_{variant}")
    for dtype in norm_ops.DTYPES + ((torch.float64,) if variant != "moe_router" else ()):
        tensors = [torch.empty(2, 3, 16, dtype=dtype), torch.empty(2, 3, 16, dtype=dtype)]
        tensors += [torch.empty(16, dtype=dtype) for _ in range(weights)]
        register_replacement(pattern, replacement, tensors + [_SCALARS[name] for name in scalars], trace, patterns,
                             extra_check=_check, scalar_workaround=stand_ins(NAME, scalars))
    return patterns


def apply(graph: torch.fx.Graph, ctx) -> None:
    exact = ctx.options.get("router_exact", False)
    for variant, *_ in _VARIANTS:
        if not (exact and variant == "moe_router"):
            _patterns(variant).apply(graph)
