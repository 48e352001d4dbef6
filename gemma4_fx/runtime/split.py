"""Split a Dynamo FX graph into pieces that CUDA graphs can hold and pieces that run between them.

Attention is left out of the graphs (its cost depends on context length, and serving engines swap in their own
kernels), except one-row attention in a prefill whose keys are no longer than the prompt's (what YOCO leaves the
layers that share a KV cache): it adds no shape to capture, and run between graphs it would cost a launch from the
host and two cuts per layer (ops the caller lists as `extra_ops` still run between graphs). So is anything a graph
cannot hold: host syncs, copies between host and device (but a number copied over becomes a fill on the device),
tensors whose shapes come from data, and uses of int inputs that size no tensor (a graph would keep the value it was
captured with; where a tensor's elementwise op takes one, it reaches the graph as a device scalar instead). The cut
follows graph order: every piece is a contiguous run of nodes, so the pieces always form a chain; work on host
values alone moves to the top first, so that it does not cut a layer in two, and so do host syncs on what the inputs
give cheaply, so that each does not stall the GPU mid-graph.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.symbolic_shapes import free_symbols, free_unbacked_symbols, statically_known_true
from torch.fx.passes.split_module import split_module

from ..fx_utils import MATMULS, SDPA, is_op, method_name, on_host, op_name, qualified_name, \
    value as example_value, writes_in_place, written_in_place
from ..replacements.launch import BETWEEN_GRAPHS

_ATTENTION_NAMESPACES = ("flash_attn", "vllm", "sglang")  # ops of these libraries named "*attention*" or "*attn*"
_ATTENTION_OPS = ("gemma4_fx::decode_attention", "gemma4_fx::prefill_attention")  # ours (not post_attn_norm)
_SOFTMAXES = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.ops.aten._softmax.default,
              torch.ops.aten.softmax.int}
# Between the scores matmul and the softmax (scale, softcap, mask) and between the softmax and the value matmul
# (cast back, dropout), as in HF's `eager_attention_forward`.
_SCORE_STEPS = {operator.mul, operator.truediv, operator.add, torch.mul, torch.div, torch.add, torch.tanh,
                torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, torch.Tensor.mul, torch.Tensor.div,
                torch.Tensor.add, torch.Tensor.tanh, torch.Tensor.masked_fill, F.dropout}
_HOST_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero"}
# Elementwise ops whose int operand can be a 0-d tensor instead (`_host_values_as_device_scalars`).
_SCALAR_OPERAND_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.lt,
                       operator.le, operator.gt, operator.ge, operator.eq, operator.ne, torch.add, torch.sub, torch.mul,
                       torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.Tensor.add, torch.Tensor.sub,
                       torch.Tensor.mul, torch.Tensor.lt, torch.Tensor.le, torch.Tensor.gt, torch.Tensor.ge,
                       torch.Tensor.eq, torch.Tensor.ne}
_SIZED_BY_DATA = {torch.nonzero, torch.ops.aten.nonzero.default}
_HOST_SYNC_FUNCTIONS = {torch.ops.aten._local_scalar_dense.default, *_SIZED_BY_DATA}
# What a host sync's inputs may be computed with for it to move to the top (`_hoist_host_syncs`): no costly op (that
# would pull layers of work ahead of the others), no random op (it would draw in another order), and nothing that
# changes or depends on a global mode other than the one at the top.
_COSTLY = MATMULS | {"linear", "conv1d", "conv2d", "conv3d", "einsum", "addmm", "baddbmm",
                     "scaled_dot_product_attention"}
_RANDOM = ("rand", "dropout", "bernoulli", "multinomial", "normal", "uniform", "exponential")
_ENTER_AUTOCAST, _EXIT_AUTOCAST = torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast
# vmap as Dynamo traces it (transformers' masks under dynamic shapes): its levels are global state that the ops between
# entering and leaving them run in.
_ENTER_VMAP = torch._functorch.predispatch._vmap_increment_nesting
_EXIT_VMAP = torch._functorch.predispatch._vmap_decrement_nesting
_GLOBAL_STATE = {torch._C._set_grad_enabled, _ENTER_AUTOCAST, _EXIT_AUTOCAST, _ENTER_VMAP, _EXIT_VMAP}


@dataclass
class Piece:
    """One submodule of the split graph. `captured` pieces go into CUDA graphs; the others run as they are."""

    name: str
    module: torch.fx.GraphModule
    captured: bool
    escaping: frozenset[int] = frozenset()  # output positions the caller may receive (directly or through views)
    contiguous: frozenset[int] = frozenset()  # input positions compiled as contiguous tensors (`compile_pieces`)


@dataclass
class SplitGraph:
    module: torch.fx.GraphModule  # calls the pieces in order; pieces are its `submod_<i>` attributes
    pieces: list[Piece]

    @property
    def captured(self) -> list[Piece]:
        return [piece for piece in self.pieces if piece.captured]


def is_attention(node: torch.fx.Node, extra_ops=()) -> bool:
    """SDPA, flex attention, flash-attention style library ops, our decode attention, or one of `extra_ops` (targets
    or "ns::name")."""
    if node.op != "call_function":
        return False
    target = node.target
    name = qualified_name(target)
    if target in SDPA or target is torch.ops.higher_order.flex_attention:
        return True
    if _listed(node, extra_ops) or _listed(node, _ATTENTION_OPS):
        return True
    namespace, _, op = name.partition("::")
    return namespace in _ATTENTION_NAMESPACES and ("attention" in op or "attn" in op)


def _listed(node: torch.fx.Node, ops) -> bool:
    """`node` calls one of `ops` (targets, or "ns::name" of any of an op's overloads)."""
    name = qualified_name(node.target)
    return node.target in ops or bool(name) and (name in ops or name.split(".")[0] in ops)


def eager_attention_span(softmax: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(scores matmul, value matmul) around `softmax` if it is HF's eager attention, else None."""
    scores = softmax.args[0]
    while isinstance(scores, torch.fx.Node) and not op_name(scores) in MATMULS:
        if not is_op(scores, _SCORE_STEPS) or not scores.args:
            return None
        scores = scores.args[0]
    if not isinstance(scores, torch.fx.Node):
        return None
    weights = softmax
    while len(weights.users) == 1:
        [user] = weights.users
        if op_name(user) in MATMULS and user.args[0] is weights:
            return scores, user
        if not is_op(user, _SCORE_STEPS):
            return None
        weights = user
    return None


def host_value_symbols(graph: torch.fx.Graph) -> set:
    """Symbols of the graph's int inputs that size no tensor: their values feed the computation (HF's sliding cache
    passes its fill level, which moves every step, into the mask). A graph would keep the value it was captured
    with, and since they size nothing, capturing per value would capture every step."""
    shape_symbols, int_symbols = set(), set()
    for node in graph.nodes:
        value = example_value(node)
        if isinstance(value, torch.Tensor):
            shape_symbols |= free_symbols(value)
        elif node.op == "placeholder" and isinstance(value, torch.SymInt):
            int_symbols |= free_symbols(value)
    return int_symbols - shape_symbols


def is_uncapturable(node: torch.fx.Node, host_values: set = frozenset(), host_work: bool = False) -> bool:
    """Reads of device tensors on the host (`.item()`, `.cpu()`, `nonzero`...), copies between host and device,
    anything touching a tensor whose shape comes from data, and uses of `host_values` (see `host_value_symbols`).
    With `host_work` (the graph runs on a device), so do tensors made on the CPU: a graph would not redo them.
    Reads of CPU tensors on the host (`.item()`) stay: a graph keeps what it read, and the runtime captures again
    if the value changes."""
    if is_op(node, _SIZED_BY_DATA):  # on any device (`_nonzero_of_mask` makes one without an example value)
        return True
    inputs = [example_value(arg) for arg in node.all_input_nodes]
    on_device = not all(on_host(v) for v in inputs)
    if on_device and (method_name(node) in _HOST_SYNC_METHODS
                      or (node.op == "call_function" and node.target in _HOST_SYNC_FUNCTIONS)):
        return True
    out = example_value(node)
    values = [value for value in [out, *inputs] if value is not None]
    if any(free_unbacked_symbols(value) for value in values):
        return True
    if host_values and any(isinstance(value, torch.SymInt) and free_symbols(value) & host_values
                           for value in values):
        return True
    if isinstance(out, torch.Tensor):  # a copy between host and device: a graph holds none from pageable memory
        sides = {on_host(v) for v in inputs if isinstance(v, torch.Tensor)}
        return bool(sides) and sides != {on_host(out)} or host_work and on_host(out)
    return False


def splitting_nodes(graph: torch.fx.Graph, *, split_attention: bool, host_work: bool, extra_ops=()
                    ) -> set[torch.fx.Node]:
    """Nodes that must run outside CUDA graphs (`host_work`: see `is_uncapturable`). An eager attention contributes
    every node from its scores matmul to its value matmul, so that the cut leaves the pieces a chain."""
    nodes = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    order = {node: index for index, node in enumerate(nodes)}
    host_values = host_value_symbols(graph)
    marked = {node for node in nodes if is_uncapturable(node, host_values, host_work)}
    if split_attention:
        attentions = attention_shapes(graph, extra_ops)
        prefill = [a.rows for a in attentions if not _one_row(a.rows)]
        prompt = set().union(*(free_symbols(rows) for rows in prefill if rows is not None))
        for a in attentions:
            if prefill and _one_row(a.rows) and a.keys is not None and free_symbols(a.keys) <= prompt \
                    and not _listed(a.first, extra_ops):  # what the caller listed always runs between graphs
                continue  # YOCO's one row in a prefill: captured with its layer (module docstring)
            marked.update(nodes[order[a.first]:order[a.last] + 1])
    return marked | _runs_without_tensors(nodes, marked)


def _runs_without_tensors(nodes: list[torch.fx.Node], marked: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The unmarked runs of `nodes` that make no tensor (int arithmetic on sizes, between the copies at the top): a
    graph of them would launch nothing, so they run with their marked neighbours."""
    idle, run = set(), []
    for node in [*nodes, None]:
        if node is not None and node not in marked:
            run.append(node)
            continue
        if run and not any(isinstance(example_value(item), torch.Tensor) for item in run):
            idle.update(run)
        run = []
    return idle


class Attention(NamedTuple):
    """An attention in a graph: its nodes run from `first` to `last`; `rows` (query rows) and `keys` (key length)
    are None where the layout is not known (key lengths are read from SDPA, our decode attention and HF's eager
    attention)."""

    first: torch.fx.Node
    last: torch.fx.Node
    rows: object
    keys: object


def attention_shapes(graph: torch.fx.Graph, extra_ops=()) -> list[Attention]:
    """Each attention of `graph`, in graph order."""
    found = []
    for node in graph.nodes:
        if is_attention(node, extra_ops):
            query, keys = (node.args[i] if len(node.args) > i else node.kwargs.get(name)
                           for i, name in enumerate(("query", "key")))
            known = node.target in SDPA or _listed(node, _ATTENTION_OPS)
            found.append(Attention(node, node, _size(query, -2), _size(keys, -2) if known else None))
        elif is_op(node, _SOFTMAXES) and (span := eager_attention_span(node)):
            scores, values = span
            found.append(Attention(scores, values, _size(scores.args[0], -2), _size(scores, -1)))
    return found


def _size(arg, dim: int):
    value = example_value(arg)
    return value.shape[dim] if isinstance(value, torch.Tensor) and value.ndim >= 2 else None


def _one_row(rows) -> bool:
    return rows is not None and statically_known_true(rows == 1)


def is_decode_shaped(graph: torch.fx.Graph, extra_ops=()) -> bool:
    """Every attention in the graph has exactly one query token (a decode step), so it can live in one graph."""
    attentions = attention_shapes(graph, extra_ops)
    return bool(attentions) and all(_one_row(a.rows) for a in attentions)


def _fill_constants_on_device(graph: torch.fx.Graph) -> None:
    """A number made a tensor on the CPU and copied to the device (HF's sliding cache makes its window size so, once
    per layer and prefill) becomes a fill on the device: the same value, no blocking copy, and a graph holds it."""
    for node in list(graph.nodes):
        made = node.args[0] if method_name(node) == "to" and node.args else node
        out = example_value(node)
        if not (isinstance(out, torch.Tensor) and not on_host(out) and out.ndim == 0
                and isinstance(made, torch.fx.Node) and made.op == "call_function" and made.target is torch.tensor
                and len(made.args) == 1 and type(made.args[0]) in (bool, int, float)):
            continue
        with graph.inserting_before(node):
            fill = graph.call_function(torch.full, ((), made.args[0]), {"dtype": out.dtype, "device": out.device})
        fill.meta.update(node.meta)
        node.replace_all_uses_with(fill)
        graph.erase_node(node)
        if made is not node and not made.users:
            graph.erase_node(made)


def _host_values_as_device_scalars(graph: torch.fx.Graph, host_values: set) -> None:
    """Where a tensor's elementwise arithmetic or comparison takes a host value as its other operand (HF's sliding
    cache adds its fill level to a range of positions), the operand becomes a 0-d int64 device tensor made from it
    (a fill where the value is made): a graph input that the runtime fills at each call, where the op itself had to
    run between graphs and cut the step's graph in pieces. The result is the same, dtype included: a 0-d tensor
    takes part in type promotion as a Python int does."""
    for node in list(graph.nodes):
        if not is_op(node, _SCALAR_OPERAND_OPS) or node.kwargs or len(node.args) != 2:
            continue
        values = [example_value(arg) for arg in node.args]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        ints = [(i, arg) for i, (arg, v) in enumerate(zip(node.args, values))
                if isinstance(arg, torch.fx.Node) and isinstance(v, torch.SymInt) and free_symbols(v) & host_values]
        if len(tensors) != 1 or len(ints) != 1:
            continue
        (position, source), device = ints[0], tensors[0].device
        fill = next((user for user in source.users if user.target is torch.full and user.args == ((), source)
                     and user.kwargs == {"dtype": torch.int64, "device": device}), None)
        if fill is None:
            placeholders = list(graph.find_nodes(op="placeholder"))
            with graph.inserting_after(placeholders[-1] if source.op == "placeholder" else source):
                fill = graph.call_function(torch.full, ((), source), {"dtype": torch.int64, "device": device})
            with tensors[0].fake_mode:
                fill.meta["example_value"] = torch.full((), example_value(source), dtype=torch.int64, device=device)
        node.update_arg(position, fill)


def _hoist_host_work(graph: torch.fx.Graph, on_device: bool) -> torch.fx.Node | None:
    """Move what is computed from host values alone to the top of the graph, so that where it must run between
    graphs it does not cut a layer in two: arithmetic on int inputs (`cumulative_length + 1`), and CPU tensors with
    their copies to the device (a number made a tensor there is a fill on the device by then:
    `_fill_constants_on_device`). Returns the last node of the top (None if the graph has no input)."""
    placeholders, nodes = list(graph.find_nodes(op="placeholder")), list(graph.nodes)
    written, modes = written_in_place(nodes), _global_modes(nodes)
    hoisted = {node for node in placeholders if on_host(example_value(node)) and node not in written}
    anchor = placeholders[-1] if placeholders else None
    for node in nodes:
        inputs = node.all_input_nodes
        if anchor is None or node.op not in ("call_function", "call_method") or node in written \
                or writes_in_place(node) or node.target in _GLOBAL_STATE or modes[node] != modes[anchor] \
                or not all(arg in hoisted and on_host(example_value(arg)) for arg in inputs):
            continue
        out = example_value(node)
        if isinstance(out, torch.Tensor):  # made on the CPU, or copied from there
            hoist = on_device and (on_host(out) or any(isinstance(example_value(arg), torch.Tensor) for arg in inputs))
        else:
            hoist = inputs and all(isinstance(example_value(arg), torch.SymInt) for arg in inputs)
        if hoist:
            anchor.append(node)
            anchor = node
            hoisted.add(node)
    return anchor


def _hoist_host_syncs(graph: torch.fx.Graph, anchor: torch.fx.Node) -> None:
    """Move each host sync (`.item()`, `.tolist()`, `nonzero`, a boolean-mask index) whose inputs the graph's inputs
    give cheaply to the top, after `anchor`, with the work it needs: that work first, the syncs last. Where it was,
    a sync waits for all the work queued before it, and then the GPU waits for the host; at the top, the queue holds
    only the syncs' own small work. HF's multimodal prefill syncs three times so, each time on what its inputs give:
    the vision pooler's valid patches, the images' soft-token counts, the image placeholders in the prompt.

    `x[mask]` becomes `x[mask.nonzero(as_tuple=True)]`, which is how indexing computes it: the sync (`nonzero`) moves,
    the gather stays."""
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    top, written, modes = position[anchor], written_in_place(nodes), _global_modes(nodes)
    hoisted, syncs = set(), set()
    for node in nodes[top + 1:]:
        source = _sync_source(node)
        if source is None:
            continue
        needed = _ancestors(source, lambda n: position[n] <= top or n in hoisted)
        if not all(_movable(n, written, modes[n] == modes[anchor]) for n in needed):
            continue
        if source is not node:  # a boolean-mask index: it stays, its `nonzero` moves
            sync = _nonzero_of_mask(graph, node)
            position[sync], node = position[node], sync
        hoisted |= needed | {node}
        syncs.add(node)
    level = {}  # syncs between a node and the top: syncs go after the work they need, that work first
    for node in sorted(hoisted, key=position.get):
        level[node] = max((level.get(arg, 0) for arg in node.all_input_nodes), default=0) + (node in syncs)
    for node in sorted(hoisted, key=lambda n: (level[n], position[n])):
        anchor.append(node)
        anchor = node


def _sync_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """What moves up for the host sync `node` makes: the node itself (`.item()`, `nonzero`...), or for a
    boolean-mask index, its mask; None if it makes none."""
    if method_name(node) in _HOST_SYNC_METHODS or is_op(node, _HOST_SYNC_FUNCTIONS):
        return node
    if node.target is operator.getitem and len(node.args) == 2 and isinstance(node.args[1], torch.fx.Node):
        source, mask = (example_value(arg) for arg in node.args)
        if isinstance(source, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool \
                and 1 <= mask.ndim <= source.ndim and isinstance(example_value(node), torch.Tensor):
            return node.args[1]
    return None


def _nonzero_of_mask(graph: torch.fx.Graph, index: torch.fx.Node) -> torch.fx.Node:
    """Make `x[mask]` (node `index`) `x[mask.nonzero(as_tuple=True)]`; returns the `nonzero` node."""
    source, mask = index.args
    with graph.inserting_before(index):
        positions = graph.call_function(torch.nonzero, (mask,), {"as_tuple": True})
    # No example value: its size would be the index's unbacked one, and `split_module` takes a symbol's binding from
    # the first node whose value is that SymInt, which comes after the index; the piece inputs it made would cycle.
    positions.meta.update({key: index.meta[key] for key in ("stack_trace", "nn_module_stack") if key in index.meta})
    index.args = (source, positions)
    return positions


def _ancestors(source: torch.fx.Node, stop) -> set[torch.fx.Node]:
    """`source` and the nodes it is computed from, up to the nodes `stop` says to leave."""
    found, stack = set(), [source] if not stop(source) else []
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(arg for arg in node.all_input_nodes if not stop(arg))
    return found


def _movable(node: torch.fx.Node, written: set, same_modes: bool) -> bool:
    """`node` may run earlier: pure, cheap and deterministic, in the global modes of where it goes (see `_COSTLY`),
    on nothing the graph writes in place."""
    if node.op not in ("call_function", "call_method") or writes_in_place(node) \
            or any(arg in written for arg in (node, *node.all_input_nodes)) \
            or not same_modes or node.target in _GLOBAL_STATE \
            or isinstance(node.target, torch._ops.HigherOrderOperator):
        return False
    name = op_name(node)
    return name not in _COSTLY and not any(word in name for word in _RANDOM) \
        and qualified_name(node.target).partition("::")[0] in ("", "aten", "prims")


def _global_modes(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, tuple]:
    """For each node, the grad mode, autocast regions and vmap levels it runs in, as far as the graph sets them."""
    modes, regions, grad, levels = {}, [], None, 0
    for node in nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            grad = node.args
        elif node.op == "call_function" and node.target is _ENTER_AUTOCAST:
            regions.append(node)
        elif node.op == "call_function" and node.target is _EXIT_AUTOCAST and node.args and node.args[0] in regions:
            regions.remove(node.args[0])
        elif node.op == "call_function" and node.target in (_ENTER_VMAP, _EXIT_VMAP):
            levels += 1 if node.target is _ENTER_VMAP else -1
        modes[node] = (tuple(regions), grad, levels)
    return modes


def _on_device(graph: torch.fx.Graph) -> bool:
    """Some tensor of the graph is on a device: then CPU tensors are host work."""
    return any(not on_host(example_value(node)) for node in graph.nodes)


def bake_float_inputs(gm: torch.fx.GraphModule, example_inputs) -> dict[int, float]:
    """Under `dynamic=True` Dynamo passes float attributes (norm eps, scales) and arguments as 0-d float64 CPU tensors
    that the graph reads with `.item()`; Inductor may move one to the device with a blocking copy, which no CUDA graph
    can hold. Replace each read by its value in `example_inputs` and return {input position: value}. Compiling the
    result makes Inductor's float pass find those floats unread and have Dynamo trace again with them specialised
    (constants, guarded on their values), which is what keeps this sound. Arithmetic on the values alone
    (`min(clip, finfo.max)`, `-clip`: the audio encoder's gradient clipping) is folded too: its example value still
    names the float's symbol, which `split_module` would look for where no node defines it any more."""
    baked = {}
    for index, (node, example) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        if not (isinstance(example, torch.Tensor) and example.device.type == "cpu" and example.ndim == 0
                and example.dtype == torch.float64 and node.users
                and all(method_name(read) == "item" for read in node.users)):
            continue
        number = example.item()
        for read in list(node.users):
            for user in list(read.users):
                user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs),
                                                               lambda arg: number if arg is read else arg)
            gm.graph.erase_node(read)
        baked[index] = number
    if baked:
        _fold_scalar_arithmetic(gm.graph)
        gm.recompile()
    return baked


def _fold_scalar_arithmetic(graph: torch.fx.Graph) -> None:
    """Compute each function of constants alone that makes a number (not a tensor), in graph order, so that
    arithmetic over folded numbers folds in turn."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.all_input_nodes \
                or not isinstance(example_value(node), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            continue
        number = node.target(*node.args, **node.kwargs)
        for user in list(node.users):
            user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs),
                                                           lambda arg: number if arg is node else arg)
        graph.erase_node(node)


def split_graph(gm: torch.fx.GraphModule, *, split_attention: bool = True, extra_ops=()) -> SplitGraph:
    """Cut `gm` into alternating captured and uncaptured pieces (see the module docstring)."""
    on_device = _on_device(gm.graph)
    _fill_constants_on_device(gm.graph)
    top = _hoist_host_work(gm.graph, on_device)
    if top is not None:
        _hoist_host_syncs(gm.graph, top)
    _host_values_as_device_scalars(gm.graph, host_value_symbols(gm.graph))
    gm.recompile()
    marked = splitting_nodes(gm.graph, split_attention=split_attention, host_work=on_device, extra_ops=extra_ops)
    partition_of: dict[torch.fx.Node, int] = {}
    partition, previous = 0, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if previous is not None and (node in marked) != previous:
            partition += 1
        previous = node in marked
        partition_of[node] = partition
    uncaptured = {partition_of[node] for node in marked}
    split = split_module(gm, gm, lambda node: partition_of[node], keep_original_order=True)
    pieces = []
    for node in split.graph.find_nodes(op="call_module"):
        index = int(node.target.rsplit("_", 1)[1])
        pieces.append(Piece(node.target, getattr(split, node.target), captured=index not in uncaptured))
        _return_tuple(split.graph, node, pieces[-1].module)
    split.recompile()
    _mark_escaping(split, pieces)
    return SplitGraph(split, pieces)


def _return_tuple(graph: torch.fx.Graph, call: torch.fx.Node, piece: torch.fx.GraphModule) -> None:
    """Make a piece that returns one value return a 1-tuple, as Dynamo's graphs do (Inductor's calling convention
    for those is the plain one)."""
    output = piece.graph.output_node()
    if isinstance(output.args[0], (tuple, list)):
        return
    output.args = ((output.args[0],),)
    piece.recompile()
    with graph.inserting_after(call):
        first = graph.call_function(operator.getitem, (call, 0))
    call.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)


def _mark_escaping(split: torch.fx.GraphModule, pieces: list[Piece]) -> None:
    """Find the outputs of captured pieces that the caller can end up holding: those that reach the graph's output,
    directly or through an uncaptured piece (which may return a view of its input)."""
    by_name = {piece.name: piece for piece in pieces}
    escaping: set[torch.fx.Node] = set(split.graph.output_node().all_input_nodes)
    for node in reversed(split.graph.find_nodes(op="call_module")):
        outputs = list(node.users)  # getitems
        piece = by_name[node.target]
        if piece.captured:
            piece.escaping = frozenset(out.args[1] for out in outputs if out in escaping)
        elif any(out in escaping for out in outputs):
            escaping.update(node.all_input_nodes)


class _PieceCompiler(torch.fx.Interpreter):
    """Runs the split graph on fake inputs so each captured piece is compiled with the inputs it will see."""

    def __init__(self, split: SplitGraph, compile_piece, shape_env=None):
        super().__init__(split.module)
        self.captured = {piece.name: piece for piece in split.captured}
        self.compile_piece, self.compiled, self.shape_env = compile_piece, {}, shape_env

    def call_module(self, target, args, kwargs):
        # A piece may make sizes from data (`nonzero`, `.tolist()`; a captured one too, on the device): run here on
        # fake inputs, it makes fresh unbacked symbols that nothing binds, and the next trace (this piece's compile,
        # or the next piece's) would fail on them. Its compile makes and binds its own.
        ignore_fresh = self.shape_env is not None
        with self.shape_env.ignore_fresh_unbacked_symbols() if ignore_fresh else contextlib.nullcontext():
            outputs = super().call_module(target, args, kwargs)  # before compiling: Inductor may change the module
        if target in self.captured:
            piece = self.captured[target]
            piece.contiguous = frozenset(index for index, arg in enumerate(args) if _known_contiguous(arg))
            self.compiled[target] = self.compile_piece(piece, [_canonical(arg) for arg in args])
        return outputs


def _canonical(value):
    """An int input as the symbol the shape environment now knows it by. A guard may have equated its symbol with
    another (`n == x.size(0)`); Inductor then writes the piece's code in the other symbol, which only the whole
    graph's inputs bind, and the piece fails with a NameError on it. Handed the other symbol, the piece binds it."""
    if not isinstance(value, torch.SymInt):
        return value
    node = value.node
    expr = node.expr  # `_expr` is the symbol it was made with; `expr` applies the replacements guards made
    if expr == node._expr or not expr.is_Symbol:
        return value
    return node.shape_env.create_symintnode(expr, hint=node.hint)


def _known_contiguous(value) -> bool:
    """A contiguous tensor for all sizes its symbols may take (decided without adding guards)."""
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
        return False
    expected = torch._prims_common.make_contiguous_strides_for(value.shape)
    return all(statically_known_true(size == 1) or statically_known_true(stride == want)
               for size, stride, want in zip(value.shape, value.stride(), expected))


def compile_pieces(split: SplitGraph, gm: torch.fx.GraphModule, example_inputs, compile_piece) -> list:
    """`compile_piece(piece, inputs)` for each captured piece, in order, with inputs carrying `gm`'s symbolic shapes,
    so that a piece's compile covers every shape the whole graph's would."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)  # the one Dynamo made for backends
    inputs = list(example_inputs)
    if fake_mode is not None:
        # Dynamo's example values have the symbolic shapes but belong to its tracing fake mode: remake them here.
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        with fake_mode:
            for index, node in enumerate(placeholders):
                value = example_value(node)
                if isinstance(value, torch.Tensor):
                    inputs[index] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                        device=value.device)
                    # 0-d tensors Dynamo made of Python numbers carry the symbol `.item()` returns
                    if getattr(value, "item_memo", None) is not None:
                        inputs[index].item_memo = value.item_memo
    compiler = _PieceCompiler(split, compile_piece, getattr(fake_mode, "shape_env", None))
    with fake_mode if fake_mode is not None else contextlib.nullcontext(), enable_python_dispatcher():
        compiler.run(*inputs)  # the python dispatcher runs composite ops (linear, matmul) on symbolic shapes
    call_ops_directly(split)  # after the fake run: the functions take real tensors
    return [compiler.compiled[piece.name] for piece in split.captured]


def call_ops_directly(split: SplitGraph) -> None:
    """The pieces between graphs call our ops that run there as the Python functions they are
    (`replacements.launch.between_graphs_op`): torch.library's custom-op layers would cost each call as much host
    time as the launches of its kernels (a prefill's attention layers run there, one call each)."""
    for piece in split.pieces:
        if piece.captured:
            continue
        nodes = [node for node in piece.module.graph.nodes
                 if node.op == "call_function" and node.target in BETWEEN_GRAPHS]
        for node in nodes:
            node.target = BETWEEN_GRAPHS[node.target]
        if nodes:
            piece.module.recompile()
