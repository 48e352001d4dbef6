"""Gemma-4 decoder layer after attention: post-attention norm, residual add, and every norm of the new residual.

    h = residual + rmsnorm(attn, w_post)                    (the add in either order)
    ff_in = rmsnorm(h, w_pre)                               dense and MoE layers
    moe_in = rmsnorm(h.reshape(-1, H), w_moe)               MoE layers
    router_in = router_input(h.reshape(-1, H), ...)         MoE layers whose router the router pattern rewrote

becomes one `gemma4_fx.post_attn_norm` launch: h is read back from registers, not memory, and its norms share one
sum of squares. Three variants, tried widest first so that a MoE layer is never taken by the dense one: with the
rewritten router's input (not under `router_exact`, whose point is eager's own kernels there), MoE (the router's own
norm, if left, reads h), dense. On [tokens, hidden] (engines) the MoE norm reads h itself: the dense variant takes
the layer and `_widen` adds the MoE norm and the router's input to its launch. Matched at the aten level, in each
RMSNorm form (`matcher_utils.NORM_FORMS`, engines' norm ops), so any module with this math matches.
"""

from __future__ import annotations

import functools
import itertools
import operator

import torch
from torch._guards import detect_fake_mode
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement

from ..fx_utils import value
from ..passes.context import current
from ..replacements import post_attn_norm as norm_ops
from ..replacements import router as router_ops
from ..replacements.rows import rms_norm
from .matcher_utils import (RESIDUAL_ADDS, NormForm, bind, computed, norm_below, norm_forms, residual_first,
                            stand_ins, trace)

NAME = "post_attn_norm"
aten = torch.ops.aten


def dense_pattern(attn, residual, post_weight, pre_weight, eps_post, eps_pre, norm=rms_norm, add=residual_first):
    h = add(residual, norm(attn, post_weight, eps_post))
    return h, norm(h, pre_weight, eps_pre)


def moe_pattern(attn, residual, post_weight, pre_weight, moe_weight, eps_post, eps_pre, eps_moe, norm=rms_norm,
                add=residual_first):
    """`flat` is an output because the router reads it too: the pattern matcher rejects inner nodes with outside
    users."""
    h, ff_in = dense_pattern(attn, residual, post_weight, pre_weight, eps_post, eps_pre, norm, add)
    flat = h.reshape(-1, h.shape[-1])
    return h, ff_in, flat, norm(flat, moe_weight, eps_moe)


def moe_router_pattern(attn, residual, post_weight, pre_weight, moe_weight, router_scale, eps_post, eps_pre, eps_moe,
                       eps_router, root_size, norm=rms_norm, add=residual_first):
    h, ff_in, flat, moe_in = moe_pattern(attn, residual, post_weight, pre_weight, moe_weight, eps_post, eps_pre,
                                         eps_moe, norm, add)
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
_MOE_ROUTER_SCALARS = ("eps_post", "eps_pre", "eps_moe", "eps_router", "root_size")
_VARIANTS = (  # widest first; (name, pattern, replacement, weights, scalars)
    ("moe_router", moe_router_pattern, moe_router_replacement, 4, _MOE_ROUTER_SCALARS),
    ("moe", moe_pattern, moe_replacement, 3, _MOE_ROUTER_SCALARS[:3]),
    ("dense", dense_pattern, dense_replacement, 2, _MOE_ROUTER_SCALARS[:2]),
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


def _check(match: Match, form: NormForm) -> bool:
    anchor = match.output_nodes()[0]  # h, the residual add
    if all(user in match.nodes for user in anchor.users):
        return False  # h only feeds its norms: not the residual stream (MoE layers' h1 + h2 -> post_ff norm)
    if computed(match.kwargs[name] for name in _TENSORS[2:] if name in match.kwargs):
        return False  # not a Gemma-4 norm (see `computed`)
    reason = _unsupported(match) or form.reason(match.kwargs["attn"].meta["val"].dtype)
    return current().decide(NAME, anchor, reason)


@functools.cache
def _patterns(variant: str, form: NormForm) -> PatternMatcherPass:
    """One variant's patterns with norms written in `form`, either order of the residual add, in every supported
    dtype, and in float64 to say why it is left alone (the rewritten router's input exists in supported dtypes
    only)."""
    _, pattern, replacement, weights, scalars = next(v for v in _VARIANTS if v[0] == variant)
    patterns = PatternMatcherPass(pass_name=f"gemma4_fx_post_attn_norm_{variant}_{form.name}")
    dtypes = norm_ops.DTYPES + ((torch.float64,) if variant != "moe_router" else ())
    for dtype, add in itertools.product(dtypes, RESIDUAL_ADDS):
        tensors = [torch.empty(2, 3, 16, dtype=dtype), torch.empty(2, 3, 16, dtype=dtype)]
        tensors += [torch.empty(16, dtype=dtype) for _ in range(weights)]
        register_replacement(bind(pattern, norm=form.fn, add=add), replacement,
                             tensors + [_SCALARS[name] for name in scalars], trace, patterns,
                             extra_check=functools.partial(_check, form=form),
                             scalar_workaround=stand_ins(NAME, scalars), skip_duplicates=True)
    return patterns


def _widen(graph: torch.fx.Graph, ctx, forms) -> None:
    """Fold the rest of a flat MoE layer into its `post_attn_norm` launch. On [tokens, hidden] (an engine's layout)
    the MoE's norm reads h itself, as the feed-forward norm does: the two are alike to the pattern matcher, which
    then matches one norm for both, so the MoE variants cannot take such a layer and the dense one does. This adds
    the layer's other norm of h, and the rewritten router's input (not under `router_exact`), to that launch."""
    op = torch.ops.gemma4_fx.post_attn_norm.default
    for node in graph.find_nodes(op="call_function", target=op):
        outputs = {user.args[1]: user for user in node.users}
        h = outputs.get(0)
        if len(node.args) != 5 or node.kwargs or h is None or value(h).dim() != 2:
            continue
        moe = norm_below([h], forms, weighted=True)  # not a computed weight: Gemma-2/3's `1 + w` is not matched
        if moe is None:
            continue
        match, form = moe
        router = [] if ctx.options.get("router_exact", False) else [
            user for user in h.users if user.target == torch.ops.gemma4_fx.router_input.default
            and user.args[0] is h and user.args[4] is False and isinstance(user.args[2], float)
            and isinstance(user.args[3], float)][:1]
        weights = [match.kwargs["weight"]] + [r.args[1] for r in router]
        reason = form.reason(value(h).dtype) or _weights_unsupported(weights, value(h))
        if reason:
            ctx.skipped(NAME, h, f"MoE norm of the flat layer left to Inductor: {reason}")
            continue
        attn, residual, post_weight, pre_weight, eps = node.args
        args = [attn, residual, post_weight, pre_weight, [*eps, match.kwargs["eps"]], weights[0]]
        if router:
            args[4].append(router[0].args[2])
            args += [router[0].args[1], router[0].args[3]]
        with graph.inserting_before(node):
            wide = graph.call_function(op, tuple(args))
            wide.meta.update(_provenance(node.meta), val=_fake(op, args))
            items = [graph.call_function(operator.getitem, (wide, i)) for i in range(2 + len(weights))]
        for item, val in zip(items, wide.meta["val"]):
            item.meta.update(_provenance(h.meta), val=val)
        for old, new in [*((outputs[i], items[i]) for i in sorted(outputs)), (match.output_node(), items[2]),
                         *((r, items[3]) for r in router)]:
            old.replace_all_uses_with(new)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for old in sorted({*match.nodes, *router, *outputs.values(), node}, key=order.get, reverse=True):
            if not old.users:
                graph.erase_node(old)


def _weights_unsupported(weights, h) -> str | None:
    """Why the kernel cannot take these weights of `h`'s norms (`_unsupported`'s check), or None."""
    hidden = h.shape[-1]
    for w in map(value, weights):
        if tuple(w.shape) != (hidden,) or w.dtype not in norm_ops.DTYPES or w.stride(-1) != 1:
            return f"weight is {w.dtype} {tuple(w.shape)} stride {w.stride()}, want a contiguous ({hidden},) vector"
    return None


def _provenance(meta: dict) -> dict:
    """Where a node came from (module stack, source), without what describes its old arguments and values."""
    return {key: v for key, v in meta.items() if key not in ("val", "tensor_meta", "eager_input_vals")}


def _fake(op, args):
    vals = torch.fx.node.map_arg(args, value)
    with detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]):
        return op(*vals)


def apply(graph: torch.fx.Graph, ctx) -> None:
    exact = ctx.options.get("router_exact", False)
    forms = norm_forms(graph, ctx.options)
    for form in forms:
        for variant, *_ in _VARIANTS:
            if not (exact and variant == "moe_router"):
                _patterns(variant, form).apply(graph)
    _widen(graph, ctx, forms)
