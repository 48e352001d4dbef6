"""Linears that share their input at a decode step's few rows: one `gemma4_fx::skinny_linear` launch
(replacements/skinny_linear.py) for a Gemma-4 layer's q/k/v projections, and one for its MLP's gate and up with
`gelu_tanh(gate) * up` fused.

Matched as a bias-free linear reaches Inductor's post-grad graph, `mm(x, permute(w, [1, 0]))` with w a graph input
and x on [tokens, hidden] often a reshape of [batch, seq, hidden] (one reshape per linear: linears share x when their
reshapes share source and sizes). Every transformer has linears that share an input, so a group is taken only in the
form Gemma-4 gives it:
- q/k/v (q/k where v is k): the output of every linear in the group is RMS-normed (any `matcher_utils.NORM_FORMS`
  form, with a weight or without), as q_norm, k_norm and v_norm do. No other family norms v: Llama norms none of
  them, Qwen3 and Gemma-3 q and k only.
- gate/up: two linears of one width whose outputs meet as `gelu_tanh(gate) * up` (the activation checked by value,
  as the experts rewrite checks its own), on x written by a norm weighed by a graph input (Gemma-4's
  pre_feedforward_layernorm; Gemma-2/3's same MLP reads a norm weighed by a computed `1 + w`). The product is the
  op's gated output.
Other groups are not candidates and go unreported. A candidate needs a static x of at most MAX_ROWS rows.
"""

from __future__ import annotations

import operator

import torch

from ..fx_utils import value
from ..passes.context import PassContext
from ..replacements import skinny_linear as ops
from .matcher_utils import NormForm, match_norm, norm_below, norm_forms, not_gelu_tanh

NAME = "skinny_linear"
aten = torch.ops.aten
RESHAPES = (aten.reshape.default, aten.view.default)

# On CUDA a gated group above this many bytes of gate and up weights is rewritten only where its shape has a tuned
# config (`skinny_linear_configs.py`): with the rule's default config E2B's double-wide MLP (2 x 12288 x 1536 bf16)
# is the largest measured faster than separate cuBLAS linears and Inductor's gelu-mul, E4B's (2 x 10240 x 2560)
# tied or lost by up to 5%; tuned, E4B's is 5% faster than Inductor's (BENCHMARKS.md, skinny linear). q/k/v groups
# win at every measured width.
GATED_MAX_WEIGHT_BYTES = 2 * 12288 * 1536 * 2


def weight_of(mm: torch.fx.Node) -> torch.fx.Node | None:
    """w of `mm(x, permute(w, [1, 0]))` with w a graph input, else None."""
    permute = mm.args[1]
    if not isinstance(permute, torch.fx.Node) or permute.target is not aten.permute.default \
            or list(permute.args[1]) != [1, 0]:
        return None
    weight = permute.args[0]
    return weight if weight.op in ("placeholder", "get_attr") else None


def source_of(x: torch.fx.Node) -> torch.fx.Node:
    """What a linear's input reshapes (the [batch, seq, hidden] activation), or the input itself."""
    return x.args[0] if x.target in RESHAPES else x


def linears_by_input(graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    """The linears' mm nodes grouped by their input (a reshape's source and sizes, else the node itself)."""
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for mm in graph.find_nodes(op="call_function", target=aten.mm.default):
        x = mm.args[0]
        if weight_of(mm) is None or not isinstance(x, torch.fx.Node):
            continue
        key = (x.args[0], tuple(x.args[1])) if x.target in RESHAPES else (x, None)
        groups.setdefault(key, []).append(mm)
    return list(groups.values())


def _output(mm: torch.fx.Node) -> torch.fx.Node:
    """The mm, or its only user if that reshapes it (back to [batch, seq, width])."""
    users = list(mm.users)
    return users[0] if len(users) == 1 and users[0].target in RESHAPES else mm


def _gated(mms: list[torch.fx.Node], forms: list[NormForm]) -> tuple[list[torch.fx.Node], torch.fx.Node] | None:
    """([gate, up], the node computing gelu_tanh(gate's output) * up's output) where two linears on a weighted
    norm's output meet so, else None."""
    if len(mms) != 2 or match_norm(source_of(mms[0].args[0]), forms, weighted=True) is None:
        return None
    for gate, up in (mms, mms[::-1]):
        gate_out, up_out = _output(gate), _output(up)
        for mul in up_out.users:
            if mul.target is aten.mul.Tensor and len(mul.args) == 2 and up_out in mul.args:
                act = mul.args[1] if mul.args[0] is up_out else mul.args[0]
                if isinstance(act, torch.fx.Node) and not_gelu_tanh(gate_out, act, "on the gate projection") is None:
                    return [gate, up], mul
    return None


def outputs_of(mm: torch.fx.Node) -> set[torch.fx.Node]:
    """The mm and its reshapes (to heads, back to [batch, seq, width]), transitively."""
    outputs, stack = set(), [mm]
    while stack:
        node = stack.pop()
        outputs.add(node)
        stack += [user for user in node.users if user.target in RESHAPES]
    return outputs


def normed(mm: torch.fx.Node, forms: list[NormForm], weighted=(True, False)) -> bool:
    """An RMSNorm (weighed by a graph input, or by nothing, as `weighted` allows) takes the mm's output, or a
    reshape of it, as its input."""
    return any(norm_below(outputs_of(mm), forms, weighs) for weighs in weighted)


def unsupported(x: torch.fx.Node, weights: list[torch.fx.Node], product: torch.fx.Node | None) -> str | None:
    """Why the op cannot take this group, or (gated, on CUDA) why it would not be faster; None if neither."""
    xv = value(x)
    if xv.device.type not in ("cuda", "cpu"):
        return f"device {xv.device.type}"
    if any(not isinstance(size, int) for size in xv.shape):
        return f"symbolic rows or hidden size: the op needs a static x of at most {ops.MAX_ROWS} rows"
    if xv.shape[0] > ops.MAX_ROWS:
        return f"{xv.shape[0]} rows: above {ops.MAX_ROWS} the GEMMs are cuBLAS's"
    if len(weights) > ops.MAX_WEIGHTS:
        return f"{len(weights)} linears share the input; the op takes at most {ops.MAX_WEIGHTS}"
    gated = product is not None
    try:
        ops.check_inputs(xv, [value(w) for w in weights], gated)
    except ValueError as error:
        return str(error)
    size = sum(value(w).numel() * value(w).element_size() for w in weights)
    if gated and xv.device.type == "cuda" and size > GATED_MAX_WEIGHT_BYTES and ops.tuned_config(
            xv.shape[0], xv.shape[1], [value(w).shape[0] for w in weights], xv.dtype, True, xv.device) is None:
        return (f"gate and up weights of {size / 2**20:.0f} MiB: above {GATED_MAX_WEIGHT_BYTES / 2**20:.0f} MiB "
                "one launch is faster than separate linears only with a tuned config, and this shape has none")
    return None


def rewrite(graph: torch.fx.Graph, mms: list[torch.fx.Node], product: torch.fx.Node | None,
            times: torch.fx.Node | None = None) -> None:
    """One op before the group's first mm (on that mm's x: the others' reshapes of the same source die), its
    outputs in place of the mms' (gated: of the product). With `times`, a lone linear's `gelu_tanh(y) * times`,
    `product`, is the op's (`gelu_times`), placed before the product, where times is computed."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first = min(mms, key=order.__getitem__)
    x, weights = first.args[0], [weight_of(mm) for mm in mms]
    gated = product is not None and times is None
    with graph.inserting_before(first if times is None else product):
        args = (x, weights, gated)
        if times is not None:
            shape = [value(x).shape[0], value(weights[0]).shape[0]]
            args += (graph.call_function(aten.reshape.default, (times, shape)),)
            args[-1].meta["val"] = value(times).reshape(shape)
        fused = graph.call_function(torch.ops.gemma4_fx.skinny_linear.default, args)
        fused.meta["val"] = vals = torch.ops.gemma4_fx.skinny_linear.default(
            *torch.fx.node.map_arg(args, value))
        items = []
        for i, val in enumerate(vals):
            items.append(graph.call_function(operator.getitem, (fused, i)))
            items[-1].meta["val"] = val
        if product is not None:
            shape = list(value(product).shape)
            out = graph.call_function(aten.reshape.default, (items[0], shape))
            out.meta["val"] = vals[0].reshape(shape)
    if product is not None:
        product.replace_all_uses_with(out)
    else:
        for mm, item in zip(mms, items):
            mm.replace_all_uses_with(item)


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    forms = norm_forms(graph, ctx.options)
    for mms in linears_by_input(graph):
        if len(mms) == 1:
            continue  # a linear alone: skinny_single's, after the epilogues
        gated = _gated(mms, forms)
        if gated is None and not all(normed(mm, forms) for mm in mms):
            continue  # neither Gemma-4's gate/up nor its q/k/v
        mms, product = gated or (mms, None)
        if ctx.decide(NAME, mms[0], unsupported(mms[0].args[0], [weight_of(mm) for mm in mms], product)):
            rewrite(graph, mms, product)
    graph.eliminate_dead_code()
