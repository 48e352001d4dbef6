"""Linears that share their input at a decode step's few rows: one `gemma4_fx::skinny_linear` launch
(replacements/skinny_linear.py) for a Gemma-4 layer's q/k/v projections, and one for its MLP's gate and up with
`gelu_tanh(gate) * up` fused.

Matched as a bias-free linear reaches Inductor's post-grad graph, `mm(x, permute(w, [1, 0]))` with w a graph input
and x on [tokens, hidden] often a reshape of [batch, seq, hidden] (one reshape per linear: linears share x when their
reshapes share source and shape). Linears of one static x of at most MAX_ROWS rows become one op; where the outputs of
two of one width meet as `gelu_tanh(a) * b` (the activation checked by value, as the experts rewrite checks its own),
that product is the op's gated output.

Not in `PATTERNS`: it waits for `benchmarks/skinny_linear.py` on a GPU to show that one launch beats cuBLAS's at
these shapes (and for its configs). Run it with `apply(graph, ctx)`, as tests/test_skinny_linear.py does.
"""

from __future__ import annotations

import operator

import torch

from ..fx_utils import value
from ..passes.context import PassContext
from ..replacements import skinny_linear as ops
from .matcher_utils import not_gelu_tanh

NAME = "skinny_linear"
aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default)


def _weight(mm: torch.fx.Node) -> torch.fx.Node | None:
    """w of `mm(x, permute(w, [1, 0]))` with w a graph input, else None."""
    permute = mm.args[1]
    if not isinstance(permute, torch.fx.Node) or permute.target is not aten.permute.default \
            or list(permute.args[1]) != [1, 0]:
        return None
    weight = permute.args[0]
    return weight if weight.op in ("placeholder", "get_attr") else None


def _groups(graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    """The linears' mm nodes grouped by their input (a reshape's source and static shape, else the node itself);
    groups of one left out."""
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for mm in graph.find_nodes(op="call_function", target=aten.mm.default):
        x = mm.args[0]
        if _weight(mm) is None or not isinstance(x, torch.fx.Node):
            continue
        static = x.target in _RESHAPES and all(isinstance(size, int) for size in x.args[1])
        key = (x.args[0], tuple(x.args[1])) if static else (x, None)
        groups.setdefault(key, []).append(mm)
    return [mms for mms in groups.values() if len(mms) > 1]


def _output(mm: torch.fx.Node) -> torch.fx.Node:
    """The mm, or its only user if that reshapes it (back to [batch, seq, width])."""
    users = list(mm.users)
    return users[0] if len(users) == 1 and users[0].target in _RESHAPES else mm


def _gated(mms: list[torch.fx.Node]) -> tuple[list[torch.fx.Node], torch.fx.Node] | None:
    """([gate, up], the node computing gelu_tanh(gate's output) * up's output) where two linears meet so, else
    None."""
    if len(mms) != 2:
        return None
    for gate, up in (mms, mms[::-1]):
        gate_out, up_out = _output(gate), _output(up)
        for mul in up_out.users:
            if mul.target is aten.mul.Tensor and len(mul.args) == 2 and up_out in mul.args:
                act = mul.args[1] if mul.args[0] is up_out else mul.args[0]
                if isinstance(act, torch.fx.Node) and not_gelu_tanh(gate_out, act, "on the gate projection") is None:
                    return [gate, up], mul
    return None


def _unsupported(x: torch.fx.Node, weights: list[torch.fx.Node], gated: bool) -> str | None:
    """Why the op cannot take this group, or None."""
    xv = value(x)
    if xv.device.type not in ("cuda", "cpu"):
        return f"device {xv.device.type}"
    if any(not isinstance(size, int) for size in xv.shape):
        return "symbolic rows or hidden size"
    if xv.shape[0] > ops.MAX_ROWS:
        return f"{xv.shape[0]} rows: above {ops.MAX_ROWS} the GEMMs are cuBLAS's"
    if len(weights) > ops.MAX_WEIGHTS:
        return f"{len(weights)} linears share the input; the op takes at most {ops.MAX_WEIGHTS}"
    try:
        ops.check_inputs(xv, [value(w) for w in weights], gated)
    except ValueError as error:
        return str(error)
    return None


def _rewrite(graph: torch.fx.Graph, mms: list[torch.fx.Node], product: torch.fx.Node | None) -> None:
    """One op before the group's first mm (on that mm's x: the others' reshapes of the same source die), its
    outputs in place of the mms' (gated: of the product)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first = min(mms, key=order.__getitem__)
    x, weights = first.args[0], [_weight(mm) for mm in mms]
    gated = product is not None
    with graph.inserting_before(first):
        fused = graph.call_function(torch.ops.gemma4_fx.skinny_linear.default, (x, weights, gated))
        fused.meta["val"] = vals = torch.ops.gemma4_fx.skinny_linear.default(value(x), [value(w) for w in weights],
                                                                             gated)
        items = []
        for i, val in enumerate(vals):
            items.append(graph.call_function(operator.getitem, (fused, i)))
            items[-1].meta["val"] = val
        if gated:
            shape = list(value(product).shape)
            out = graph.call_function(aten.reshape.default, (items[0], shape))
            out.meta["val"] = vals[0].reshape(shape)
    if gated:
        product.replace_all_uses_with(out)
    else:
        for mm, item in zip(mms, items):
            mm.replace_all_uses_with(item)


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    for mms in _groups(graph):
        gated = _gated(mms)
        if gated is not None and value(gated[1]).dtype != value(mms[0].args[0]).dtype:
            gated = None  # the product is taken in another dtype: the GEMMs alone
        mms, product = gated or (mms, None)
        if ctx.decide(NAME, mms[0], _unsupported(mms[0].args[0], [_weight(mm) for mm in mms], product is not None)):
            _rewrite(graph, mms, product)
    graph.eliminate_dead_code()
