"""Gemma-4 MoE router: norm, scale, projection, softmax, top-k, renormalise, per-expert scale.

Matched at the aten level of Inductor's post-grad graph, so any module with this math matches (HF's
`Gemma4TextRouter` or an engine's own), and rewritten into two kernels around the unchanged projection GEMM:

    router_input   rmsnorm (no weight) → ·scale → ·hidden**-0.5, rounding to the input dtype after each step as eager
    mm             the same GEMM eager runs, so the logits are eager's logits bit for bit
    router_select  softmax → top-k → renormalise → ·per_expert_scale[ids] in one launch

Plain Inductor fuses the prologue and keeps it in fp32, which changes bf16 logits and flips experts; keeping eager's
rounding points and eager's GEMM is what makes the expert choice identical.

Matched on [tokens, hidden] and [batch, seq, hidden] inputs, with the norm in any form of `matcher_utils.NORM_FORMS`
(or an engine's norm op), and with the top-k taken before the softmax as engines do (`router_pattern_topk_first`).
"""

from __future__ import annotations

import functools
import itertools
import operator

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement

from ..passes.context import PassContext, current
from ..replacements import router as router_ops
from ..replacements.rows import rms_norm
from .matcher_utils import NormForm, bind, norm_forms, stand_ins, trace

NAME = "router"
aten = torch.ops.aten


def _router(x, scale, proj, per_expert_scale, eps, root_size, k, softmax, norm=rms_norm):
    """The router's math; `softmax` is the one step whose aten form depends on where in Inductor the pass runs."""
    h = norm(x, None, eps) * scale * root_size
    logits = torch.nn.functional.linear(h, proj)
    weights, ids = torch.topk(softmax(logits), k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[ids], ids


def _online_softmax(logits):
    """softmax(logits, -1, dtype=float32) as Inductor's CUDA post-grad pass leaves it: max and sum in one pass."""
    logits = logits.float()
    row_max, row_sum = torch.ops.prims.prepare_softmax_online(logits, -1)
    return torch.exp(logits - row_max) / row_sum


def router_pattern(x, scale, proj, per_expert_scale, eps, root_size, k, norm=rms_norm):
    """`Gemma4TextRouter.forward` (transformers 5.17+), the math this pattern matches."""
    return _router(x, scale, proj, per_expert_scale, eps, root_size, k,
                   lambda logits: torch.softmax(logits, dim=-1, dtype=torch.float32), norm)


def router_pattern_online_softmax(x, scale, proj, per_expert_scale, eps, root_size, k, norm=rms_norm):
    """The same router after Inductor's online-softmax rewrite (CUDA): our pass may run before or after it."""
    return _router(x, scale, proj, per_expert_scale, eps, root_size, k, _online_softmax, norm)


def router_pattern_topk_first(x, scale, proj, per_expert_scale, eps, root_size, k, norm=rms_norm):
    """Engines' router: top-k of the raw logits, then a softmax of the k kept. The same experts (softmax is
    monotone) and, in exact arithmetic, the same weights: softmax(l)[ids] / sum = softmax(l[ids]). Rewritten into
    HF's order, the weights differ from this graph's by fp32 rounding, and where two distinct logits round to one
    probability their order may too (`_check` leaves it alone under `router_exact`)."""
    h = norm(x, None, eps) * scale * root_size
    logits, ids = torch.topk(torch.nn.functional.linear(h, proj), k, dim=-1)
    return torch.softmax(logits, dim=-1, dtype=torch.float32) * per_expert_scale[ids], ids


def router_replacement(x, scale, proj, per_expert_scale, eps, root_size, k):
    """What the pattern becomes: prologue kernel, eager's GEMM, one select kernel (on [tokens, hidden]: a
    [batch, seq, hidden] input is flattened and its results shaped back)."""
    exact = current().options.get("router_exact", False)
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # as it is: post_attn_norm folds router_input(h) in
    if isinstance(eps, torch.Tensor):  # dynamic=True: float attributes arrive as 0-d tensors (see _check)
        h = torch.ops.gemma4_fx.router_input_scalar_tensors(flat, scale, eps, root_size, exact)
    else:
        h = torch.ops.gemma4_fx.router_input(flat, scale, eps, root_size, exact)
    weights, ids = torch.ops.gemma4_fx.router_select(torch.mm(h, proj.t()), per_expert_scale, k)
    if x.dim() == 2:
        return weights, ids
    return weights.reshape(*x.shape[:-1], k), ids.reshape(*x.shape[:-1], k)


# Float scalars are traced as stand-ins (`matcher_utils.STAND_INS`). k is not a wildcard (older Inductors drop
# integer stand-ins): patterns are registered per k seen.
_SCALARS = stand_ins(NAME)


def _unsupported(x, scale, proj, per_expert_scale, k) -> str | None:
    """Why the kernels cannot take these operands, or None."""
    if x.device.type not in ("cuda", "cpu"):
        return f"device {x.device.type}"
    if x.dim() < 2 or x.stride(-1) != 1:
        return (f"router input layout: size {tuple(x.shape)}, stride {tuple(x.stride())} (want [..., hidden], unit "
                "stride)")
    hidden, experts = x.shape[-1], proj.shape[0]
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


def _check(match: Match, form: NormForm, topk_first: bool) -> bool:
    operands = [match.kwargs[name].meta["val"] for name in ("x", "scale", "proj", "per_expert_scale")]
    ctx, anchor = current(), _topk_node(match)
    reason = _unsupported(*operands, anchor.args[1]) or form.reason(operands[0].dtype)
    # Some Inductors hand this check a re-traced match whose float literals are not keyword args: floats then.
    kinds = {_scalar_kind(match.kwargs.get(name, 0.0)) for name in ("eps", "root_size")}
    if reason is None and (len(kinds) != 1 or "other" in kinds):
        reason = f"eps and hidden**-0.5 are not both Python floats or both 0-d CPU tensors ({sorted(kinds)})"
    if reason is None and topk_first and ctx.options.get("router_exact", False):
        reason = ("top-k before softmax: the rewrite computes HF's softmax → top-k → renormalise, whose weights "
                  "differ from this graph's by fp32 rounding (router_exact asks for the graph's own numbers)")
    return ctx.decide(NAME, anchor, reason)


_FORMS = {  # pattern -> whether it takes the top-k before the softmax
    router_pattern: False, router_pattern_online_softmax: False, router_pattern_topk_first: True,
}


@functools.cache
def _patterns(k: int, form: NormForm) -> PatternMatcherPass:
    """The router patterns for top-k with norms written in `form`: every supported dtype, softmax before and after
    the top-k, on [tokens, hidden] (HF's and engines' routers) and [batch, seq, hidden] inputs."""
    patterns = PatternMatcherPass(pass_name=f"gemma4_fx_router_top{k}_{form.name}")
    hidden, experts = 16, max(2 * k, 8)
    for dtype, rows in itertools.product(router_ops.DTYPES, ((4,), (2, 3))):
        example = [torch.empty(*rows, hidden, dtype=dtype), torch.empty(hidden, dtype=dtype),
                   torch.empty(experts, hidden, dtype=dtype), torch.empty(experts, dtype=dtype),
                   *_SCALARS.values()]
        for pattern, topk_first in _FORMS.items():
            register_replacement(bind(pattern, norm=form.fn, k=k), bind(router_replacement, k=k), example, trace,
                                 patterns, extra_check=functools.partial(_check, form=form, topk_first=topk_first),
                                 scalar_workaround=_SCALARS, skip_duplicates=True)
    return patterns


def _is_softmax(node) -> bool:
    """exp(x - max) / sum: eager's decomposition, Inductor's online form, or the undecomposed op."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target == aten._softmax.default:
        return True
    return node.target == aten.div.Tensor and getattr(node.args[0], "target", None) == aten.exp.default


def _feeds_softmax(node: torch.fx.Node) -> bool:
    """`node` (maybe cast to fp32 first) is the input of a softmax: its row max is taken, or the op itself."""
    softmax_ops = (aten.amax.default, aten._softmax.default, torch.ops.prims.prepare_softmax_online.default)
    casts = [user for user in node.users if user.target == torch.ops.prims.convert_element_type.default]
    return any(user.target in softmax_ops for n in (node, *casts) for user in n.users)


def _explain_unmatched(graph: torch.fx.Graph, ctx: PassContext) -> None:
    """Record every softmax → top-k, and top-k → softmax, left in the graph: it looks like a router, so say why it
    was not rewritten."""
    already = {name for skip in ctx.report.skipped if skip.graph == ctx.graph_name for name in skip.nodes}
    for node in graph.find_nodes(op="call_function", target=aten.topk.default):
        if node.name in already:
            continue
        probs = node.args[0]
        values = [user for user in node.users if user.target is operator.getitem and user.args[1] == 0]
        if _is_softmax(probs):
            others = [user.name for user in probs.users if user is not node]
            reason = f"router probabilities have other users ({', '.join(others)})" if others else \
                "softmax → top-k without the Gemma-4 router's norm·scale prologue or per-expert scale"
        elif values and _feeds_softmax(values[0]):
            reason = "top-k → softmax without the Gemma-4 router's norm·scale prologue or per-expert scale"
        else:
            continue
        ctx.skipped(NAME, node, reason)


def _uses_of_ids(node: torch.fx.Node) -> set:
    """Where a top-k's ids are read: each reading node, or for the graph's output the positions they take in it
    (one output node serves every top-k)."""
    uses = set()
    for ids in (user for user in node.users if user.target is operator.getitem and user.args[1] == 1):
        for reader in ids.users:
            if reader.op == "output":
                leaves = torch.utils._pytree.tree_leaves(reader.args[0])
                uses.update(("output", i) for i, arg in enumerate(leaves) if arg is ids)
            else:
                uses.add(reader)
    return uses


def _keep_module_stacks(graph: torch.fx.Graph, stacks: list) -> None:
    """Give each router_select the module stack of the top-k it replaced (found by where its ids are read), so that
    what later passes report at the routing has the router's location."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.gemma4_fx.router_select.default):
        uses = _uses_of_ids(node)
        replaced = [stack for topk_uses, stack in stacks if uses & topk_uses]
        if "nn_module_stack" not in node.meta and len(replaced) == 1:
            node.meta["nn_module_stack"] = replaced[0]


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    forms = norm_forms(graph, ctx.options)
    topks = graph.find_nodes(op="call_function", target=aten.topk.default)
    stacks = [(_uses_of_ids(node), node.meta["nn_module_stack"]) for node in topks
              if node.meta.get("nn_module_stack")]
    for k in sorted({node.args[1] for node in topks
                     if isinstance(node.args[1], int) and 1 <= node.args[1] <= router_ops.MAX_TOP_K}):
        for form in forms:
            _patterns(k, form).apply(graph)
    _keep_module_stacks(graph, stacks)
    _explain_unmatched(graph, ctx)
