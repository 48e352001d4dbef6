"""YOCO: compute the layers after the last cache write only on the rows that reach the output.

In prefill a decoder keeps only some rows of its last hidden states (`hidden[:, -k:]` for `logits_to_keep=k`, or
an engine's gather of each request's last token). Gemma-4 E2B/E4B end in KV-shared layers, which read keys and
values that earlier layers stored and write none of their own, so the dropped rows of those layers feed nothing:
running them is waste (a third of E2B's prefill).

This pass finds each row selection in a Dynamo FX graph and computes which upstream values are needed only at the
selected rows (row liveness, backwards): an op joins when every user of its output is already in and the op is
row-local (`row_local.arg_rows`: elementwise ops, reductions over other dims, linear layers, lookups, views,
attention over whole keys and values). It stops at an op that needs all rows: the keys and values of a layer
that still writes them, a graph output, a cache write. The selection then moves up to those stopping points
(hidden states, rotary cos/sin, per-layer inputs, the attention masks' query rows) and everything below runs on
the kept rows only; the graph computes the same values for them.

It runs on Dynamo's graph, before AOTAutograd and Inductor, so a later split of the graph at attention ops (CUDA
graphs) sees the truncated layers; `apply` is usable on any such GraphModule, outside the backend too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._dispatch.python import enable_python_dispatcher

from ..fx_utils import ALIASING, copy_graph_module, op_name, qualified_name, same, value, writes_in_place
from ..report import Report, node_location
from .row_local import ArgKey, arg_rows, argument, is_causal, node_arguments, replace_arguments, size_argument

NAME = "yoco"

_WORK = {"linear", "matmul", "bmm", "mm", "scaled_dot_product_attention", "embedding"}


@dataclass(frozen=True)
class RowSelection:
    """`node` keeps some rows of `source` along `dim`: the same `index` (a slice or an index tensor's node) taken
    along any other tensor's row dim keeps the same rows."""

    node: torch.fx.Node
    source: torch.fx.Node
    dim: int
    index: object

    def select(self, graph: torch.fx.Graph, tensor: torch.fx.Node, dim: int) -> torch.fx.Node:
        if isinstance(self.index, slice):
            return graph.call_function(torch.ops.aten.slice.Tensor,
                                       (tensor, dim, self.index.start, self.index.stop, self.index.step or 1))
        return graph.call_function(torch.index_select, (tensor, dim, self.index))


@dataclass
class LiveRows:
    """The outcome of the backward walk from one selection."""

    rows: dict[torch.fx.Node, int] = field(default_factory=dict)  # node computed on the kept rows -> its row dim
    inputs: dict[torch.fx.Node, dict[ArgKey, int]] = field(default_factory=dict)  # node -> its selected arguments
    cuts: dict[tuple[torch.fx.Node, int], None] = field(default_factory=dict)  # (node computed whole, dim), ordered
    stop: str | None = None  # why the walk stopped nearest to the selection, where a reason is worth reporting


def row_selection(node: torch.fx.Node) -> RowSelection | None:
    """`node` as a selection of rows along one dim: a slice `x[..., a:b, ...]` or `narrow`, `index_select`, or a
    single 1-D index tensor `x[..., idx]`. A lookup into a weight (an embedding table, `gate_up_proj[expert_ids]`)
    selects no activation rows: not one."""
    name = op_name(node)
    if not node.args or not isinstance(node.args[0], torch.fx.Node) \
            or not isinstance(value(node.args[0]), torch.Tensor) or not isinstance(value(node), torch.Tensor) \
            or isinstance(value(node.args[0]), torch.nn.Parameter):
        return None
    source, rank = node.args[0], value(node.args[0]).dim()
    if name in ("index_select", "narrow") and (node.kwargs or len(node.args) < 3):
        return None  # spelled with keywords: rare enough to leave alone
    if name == "index_select":
        return RowSelection(node, source, node.args[1] % rank, node.args[2])
    if name == "narrow":
        dim, start, length = node.args[1:4]
        stop = start + length if isinstance(start, int) and isinstance(length, int) else None
        return RowSelection(node, source, dim % rank, slice(start, stop)) if stop is not None else None
    if name != "getitem" or value(node).dim() != rank:
        return None
    items = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - len(items) + 1)
    selective = [(dim, item) for dim, item in enumerate(items) if item != slice(None)]
    if len(selective) != 1:
        return None
    dim, item = selective[0]
    if isinstance(item, slice):
        return RowSelection(node, source, dim, item)
    if isinstance(item, torch.fx.Node) and isinstance(value(item), torch.Tensor) and value(item).dim() == 1 \
            and not value(item).dtype.is_floating_point and value(item).dtype != torch.bool:
        return RowSelection(node, source, dim, item)
    return None


def _keeps_fewer_rows(selection: RowSelection) -> bool:
    """Nothing to gain when the source has one row (decode) or all rows are kept."""
    whole, kept = value(selection.source).shape[selection.dim], value(selection.node).shape[selection.dim]
    return not same(whole, 1) and not same(whole, kept)


def _stop_reason(node: torch.fx.Node, users, asked: bool) -> str | None:
    """Why the rows of `node` must all be computed, where that is worth telling the user: `users` want them all, or
    (`asked`) its op's rule said no."""
    if node.op == "placeholder":
        return "kept rows are selected from a graph input (a graph break above the selection? At a data-dependent " \
               "op, `gemma4_fx.capture_data_dependent_ops()` removes it)"
    for user in users:
        if user.op == "output":
            return "full-sequence intermediate is a graph output"
        if writes_in_place(user):
            return "cache write downstream" if user.args[0] is not node else "written in place downstream"
    if asked and node.op in ("call_function", "call_method"):
        return f"{qualified_name(node.target) or op_name(node)} mixes rows or is not known to be row-local " \
               "(`row_local.rows_rule`)"
    return None


def live_rows(selection: RowSelection, blocked: frozenset = frozenset()) -> LiveRows:
    """Walk up from `selection`: a node is computed on the kept rows only when all its users want it so, along
    the same dim, and its op is row-local; otherwise (or if `blocked`) its whole output is computed and selected
    (a cut)."""
    live = LiveRows()
    wanted: dict[torch.fx.Node, dict[torch.fx.Node, int]] = {selection.source: {selection.node: selection.dim}}
    whole: set[torch.fx.Node] = set()  # used whole by a node of the region (keys and values of an attention)
    node = selection.node.prev
    while wanted and node.op != "root":
        wants = wanted.pop(node, None)
        if wants is not None:
            dims = set(wants.values())
            others = [user for user in node.users if user not in wants]
            asked = len(dims) == 1 and not others and node not in whole | blocked
            rows = arg_rows(node, dims.pop()) if asked else None
            if rows is not None and writes_in_place(node) and (0,) not in rows:
                rows = None  # an in-place op joins only if the tensor it writes is computed on the kept rows
            if rows is None:
                _cut(live, node, set(wants.values()))
                live.stop = live.stop or _stop_reason(node, others, asked)
            else:
                live.rows[node], live.inputs[node] = next(iter(wants.values())), rows
                for key, arg in node_arguments(node):
                    if key not in rows:
                        whole.add(arg)
                    elif wanted.setdefault(arg, {}).setdefault(node, rows[key]) != rows[key]:
                        whole.add(arg)  # one op selects it along two dims: keep it whole
        node = node.prev
    return live


def _cut(live: LiveRows, node: torch.fx.Node, dims) -> None:
    """Compute `node` whole and select the rows (along `dims`) its users want. The result of a multi-output op (a
    tuple: top-k, split) cannot be selected as one: its users that joined (`getitem`s) are computed whole instead,
    and selected in its place."""
    if isinstance(value(node), torch.Tensor):
        live.cuts.update(dict.fromkeys((node, dim) for dim in sorted(dims)))
        return
    for user in node.users:
        if user in live.rows:
            del live.inputs[user]
            _cut(live, user, {live.rows.pop(user)})


def writes_through_a_cut(live: LiveRows) -> set[torch.fx.Node]:
    """In-place ops of the region that write, through views, into a tensor computed whole: other users of that
    tensor see the write on every row, so these ops must run whole too."""
    writers = set()
    for node in live.rows:
        if writes_in_place(node):
            base = node.args[0]
            while base in live.rows and op_name(base) in ALIASING:
                base = base.args[0]
            if base not in live.rows:
                writers.add(node)
    return writers


def _fake_mode(graph: torch.fx.Graph):
    for node in graph.nodes:
        val = value(node)
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None


class _Rewriter:
    """Builds the kept-rows version of the live region next to the original nodes, with example values."""

    def __init__(self, graph: torch.fx.Graph, selection: RowSelection, live: LiveRows, inputs_end: torch.fx.Node):
        self.graph, self.selection, self.live, self.inputs_end = graph, selection, live, inputs_end
        self.fake_mode = _fake_mode(graph)
        self.kept: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}

    def _create(self, op, target, args, kwargs, like: torch.fx.Node | None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        if like is not None:
            node.meta.update({k: v for k, v in like.meta.items() if k != "example_value"})
        node.meta["example_value"] = self._evaluate(node)
        return node

    def _evaluate(self, node: torch.fx.Node):
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value)
        # as Dynamo computes example values: composite ops with symbolic sizes decompose under the Python dispatcher
        with self.fake_mode or contextlib.nullcontext(), enable_python_dispatcher():
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def _row_count(self, tensor: torch.fx.Node, dim: int):
        count = value(tensor).shape[dim]
        if isinstance(count, int):
            return count
        return self._create("call_function", torch.ops.aten.sym_size.int, (tensor, dim), {}, None)

    def run(self) -> torch.fx.Node:
        selection, live = self.selection, self.live
        for node in list(self.graph.nodes):
            if node is selection.node:
                break
            # in order, right after the node they derive from (cuts of inputs: after the index, maybe an input)
            anchor = self.inputs_end if node.op in ("placeholder", "get_attr") else node
            with self.graph.inserting_before(anchor.next):
                for whole, dim in live.cuts:
                    if whole is node:
                        kept = selection.select(self.graph, node, dim)
                        kept.meta["example_value"] = self._evaluate(kept)
                        self.kept[(node, dim)] = kept
                if node in live.rows:
                    self.kept[(node, live.rows[node])] = self._copy(node)
        return self.kept[(selection.source, selection.dim)]

    def _copy(self, node: torch.fx.Node) -> torch.fx.Node:
        replacements = {key: self.kept[(argument(node, key), dim)] for key, dim in self.live.inputs[node].items()}
        dim = self.live.rows[node]
        size_key = size_argument(node, dim)
        if size_key is not None:
            replacements[size_key] = self._row_count(replacements[(0,)], self.live.inputs[node][(0,)])
        if op_name(node) == "scaled_dot_product_attention" and is_causal(node) is True:
            replacements.update(self._causal_mask(node))
        args, kwargs = replace_arguments(node, replacements)
        return self._create(node.op, node.target, args, kwargs, node)

    def _causal_mask(self, node: torch.fx.Node) -> dict[ArgKey, torch.fx.Node | bool]:
        """`is_causal` lets query i see keys 0..i; once the queries are the kept rows, that becomes an explicit
        mask from the kept rows' positions."""
        query, key = node.args[0], node.args[1]
        device = value(query).device
        whole, whole_dim = next(iter(self.live.cuts))  # any cut holds all rows
        positions = self._create("call_function", torch.arange, (self._row_count(whole, whole_dim),),
                                 {"device": device}, None)
        kept = self.selection.select(self.graph, positions, 0)
        kept.meta["example_value"] = self._evaluate(kept)
        keys = self._create("call_function", torch.arange, (self._row_count(key, value(key).dim() - 2),),
                            {"device": device}, None)
        mask = self._create("call_function", torch.le, (
            self._create("call_method", "unsqueeze", (keys, 0), {}, None),
            self._create("call_method", "unsqueeze", (kept, 1), {}, None)), {}, None)
        causal_key = ("is_causal",) if "is_causal" in node.kwargs else (5,)
        mask_key = ("attn_mask",) if "attn_mask" in node.kwargs or len(node.args) <= 3 else (3,)
        return {causal_key: False, mask_key: mask}


def _move_index_up(selection: RowSelection, graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The cuts go right after the values they select, so the index (a symbolic bound, an index tensor) must be
    computed before all of them. If it depends on graph inputs only, move it right after them and return the last
    node it needs; None if it depends on intermediate values."""
    index = selection.index
    roots = [index] if isinstance(index, torch.fx.Node) else \
        [b for b in (index.start, index.stop, index.step) if isinstance(b, torch.fx.Node)]
    needed, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.op in ("placeholder", "get_attr") or node in needed:
            continue
        if node.op not in ("call_function", "call_method") or writes_in_place(node):
            return None
        needed.append(node)
        stack.extend(node.all_input_nodes)
    last = [n for n in graph.nodes if n.op in ("placeholder", "get_attr")][-1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(needed, key=order.get):
        last.append(node)
        last = node
    return last


def _attention_on_kept_rows(selection: RowSelection) -> torch.fx.Node | None:
    """The first attention downstream that already runs on as many query rows as the selection keeps, fewer than
    its keys: the model itself dropped rows before its last layers (transformers >= 5.2x does so for KV-shared
    layers). Feature dims (the last) are not rows."""
    kept = value(selection.node).shape[selection.dim]
    if selection.dim == value(selection.node).dim() - 1:
        return None
    seen, stack = set(), [selection.node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    order = {node: i for i, node in enumerate(selection.node.graph.nodes)}
    for node in sorted(seen, key=order.get):
        if op_name(node) == "scaled_dot_product_attention":
            query, key = value(node.args[0]).shape[-2], value(node.args[1]).shape[-2]
            if same(query, kept) and not same(query, key):
                return node
    return None


@dataclass(frozen=True)
class Outcome:
    """What the pass did at one row selection: the attention ops (or, lacking any, other ops) it truncated, or
    why it left the graph alone there."""

    selection: str  # the selection node's name
    location: str
    truncated: tuple[str, ...] = ()  # module paths of the truncated attention ops (one per layer), or of the first
    # truncated op where no attention is
    reason: str | None = None


def truncate(gm: torch.fx.GraphModule) -> list[Outcome]:
    """Rewrite `gm` in place so that each row selection's live region runs on the kept rows only."""
    graph, outcomes, already_sliced, erased = gm.graph, [], [], set()
    for node in reversed(list(graph.nodes)):
        if node in erased:  # by an earlier rewrite
            continue
        selection = row_selection(node)
        if selection is None or not _keeps_fewer_rows(selection):
            continue
        live, blocked = live_rows(selection), frozenset()
        while writers := writes_through_a_cut(live):
            blocked |= writers
            live = live_rows(selection, blocked)
        attention_on_kept_rows = _attention_on_kept_rows(selection)
        if attention_on_kept_rows is not None:
            already_sliced.append(attention_on_kept_rows)
        location = node_location(node)
        if not any(op_name(n) in _WORK for n in live.rows):
            if live.stop is not None and attention_on_kept_rows is None:
                outcomes.append(Outcome(node.name, location, reason=live.stop))
            continue
        inputs_end = _move_index_up(selection, graph)
        if inputs_end is None:
            outcomes.append(Outcome(node.name, location, reason="the kept rows' index is computed from intermediate "
                                                                "values"))
            continue
        attention = [node_location(n) for n in live.rows if op_name(n) == "scaled_dot_product_attention"] \
            or [node_location(next(n for n in reversed(live.rows) if op_name(n) in _WORK))]
        kept = _Rewriter(graph, selection, live, inputs_end).run()
        node.replace_all_uses_with(kept)
        graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for original in sorted(live.rows, key=order.get, reverse=True):
            graph.erase_node(original)
        erased |= {node, *live.rows}
        outcomes.append(Outcome(node.name, location, tuple(reversed(attention))))
    if already_sliced:
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(already_sliced, key=order.get)
        outcomes.append(Outcome(first.name, node_location(first), reason="already sliced by the model"))
    graph.lint()
    gm.recompile()
    return outcomes


def apply(gm: torch.fx.GraphModule, example_inputs=None, *, report: Report | None = None,
          graph_name: str = "graph") -> torch.fx.GraphModule:
    """The graph with YOCO applied: a rewritten copy (`gm` itself stays as it was, e.g. as a reference to verify
    against), or `gm` when there was nothing to do. Matches (one per truncated layer) and the reasons it left rows
    alone go to `report` if given. With the signature of a torch.compile backend, `backend=yoco.apply` runs the
    rewritten graph op by op; an engine can call it on its own Dynamo graphs before compiling them."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    rewritten = copy_graph_module(gm)
    outcomes = truncate(rewritten)
    if report is not None:
        for outcome in outcomes:
            for location in outcome.truncated:
                report.add_match(NAME, graph_name, location, [outcome.selection])
            if outcome.reason is not None:
                report.add_skip(NAME, graph_name, outcome.location, outcome.reason)
    return rewritten if any(outcome.truncated for outcome in outcomes) else gm
