"""Gemma-4 MoE experts: each token's top-k experts, a gelu-tanh-gated MLP per expert, the weighted sum over k.

Matched as transformers' "grouped_mm" experts (`Gemma4TextExperts`, the default implementation) reach Inductor's
post-grad graph, and as any module with the same aten ops:

    ids, perm = sort(top_k_index.reshape(-1))
    x = hidden[perm // K]
    offs = cumsum(histc(ids, E, 0, E - 1), int32)
    gate, up = split(_grouped_mm(x, gate_up_proj.transpose(1, 2), offs), N, -1)
    y = _grouped_mm(gelu_tanh(gate) * up, down_proj.transpose(1, 2), offs)
    weighted = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    out = weighted[inverse(perm)].reshape(T, K, H).sum(1).to(hidden.dtype)

becomes one `gemma4_fx::moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)`: four Triton
launches with no host sync, each expert's weights read once per tile (replacements/moe_experts.py), the same
roundings as the grouped_mm path. The chain is checked link by link from the second grouped GEMM outwards; the
activation between the two GEMMs is checked by value (whatever ops compute it, it must give gelu_tanh bit for bit
on probe values). Where YOCO keeps some rows of the output, its selection sits between the unsort and the sum over
k (`...reshape(T, K, H)[rows].sum(1)`: the sort makes rows interact, so YOCO stops there); the rewrite then takes
those rows of hidden, ids and weights, and the experts run on the kept rows alone (a prefill's last layer, for
`logits_to_keep`). A chain that breaks anywhere is left to Inductor with the reason.

transformers' "eager" experts loop over the experts the tokens hit, by ascending id, adding each expert's weighted
rows into a zeroed x.dtype output (`index_add_`); Dynamo breaks the graph at the count it reads from the data. A
Gemma4Backend has Dynamo trace that forward as one `gemma4_fx::moe_experts_loop` op instead (`trace_eager_experts`,
a polyfill that compiles through other backends leave as they were), which this rewrite replaces by
`moe_experts(..., expert_order=True)`: the same kernels, summing over k as the loop does (each product and sum
rounded to x.dtype, by ascending expert id). Where the ids leave a graph with no experts block in it (another
backend's trace, or a module of its own), the router's node is reported.

transformers 5.17 guards expert-parallel sentinels (ids >= E) in both forms: "batched_mm" clamps the ids, and the
rewrite clamps the ids it takes the same way; "grouped_mm" zeroes the sentinels' rows around each GEMM, which the
rewrite drops where no id can be a sentinel (the ids are a top-k over the E experts' scores) and leaves the block
alone otherwise.
"""

from __future__ import annotations

import logging
import operator
import types

import torch

from ..fx_utils import value
from ..passes.context import PassContext
from ..replacements import moe_experts as moe_ops
from .matcher_utils import not_gelu_tanh

NAME = "moe_experts"
log = logging.getLogger("gemma4_fx")
aten, prims = torch.ops.aten, torch.ops.prims


def _grouped_mms() -> tuple:
    """`aten._grouped_mm`, and the op transformers falls back to where that has no kernel (fp32 on CPU; registered
    when transformers' MoE integration is imported)."""
    fallback = getattr(torch.ops.transformers, "grouped_mm_fallback", None) if hasattr(torch.ops, "transformers") \
        else None
    return (aten._grouped_mm.default,) + ((fallback.default,) if fallback is not None else ())


class _Mismatch(Exception):
    """The chain around a grouped GEMM is not the experts computation; the message says where."""


def _expect(node, targets, what: str) -> torch.fx.Node:
    if not isinstance(node, torch.fx.Node) or node.target not in targets:
        found = node.target if isinstance(node, torch.fx.Node) else node
        raise _Mismatch(f"{what}: expected {', '.join(map(str, targets))}, found {found}")
    return node


def _select(graph: torch.fx.Graph, node: torch.fx.Node, selection: tuple) -> torch.fx.Node:
    """`node`'s rows picked by `selection` (see `_row_selection`), with its fake value."""
    target, rest = selection
    picked = graph.call_function(target, (node, *rest))
    picked.meta["val"] = target(value(node), *torch.fx.node.map_arg(rest, value))
    return picked


def _only_user(node: torch.fx.Node, targets, what: str) -> torch.fx.Node:
    if len(node.users) != 1:
        raise _Mismatch(f"{what}: {node.name} has {len(node.users)} users")
    return _expect(next(iter(node.users)), targets, what)


def _getitem(node: torch.fx.Node, index: int, what: str) -> torch.fx.Node:
    items = [user for user in node.users if user.target is operator.getitem and user.args[1] == index]
    if len(items) != 1:
        raise _Mismatch(f"{what}: no single item {index} of {node.name}")
    return items[0]


def _transposed_weight(node, what: str) -> torch.fx.Node:
    """`w.transpose(1, 2)` of a 3-D weight, as a permute [0, 2, 1]."""
    permute = _expect(node, (aten.permute.default,), what)
    if list(permute.args[1]) != [0, 2, 1]:
        raise _Mismatch(f"{what}: permute {permute.args[1]}, want [0, 2, 1]")
    return permute.args[0]


_RESHAPES = (aten.reshape.default, aten.view.default)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


def _gated_activation(act, second_gemm_of) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Check `act = gelu_tanh(gate) * up` with gate, up the halves of one GEMM's output; return (that GEMM's
    output node as `second_gemm_of` unwraps it, the split)."""
    mul = _expect(act, (aten.mul.Tensor,), "gated activation")
    gated, up = mul.args
    up_half = _expect(up, (operator.getitem,), "up half")
    split = _expect(up_half.args[0], _SPLITS, "gate/up split")
    if up_half.args[1] != 1 or split.args[-1] not in (-1, 1) or len(split.users) != 2:
        raise _Mismatch("gate/up split: not two halves along the last dim")
    reason = not_gelu_tanh(_getitem(split, 0, "gate half"), gated, "between the grouped GEMMs")
    if reason:
        raise _Mismatch(reason)
    return second_gemm_of(split.args[0]), split


# Row selections of the [T, K, H] per-slot view that YOCO leaves between the unsort and the sum over k (the sort makes
# the block's rows interact, so YOCO keeps its rows up to there): the rewrite selects the block's inputs instead.
_ROW_SELECTIONS = (aten.slice.Tensor, aten.index_select.default, aten.index.Tensor)


def _row_selection(node: torch.fx.Node) -> tuple | None:
    """(target, arguments after the tensor) if `node` selects rows of its input's dim 0, else None."""
    if node.target is aten.slice.Tensor and (node.args[1:2] or (0,))[0] == 0:
        return node.target, node.args[1:]
    if node.target is aten.index_select.default and node.args[1] == 0:
        return node.target, node.args[1:]
    if node.target is aten.index.Tensor and len(node.args[1]) == 1 and isinstance(node.args[1][0], torch.fx.Node) \
            and value(node.args[1][0]).dtype in (torch.int32, torch.int64) and value(node.args[1][0]).dim() == 1:
        return node.target, node.args[1:]
    return None


def _sum_over_k(weighted: torch.fx.Node, hidden: torch.fx.Node) -> tuple[torch.fx.Node, tuple | None]:
    """`weighted.reshape(T, K, H)[rows].sum(1).to(hidden.dtype)`: (the node that gives the experts' output, the
    selection of rows or None)."""
    per_slot = _only_user(weighted, _RESHAPES, "[T, K, H] view")
    selected = _only_user(per_slot, (aten.sum.dim_IntList, *_ROW_SELECTIONS), "sum over k")
    selection = _row_selection(selected) if selected.target in _ROW_SELECTIONS else None
    if selected.target in _ROW_SELECTIONS and selection is None:
        raise _Mismatch(f"rows of the [T, K, H] view selected along a dim other than the tokens' ({selected.name})")
    total = selected if selection is None else _only_user(selected, (aten.sum.dim_IntList,), "sum over k")
    if list(total.args[1]) != [1]:
        raise _Mismatch(f"sum over dims {total.args[1]}, want [1]")
    if value(total).dtype == value(hidden).dtype:  # `.to(hidden.dtype)` is no op when the product kept it (fp32)
        return total, selection
    out = _only_user(total, (prims.convert_element_type.default,), "cast back")
    if out.args[1] != value(hidden).dtype:
        raise _Mismatch("the sum is not cast back to the activation dtype")
    return out, selection


def _weight_column(node, what: str) -> torch.fx.Node:
    """`top_k_weights.reshape(-1)[rows].unsqueeze(-1)` or `top_k_weights.reshape(-1).unsqueeze(-1)`: returns the
    gathered or flat weights."""
    return _expect(_expect(node, (aten.unsqueeze.default,), what).args[0], (aten.index.Tensor,) + _RESHAPES, what)


def _unmasked(node, masks: list) -> torch.fx.Node:
    """`where(mask, 0, x)` -> x, with the mask added to `masks`; any other node as it is. (transformers 5.17 zeroes the
    rows of expert-parallel sentinels, ids >= E, around each grouped GEMM.)"""
    if isinstance(node, torch.fx.Node) and node.target is aten.where.self:
        mask, zero, inner = node.args
        if isinstance(zero, torch.fx.Node) and zero.target is aten.full.default and zero.args[1] == 0:
            masks.append(mask)
            return inner
    return node


def _masked_user(node: torch.fx.Node, masks: list) -> torch.fx.Node:
    """`node`'s sole user if that is `where(mask, 0, node)` (its mask added to `masks`), else `node`."""
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return user if user is not None and user.args[2:] == (node,) and _unmasked(user, masks) is node else node


def _ids_below(ids, experts: int) -> bool:
    """Whether `ids` provably hold values in [0, experts): the indices of a top-k over at most `experts` scores,
    eager's or the router rewrite's, through reshapes."""
    while isinstance(ids, torch.fx.Node) and ids.target in _RESHAPES + (aten.clone.default,):
        ids = ids.args[0]
    if not (isinstance(ids, torch.fx.Node) and ids.target is operator.getitem and ids.args[1] == 1):
        return False
    top_k = ids.args[0]
    if top_k.target is aten.topk.default:
        dim = top_k.args[2] if len(top_k.args) > 2 else top_k.kwargs.get("dim", -1)
        return value(top_k.args[0]).shape[dim] <= experts
    return top_k.target is torch.ops.gemma4_fx.router_select.default and value(top_k.args[0]).shape[-1] <= experts


def _check_sentinel_masks(masks: list, sort: torch.fx.Node, top_k_index: torch.fx.Node, experts: int) -> None:
    """The rows zeroed are those of sorted ids >= E, and no id can be one (so the zeroing is a no-op): the kernels
    take no sentinels."""
    for mask in masks:
        ge = _expect(_expect(mask, (aten.unsqueeze.default,), "sentinel mask").args[0], (aten.ge.Scalar,),
                     "sentinel mask")
        ids = ge.args[0]
        if not (ids.target is operator.getitem and ids.args == (sort, 0) and ge.args[1] == experts):
            raise _Mismatch("rows zeroed by a mask other than sorted expert ids >= E")
    if masks and not _ids_below(top_k_index, experts):
        raise _Mismatch("expert ids may be expert-parallel sentinels (>= E), which the kernels do not take: they do "
                        "not come from a top-k over the E experts' scores")


def _match_grouped(down_mm: torch.fx.Node):
    """transformers' "grouped_mm" experts: pairs sorted by expert, two grouped GEMMs over the groups, unsorted;
    with or without transformers 5.17's zeroing of sentinel rows around the GEMMs."""
    masks = []
    act, down_t, offs = down_mm.args[:3]
    down_proj = _transposed_weight(down_t, "down projection")
    gate_up_mm, _ = _gated_activation(act, lambda node: _expect(_unmasked(node, masks), _grouped_mms(),
                                                                "gate_up grouped GEMM"))
    x_sorted, gate_up_t, gate_up_offs = gate_up_mm.args[:3]
    if gate_up_offs is not offs:
        raise _Mismatch("the two grouped GEMMs do not share their group offsets")
    gate_up_proj = _transposed_weight(gate_up_t, "gate_up projection")

    hidden, [source_rows] = _expect(_unmasked(x_sorted, masks), (aten.index.Tensor,), "token gather").args
    floor_div = _expect(source_rows, (aten.div.Tensor_mode,), "pair -> token")
    perm, top_k = floor_div.args[:2]
    if floor_div.kwargs.get("rounding_mode") != "floor":
        raise _Mismatch("pair -> token: not a floor division")
    perm = _expect(perm, (operator.getitem,), "sort permutation")
    sort = _expect(perm.args[0], (aten.sort.default, aten.sort.stable), "expert sort")
    top_k_index = _expect(sort.args[0], _RESHAPES, "flattened expert ids").args[0]
    if perm.args[1] != 1 or value(top_k_index).shape[-1] != top_k:
        raise _Mismatch("expert sort: not the ids' permutation, or K differs from the ids' width")

    weighted = _only_user(_masked_user(down_mm, masks), (aten.mul.Tensor,), "routing weight product")
    _check_sentinel_masks(masks, sort, top_k_index, value(gate_up_proj).shape[0])
    gathered = _weight_column(weighted.args[1], "routing weight column")
    if gathered.target is not aten.index.Tensor or gathered.args[1][0] is not perm:
        raise _Mismatch("routing weights are not gathered in the sorted order")
    top_k_weights = _expect(gathered.args[0], _RESHAPES, "flattened weights").args[0]
    unsort = _only_user(weighted, (aten.index.Tensor,), "unsort")
    inverse = _expect(unsort.args[1][0], (aten.index_put.default,), "inverse permutation")
    if inverse.args[1][0] is not perm:
        raise _Mismatch("unsort: not the inverse of the sort's permutation")
    return (*_sum_over_k(unsort, hidden), hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, None)


def _batched_gemm(squeeze, what: str) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """`bmm(weight[flat_ids], rows.unsqueeze(-1)).squeeze(-1)`: returns (rows, weight, flat_ids)."""
    bmm = _expect(_expect(squeeze, (aten.squeeze.dim,), what).args[0], (aten.bmm.default,), what)
    gathered, column = bmm.args
    weight, [flat_ids] = _expect(gathered, (aten.index.Tensor,), f"{what}: per-pair weights").args
    rows = _expect(column, (aten.unsqueeze.default,), f"{what}: rows as columns").args[0]
    return rows, weight, flat_ids


_CLAMP_BOUNDS = {aten.clamp.default: ("min", "max"), aten.clamp_min.default: ("min",),
                 aten.clamp_max.default: ("max",)}


def _clamped(ids: torch.fx.Node) -> tuple[torch.fx.Node, tuple[int | None, int | None] | None]:
    """`ids` with any chain of constant clamps on it peeled off: (the unclamped node, (low, high) of the chain or
    None). transformers clamps the flat ids into [0, E - 1] (for expert-parallel sentinels); where Inductor cannot
    prove that a no-op (on CUDA) it stays in the graph, and the rewrite applies the same clamp to the ids it takes."""
    low = high = None
    bounded = False
    while isinstance(ids, torch.fx.Node) and ids.target in _CLAMP_BOUNDS:
        bounds = {**dict(zip(_CLAMP_BOUNDS[ids.target], ids.args[1:])), **ids.kwargs}
        lo, hi = bounds.get("min"), bounds.get("max")
        if not all(bound is None or isinstance(bound, int) for bound in (lo, hi)):
            raise _Mismatch(f"expert ids: {ids.target} with bounds that are not constant ints")
        low = lo if low is None else low if lo is None else max(low, lo)
        high = hi if high is None else high if hi is None else min(high, hi)
        bounded, ids = True, ids.args[0]
    return ids, ((low, high) if bounded else None)


def _match_batched(down_squeeze: torch.fx.Node):
    """transformers' "batched_mm" experts: each pair's expert weights gathered, two batched matrix-vector GEMMs."""
    act, down_proj, flat_ids = _batched_gemm(down_squeeze, "down GEMM")
    (x_rows, gate_up_proj, gate_up_ids), _ = _gated_activation(act, lambda node: _batched_gemm(node,
                                                                                                "gate_up GEMM"))
    if gate_up_ids is not flat_ids:
        raise _Mismatch("the two GEMMs gather their weights by different ids")
    flat_ids, id_bounds = _clamped(flat_ids)
    top_k_index = _expect(flat_ids, _RESHAPES, "flattened expert ids").args[0]
    # x.repeat_interleave(K, 0) as Inductor writes it: x.unsqueeze(1).expand(T, K, H) made contiguous, flattened
    expanded = _expect(_expect(x_rows, _RESHAPES, "repeated tokens").args[0], (aten.clone.default, aten.expand.default),
                       "repeated tokens")
    expanded = _expect(expanded.args[0], (aten.expand.default,), "repeated tokens") \
        if expanded.target is aten.clone.default else expanded
    hidden = _expect(expanded.args[0], (aten.unsqueeze.default,), "repeated tokens").args[0]
    if list(expanded.args[1])[1] != value(top_k_index).shape[-1]:
        raise _Mismatch("tokens are not repeated once per routed expert")

    weighted = _only_user(down_squeeze, (aten.mul.Tensor,), "routing weight product")
    flat_weights = _weight_column(weighted.args[1], "routing weight column")
    if flat_weights.target not in _RESHAPES:
        raise _Mismatch("routing weights are gathered, not taken in pair order")
    return (*_sum_over_k(weighted, hidden), hidden, top_k_index, flat_weights.args[0], gate_up_proj, down_proj,
            id_bounds)


def _match_loop(loop: torch.fx.Node):
    """transformers' "eager" experts loop, traced as one op (`trace_eager_experts`): its operands as they are."""
    return (loop, None, *loop.args, None)


def _candidates(graph: torch.fx.Graph):
    """(matcher, node) for each GEMM that may be an experts block's down projection: grouped GEMMs and squeezed
    batched GEMMs whose output (masked or not) is not split in two halves (that would be the gate_up one); and each
    traced eager loop."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.gemma4_fx.moe_experts_loop.default):
        yield _match_loop, node
    for target in _grouped_mms():
        for node in graph.find_nodes(op="call_function", target=target):
            if not any(user.target in _SPLITS for user in _masked_user(node, []).users):
                yield _match_grouped, node
    for bmm in graph.find_nodes(op="call_function", target=aten.bmm.default):
        gathered = bmm.args[0]
        if isinstance(gathered, torch.fx.Node) and gathered.target is aten.index.Tensor \
                and len(bmm.users) == 1 and next(iter(bmm.users)).target is aten.squeeze.dim:
            squeeze = next(iter(bmm.users))
            if not any(user.target in _SPLITS for user in squeeze.users):
                yield _match_batched, squeeze


def _unsupported(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj) -> str | None:
    """Why the kernels cannot take these operands, or None."""
    x, ids, w, gate_up, down = (value(n) for n in (hidden, top_k_index, top_k_weights, gate_up_proj, down_proj))
    if x.device.type not in ("cuda", "cpu"):
        return f"device {x.device.type}"
    if any(not isinstance(size, int) for size in (*x.shape[1:], *ids.shape[1:], *gate_up.shape, *down.shape)):
        return "symbolic sizes other than the token count"
    experts, inter, width, top_k = gate_up.shape[0], gate_up.shape[1] // 2, x.shape[-1], ids.shape[-1]
    if not moe_ops.supports(width, inter, experts, top_k, x.dtype):
        return (f"{x.dtype} experts with hidden {width}, intermediate {inter}, {experts} experts, top-{top_k} are "
                f"outside the kernels' range (dtypes {', '.join(map(str, moe_ops.DTYPES))}, experts <= "
                f"{moe_ops.MAX_EXPERTS}, k <= {moe_ops.MAX_TOP_K})")
    try:
        moe_ops.check_inputs(x, ids, w, gate_up, down)
    except ValueError as error:
        return str(error)
    return None


def _routing_for_other_graphs(graph: torch.fx.Graph):
    """Each top-k (eager's or the router rewrite's) whose ids are an output of this graph: where no experts block is
    in the graph, the experts that take them run in a graph of their own, past a graph break."""
    outputs = set(graph.find_nodes(op="output")[0].all_input_nodes)
    for target in (aten.topk.default, torch.ops.gemma4_fx.router_select.default):
        for node in graph.find_nodes(op="call_function", target=target):
            if any(user.target is operator.getitem and user.args[1] == 1 and user in outputs for user in node.users):
                yield node


EAGER_LOOP = ("the routing leaves the graph: the experts run past a graph break (transformers' 'eager' experts "
              "loop over the experts hit, a count read from the data, unless compiled through a Gemma4Backend); "
              "load the model with experts_implementation='grouped_mm' or 'batched_mm' to have them rewritten")


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    candidates = list(_candidates(graph))
    for routing in () if candidates else _routing_for_other_graphs(graph):
        ctx.skipped(NAME, routing, EAGER_LOOP)
    for match, down in candidates:
        if down.graph is not graph:  # erased with an earlier match
            continue
        try:
            out, selection, *operands, id_bounds = match(down)
        except _Mismatch as mismatch:
            ctx.skipped(NAME, down, str(mismatch))
            continue
        if not ctx.decide(NAME, down, _unsupported(*operands)):
            continue
        with graph.inserting_before(out):
            if selection is not None:  # the same rows of the tokens, their ids and their weights
                operands[:3] = [_select(graph, operand, selection) for operand in operands[:3]]
            if id_bounds is not None:  # the clamp the ids had (clamp_min / clamp_max: Inductor lowers those)
                hidden, top_k_index, *weights = operands
                for op, bound in zip((aten.clamp_min.default, aten.clamp_max.default), id_bounds):
                    if bound is not None:
                        top_k_index = graph.call_function(op, (top_k_index, bound))
                        top_k_index.meta["val"] = value(operands[1])
                operands = [hidden, top_k_index, *weights]
            order = {"expert_order": True} if match is _match_loop else {}  # the loop's order of the sum over k
            fused = graph.call_function(torch.ops.gemma4_fx.moe_experts.default, tuple(operands), order)
        fused.meta.update(out.meta)
        out.replace_all_uses_with(fused)
        graph.eliminate_dead_code()


# --------------------------------------------------------------------------------------------------------------------
# transformers' "eager" experts, traced as one op


_traced_eager_experts = []  # the forward whose polyfill is installed


def trace_eager_experts() -> None:
    """Install, once per process, a Dynamo polyfill for transformers' "eager" `Gemma4TextExperts.forward`: in a
    compile for a backend with `traces_eager_experts` set (a Gemma4Backend running this rewrite) Dynamo traces it as
    one `gemma4_fx::moe_experts_loop` op where the kernels take the experts' sizes and no backward may follow;
    everywhere else it traces the loop itself, as it did before the polyfill (a copy of the same function, which the
    polyfill does not cover)."""
    if _traced_eager_experts:
        return
    try:
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts
    except ImportError:
        return
    eager = getattr(Gemma4TextExperts.forward, "__wrapped__", Gemma4TextExperts.forward)  # under the dispatch
    loop = types.FunctionType(eager.__code__, eager.__globals__, eager.__name__, eager.__defaults__,
                              eager.__closure__)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        experts, two_inter, width = self.gate_up_proj.shape
        # The op has no backward: where autograd may differentiate the loop, it is traced as written.
        backward = torch.is_grad_enabled() and any(
            t.requires_grad for t in (hidden_states, top_k_weights, self.gate_up_proj, self.down_proj))
        if not backward and _backend_traces_eager_experts() and moe_ops.supports(
                width, two_inter // 2, experts, top_k_index.shape[-1], hidden_states.dtype):
            return torch.ops.gemma4_fx.moe_experts_loop(hidden_states, top_k_index, top_k_weights,
                                                        self.gate_up_proj, self.down_proj)
        return loop(self, hidden_states, top_k_index, top_k_weights)

    try:
        torch.compiler.substitute_in_graph(eager)(forward)
    except (TypeError, ValueError) as error:  # e.g. a polyfill of its own: the loop then breaks as before
        log.warning("gemma4_fx: transformers' eager Gemma-4 experts stay a loop for Dynamo (%s)", error)
    _traced_eager_experts.append(eager)


@torch._dynamo.assume_constant_result
def _backend_traces_eager_experts() -> bool:
    """Whether the backend Dynamo is tracing for asks for the eager experts as one op. Called while tracing, its
    answer is a constant of the compiled code (Dynamo keeps compiled code per backend). It reads Dynamo's tracer, a
    private API: where that is not there, the answer is no, and the loop is traced as written."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        backend = InstructionTranslator.current_tx().output.compiler_fn
    except Exception:  # noqa: BLE001 (another torch's internals)
        return False
    while backend is not None and not getattr(backend, "traces_eager_experts", False):
        inner = getattr(backend, "_torchdynamo_orig_backend", None) or getattr(backend, "compiler_fn", None)
        backend = None if inner is backend else inner  # torch.compile's wrappers, down to the backend given
    return backend is not None
