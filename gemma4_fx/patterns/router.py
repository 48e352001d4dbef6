"""Gemma-4 MoE router: norm, scale, projection, softmax, top-k, renormalise, per-expert scale.

Matched at the aten level of Inductor's post-grad graph, so any module with this math matches (HF's
`Gemma4TextRouter` or an engine's own), and rewritten into two kernels around the unchanged projection GEMM:

    router_input   rmsnorm (no weight) → ·scale → ·hidden**-0.5, rounding to the input dtype after each step as eager
    mm             the same GEMM eager runs, so the logits are eager's logits bit for bit
    router_select  softmax → top-k → renormalise → ·per_expert_scale[ids] in one launch

Plain Inductor fuses the prologue and keeps it in fp32, which changes bf16 logits and flips experts; keeping eager's
rounding points and eager's GEMM is what makes the expert choice identical.
"""

from __future__ import annotations

import functools

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement

from ..passes.context import PassContext, current
from ..replacements import router as router_ops
from ..replacements.rows import rms_norm
from .matcher_utils import stand_ins

NAME = "router"
aten = torch.ops.aten


def _router(x, scale, proj, per_expert_scale, eps, root_size, k, softmax):
    """The router's math; `softmax` is the one step whose aten form depends on where in Inductor the pass runs."""
    h = rms_norm(x, None, eps) * scale * root_size
    logits = torch.nn.functional.linear(h, proj)
    weights, ids = torch.topk(softmax(logits), k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[ids], ids


def _online_softmax(logits):
    """softmax(logits, -1, dtype=float32) as Inductor's CUDA post-grad pass leaves it: max and sum in one pass."""
    logits = logits.float()
    row_max, row_sum = torch.ops.prims.prepare_softmax_online(logits, -1)
    return torch.exp(logits - row_max) / row_sum


def router_pattern(x, scale, proj, per_expert_scale, eps, root_size, k):
    """`Gemma4TextRouter.forward` (transformers 5.17+), the math this pattern matches."""
    return _router(x, scale, proj, per_expert_scale, eps, root_size, k,
                   lambda logits: torch.softmax(logits, dim=-1, dtype=torch.float32))


def router_pattern_online_softmax(x, scale, proj, per_expert_scale, eps, root_size, k):
    """The same router after Inductor's online-softmax rewrite (CUDA): our pass may run before or after it."""
    return _router(x, scale, proj, per_expert_scale, eps, root_size, k, _online_softmax)


def router_replacement(x, scale, proj, per_expert_scale, eps, root_size, k):
    """What the pattern becomes: prologue kernel, eager's GEMM, one select kernel."""
    exact = current().options.get("router_exact", False)
    if isinstance(eps, torch.Tensor):  # dynamic=True: float attributes arrive as 0-d tensors (see _check)
        h = torch.ops.gemma4_fx.router_input_scalar_tensors(x, scale, eps, root_size, exact)
    else:
        h = torch.ops.gemma4_fx.router_input(x, scale, eps, root_size, exact)
    logits = torch.mm(h, proj.t())
    return torch.ops.gemma4_fx.router_select(logits, per_expert_scale, k)


# Float scalars are traced as stand-ins (`matcher_utils.STAND_INS`). k is not a wildcard (older Inductors drop
# integer stand-ins): patterns are registered per k seen.
_SCALARS = stand_ins(NAME)


def _unsupported(x, scale, proj, per_expert_scale, k) -> str | None:
    """Why the kernels cannot take these operands, or None."""
    if x.device.type not in ("cuda", "cpu"):
        return f"device {x.device.type}"
    if x.dim() != 2 or x.stride(-1) != 1:
        return f"router input layout: size {tuple(x.shape)}, stride {tuple(x.stride())} (want [tokens, hidden], unit stride)"
    hidden, experts = x.shape[1], proj.shape[0]
    if not isinstance(hidden, int) or not isinstance(experts, int):
        return "symbolic hidden size or expert count"
    if not router_ops.supports(hidden, experts, k, x.dtype):
        return (f"{x.dtype} router with hidden {hidden}, {experts} experts, top-{k} is outside the kernels' range "
                f"(dtypes {', '.join(map(str, router_ops.DTYPES))}, hidden <= {router_ops.MAX_HIDDEN}, "
                f"experts <= {router_ops.MAX_EXPERTS}, k <= {router_ops.MAX_TOP_K})")
    if scale.dtype != x.dtype or tuple(scale.shape) != (hidden,) or scale.stride(-1) != 1:
        return f"router scale is {scale.dtype} {tuple(scale.shape)}, want contiguous {x.dtype} ({hidden},)"
    if proj.dtype != x.dtype:
        return f"projection dtype {proj.dtype} differs from the input's {x.dtype}"
    if per_expert_scale.dtype not in router_ops.DTYPES or tuple(per_expert_scale.shape) != (experts,):
        return f"per-expert scale is {per_expert_scale.dtype} {tuple(per_expert_scale.shape)}"
    return None


def _topk_node(match: Match) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target == aten.topk.default)


def _scalar_kind(value) -> str:
    """"float", "tensor" (a 0-d CPU tensor: how dynamic=True passes float attributes), or "other"."""
    if isinstance(value, (int, float)):
        return "float"
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    if isinstance(val, torch.Tensor) and val.dim() == 0 and val.device.type == "cpu" and val.is_floating_point():
        return "tensor"
    return "other"


def _check(match: Match) -> bool:
    operands = [match.kwargs[name].meta["val"] for name in ("x", "scale", "proj", "per_expert_scale")]
    ctx, anchor = current(), _topk_node(match)
    reason = _unsupported(*operands, anchor.args[1])
    # Some Inductors hand this check a re-traced match whose float literals are not keyword args: floats then.
    kinds = {_scalar_kind(match.kwargs.get(name, 0.0)) for name in ("eps", "root_size")}
    if reason is None and (len(kinds) != 1 or "other" in kinds):
        reason = f"eps and hidden**-0.5 are not both Python floats or both 0-d CPU tensors ({sorted(kinds)})"
    return ctx.decide(NAME, anchor, reason)


def _with_k(fn, k: int):
    def fixed_k(x, scale, proj, per_expert_scale, eps, root_size):
        return fn(x, scale, proj, per_expert_scale, eps, root_size, k)

    return fixed_k


@functools.cache
def _patterns(k: int) -> PatternMatcherPass:
    """The router patterns for top-k, in every supported dtype and both softmax forms."""
    patterns = PatternMatcherPass(pass_name=f"gemma4_fx_router_top{k}")
    hidden, experts = 16, max(2 * k, 8)
    for dtype in router_ops.DTYPES:
        example = [torch.empty(4, hidden, dtype=dtype), torch.empty(hidden, dtype=dtype),
                   torch.empty(experts, hidden, dtype=dtype), torch.empty(experts, dtype=dtype),
                   *_SCALARS.values()]
        for pattern in (router_pattern, router_pattern_online_softmax):
            register_replacement(_with_k(pattern, k), _with_k(router_replacement, k), example, fwd_only, patterns,
                                 extra_check=_check, scalar_workaround=_SCALARS)
    return patterns


def _is_softmax(node) -> bool:
    """exp(x - max) / sum: eager's decomposition, Inductor's online form, or the undecomposed op."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target == aten._softmax.default:
        return True
    return node.target == aten.div.Tensor and getattr(node.args[0], "target", None) == aten.exp.default


def _explain_unmatched(graph: torch.fx.Graph, ctx: PassContext) -> None:
    """Record every softmax → top-k left in the graph: it looks like a router, so say why it was not rewritten."""
    already = {name for skip in ctx.report.skipped if skip.graph == ctx.graph_name for name in skip.nodes}
    for node in graph.find_nodes(op="call_function", target=aten.topk.default):
        probs = node.args[0]
        if node.name in already or not _is_softmax(probs):
            continue
        others = [user.name for user in probs.users if user is not node]
        if others:
            reason = f"router probabilities have other users ({', '.join(others)})"
        else:
            reason = "softmax → top-k without the Gemma-4 router's norm·scale prologue or per-expert scale"
        ctx.skipped(NAME, node, reason)


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    for k in sorted({node.args[1] for node in graph.find_nodes(op="call_function", target=aten.topk.default)
                     if isinstance(node.args[1], int) and 1 <= node.args[1] <= router_ops.MAX_TOP_K}):
        _patterns(k).apply(graph)
    _explain_unmatched(graph, ctx)
