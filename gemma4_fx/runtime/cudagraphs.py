"""CUDA graphs for the pieces of a split graph, one set per input shape.

A `GraphRunner` runs the split graph. Each distinct shape of its inputs (the sizes Dynamo left symbolic) runs once
plainly (warm-up: Triton autotuning, cuBLAS handles, lazy allocations), is captured on its second call (each captured
piece as it is reached, so graphs are captured in the order they replay), and is replayed after that. The shapes a
runner keeps are capped; the least recently used is dropped with all its graphs.

A captured piece reads its inputs from fixed addresses. Per input of a piece:
- parameters are used where they are (their storage is assumed to stay, as Inductor's CUDA graphs assume);
- inputs the piece mutates (static KV caches), tensors marked with a static address, outputs of earlier captured
  pieces, and broadcast views are used where they are, so the graph writes the real cache; if one moves, the
  shape's graphs are dropped and captured again on its next call, rather than written into memory the caller may
  still hold;
- other tensors are copied into buffers owned by the graph, only when their address differs from that buffer's;
- CPU tensors are read on the host when the graph is captured, and the graph keeps what it read: if one's value
  changes, the shape's graphs are captured again. (Float attributes, which Dynamo passes as 0-d CPU tensors under
  `dynamic=True`, are baked in before: see `split.bake_float_inputs`.)
Outputs that reach the caller are copied out of the graph's memory after each replay, so no later replay changes a
tensor the caller holds; outputs that are views of an input are returned as views of the caller's tensor.

A piece's shape is that of the graph inputs whose sizes size it: the pieces that read the same inputs form a domain,
with its own shapes. A multimodal prefill's vision encoder is sized by its images alone, so its graphs replay for
every prompt with that many images, whatever the prompt's length; the language model's are keyed on the prompt.

Graphs hold what they write in a memory pool without keeping it allocated: a tensor a capture made is freed at its
last use in the split graph, and pieces captured after that reuse its memory (BENCHMARKS.md has the pool of an E4B
prefill at three lengths, against each graph keeping its outputs). That is safe because within a domain graphs of
one shape replay in the order they were captured, graphs of different shapes never interleave within a call, and
nothing the caller holds lives in the pool. Domains of one graph interleave, so each has a pool of its own (the k-th
domain of every compiled graph shares the k-th pool: compiled graphs never interleave), and a piece reads another
domain's outputs from buffers of its own, as it reads the caller's tensors.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import free_symbols

from ..fx_utils import method_name, writes_in_place
from ..report import Report, describe_error, record_fallback
from .split import SplitGraph, host_value_symbols

log = logging.getLogger("gemma4_fx")


_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow", "select",
                 "as_strided", "t", "flatten", "unflatten", "view_as", "__getitem__", "diagonal", "unfold"}


@dataclass
class CUDAGraphStats:
    """What the CUDA graph runtime holds and did, for one backend."""

    graphs: int = 0  # graphs alive now
    captures: int = 0
    replays: int = 0
    evicted_shapes: int = 0
    failures: list[str] = field(default_factory=list)  # pieces that could not be captured, and why
    pool_bytes: int = 0  # bytes the shared pool holds on the device (when read)

    def __str__(self) -> str:
        lines = [f"CUDA graphs: {self.graphs} alive, {self.captures} captured, {self.replays} replays, "
                 f"{self.evicted_shapes} shapes evicted, pool {self.pool_bytes / 2**20:.1f} MiB"]
        return "\n".join(lines + [f"  not captured: {failure}" for failure in self.failures])


def mutated_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Positions of the placeholders that `gm` writes in place (directly or through a view)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    base = {node: index for index, node in enumerate(placeholders)}
    mutated = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_method", "call_function") or not node.args:
            continue
        source = node.args[0]
        if source not in base:
            continue
        name = method_name(node)
        if writes_in_place(node):
            mutated.add(base[source])
        elif name in _VIEW_METHODS or node.target is operator.getitem:
            base[node] = base[source]
    return mutated


class ShapeInput(NamedTuple):
    """An input of the whole graph that tells shapes apart, and the symbols its size (or value) is made of."""

    position: int
    is_tensor: bool
    symbols: frozenset


def shape_inputs(gm: torch.fx.GraphModule) -> list[ShapeInput]:
    """The inputs that tell shapes apart: tensors with a symbolic size, and SymInts, except those that size nothing
    (`split.host_value_symbols`: no captured piece sees them)."""
    host_values = host_value_symbols(gm.graph)
    values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
    return [ShapeInput(index, isinstance(value, torch.Tensor), frozenset(free_symbols(value)))
            for index, value in enumerate(values)
            if isinstance(value, torch.SymInt) and not free_symbols(value) <= host_values
            or isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)]


def sized_by(piece: torch.fx.GraphModule, inputs: list[ShapeInput]) -> tuple[ShapeInput, ...]:
    """The shape inputs whose symbols size `piece`'s inputs: its graphs' key. All of them if its symbols are not
    all theirs (a symbol only a stride carries, say) or an input's value is unknown: a key must never miss a size."""
    symbols = set()
    for node in piece.graph.find_nodes(op="placeholder"):
        if "example_value" not in node.meta:
            return tuple(inputs)
        value = node.meta["example_value"]
        if isinstance(value, (torch.Tensor, torch.SymInt)):
            symbols |= free_symbols(value)
    chosen = tuple(shape_input for shape_input in inputs if shape_input.symbols & symbols)
    if not symbols <= set().union(*(shape_input.symbols for shape_input in chosen)):
        return tuple(inputs)
    return chosen


def _capture(fn, args: list, pool: GraphPool):
    """Record `fn(*args)` into a CUDA graph in `pool`; returns (replay, the outputs the graph writes).
    Capturing runs nothing: the caller replays once for the values. A piece of views alone launches nothing, and
    torch's warning about its empty graph ("captured on wrong device or stream?") would only alarm the user."""
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The CUDA Graph is empty", category=UserWarning)
        with pool.capturing(graph) as handle, torch.cuda.graph(graph, pool=handle):
            outputs = fn(*args)
    return graph.replay, outputs


def _written(tensor: torch.Tensor) -> torch.Tensor:
    """The elements a broadcast view (stride 0, as `expand` makes) stands for, each once: what a copy must write."""
    for dim in reversed(range(tensor.ndim)):
        if tensor.stride(dim) == 0:
            tensor = tensor.select(dim, 0)
    return tensor


def _unowned(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over `tensor`'s memory that does not keep it allocated (as Inductor's CUDA graph trees hold their
    outputs): the pool may hand that memory to graphs captured after the tensor's last use."""
    storage = tensor.untyped_storage()
    memory = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), tensor.device, storage.nbytes())
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(memory, tensor.storage_offset(),
                                                                          tensor.shape, tensor.stride())


class PieceGraph:
    """One captured piece at one shape: its graph, the inputs it reads and the outputs it writes.

    It holds its outputs, and the earlier pieces' outputs it reads, without keeping their memory: on the capture
    call the caller gets the tensors the capture allocated, so their memory returns to the pool at their last use
    in the split graph and the pieces captured after that reuse it. A shape's pool memory is then its peak of live
    tensors, and shapes share it, rather than every piece's outputs of every shape kept apart. Replays run in
    capture order, so each graph finds in that memory what it found when it was captured."""

    def __init__(self, fn, args, *, pool: GraphPool, mutated: set[int], owned: set[int], escaping: frozenset[int]):
        self._place_inputs(args, mutated, owned)
        self.replay_graph, outputs = _capture(fn, self.static_args, pool)
        self.sequence = type(outputs) if isinstance(outputs, (list, tuple)) else None
        self.captured_outputs = list(outputs) if self.sequence else [outputs]  # handed over by the first replay
        self._hold_outputs(escaping)
        # inputs read where they are need only their address
        self.static_args = [None if index in self.in_place else arg for index, arg in enumerate(self.static_args)]

    def _place_inputs(self, args, mutated: set[int], owned: set[int]) -> None:
        """Decide where the graph reads each input: CPU tensors as values read at capture (`host`); written, owned
        or static tensors where they are (`in_place`, by address); the rest from buffers of the graph's own that
        each replay fills (`copied`). Parameters stay where they are."""
        self.static_args = list(args)
        self.in_place, self.copied, self.host = {}, [], []
        on_device = any(isinstance(arg, torch.Tensor) and arg.is_cuda for arg in args)
        for index, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor) or isinstance(arg, torch.nn.Parameter):
                continue
            if on_device and arg.device.type == "cpu":  # read on the host: the value it was captured with
                self.static_args[index] = arg.clone()
                self.host.append(index)
            elif index in mutated or arg.data_ptr() in owned or torch._dynamo.utils.get_static_address_type(arg) \
                    or torch._debug_has_internal_overlap(_written(arg)) == 1:
                self.in_place[index] = arg.data_ptr()
            else:  # same strides as the input: the compiled piece may assume them
                static = torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype, device=arg.device)
                _written(static).copy_(_written(arg))
                self.static_args[index] = static
                self.copied.append(index)

    def _hold_outputs(self, escaping: frozenset[int]) -> None:
        """Outputs that are views of an input are rebuilt on the caller's tensor at each replay (`views`); the
        others are held unowned (`outputs`), and those that reach the caller are cloned after each replay."""
        storages = {arg.untyped_storage().data_ptr(): index for index, arg in enumerate(self.static_args)
                    if isinstance(arg, torch.Tensor)}
        self.views, self.escaping, self.outputs = {}, [], list(self.captured_outputs)
        for position, out in enumerate(self.captured_outputs):
            if not isinstance(out, torch.Tensor):
                continue
            source = storages.get(out.untyped_storage().data_ptr())
            if source is not None:
                offset = out.storage_offset() - self.static_args[source].storage_offset()
                self.views[position], self.outputs[position] = (source, out.shape, out.stride(), offset), None
                continue
            if position in escaping:
                self.escaping.append(position)
            self.outputs[position] = _unowned(out)
        self.owned = {out.data_ptr() for out in self.outputs if isinstance(out, torch.Tensor)}

    def stale(self, args) -> bool:
        """An input used in place (cache, earlier piece's output) is not where the graph reads it, or a CPU input
        is not the value it was captured with: capture again."""
        return any(args[index].data_ptr() != address for index, address in self.in_place.items()) \
            or any(not torch.equal(args[index], self.static_args[index]) for index in self.host)

    def replay(self, args):
        for index in self.copied:
            if args[index].data_ptr() != self.static_args[index].data_ptr():
                _written(self.static_args[index]).copy_(_written(args[index]))
        self.replay_graph()
        outputs, self.captured_outputs = list(self.captured_outputs or self.outputs), None
        for position in self.escaping:
            outputs[position] = outputs[position].clone()
        for position, (source, shape, stride, offset) in self.views.items():
            outputs[position] = args[source].as_strided(shape, stride, args[source].storage_offset() + offset)
        return self.sequence(outputs) if self.sequence else outputs[0]


@dataclass
class _Shape:
    calls: int = 0
    graphs: dict[int, PieceGraph] = field(default_factory=dict)  # by captured piece's position
    owned: set[int] = field(default_factory=set)  # addresses of the outputs its graphs write


class _Domain:
    """The captured pieces of a split graph that one set of shape inputs sizes: their shapes (least recently used
    last) and the pool their graphs are captured into."""

    def __init__(self, inputs: tuple[ShapeInput, ...], pool: GraphPool):
        self.inputs, self.pool = inputs, pool
        self.shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        self.active: _Shape | None = None
        self.evicted = False  # warned of evictions

    def enter(self, args, stats: CUDAGraphStats, max_shapes: int) -> None:
        """Make the shape of `args` the active one, and count the call."""
        key = tuple(tuple(args[i].shape) if is_tensor else args[i] for i, is_tensor, _ in self.inputs)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = _Shape()
            if len(self.shapes) > max_shapes:
                _, evicted = self.shapes.popitem(last=False)
                stats.graphs -= len(evicted.graphs)
                stats.evicted_shapes += 1
                if not self.evicted:
                    self.evicted = True
                    sizes = sorted({str(symbol) for shape_input in self.inputs for symbol in shape_input.symbols})
                    log.warning("gemma4_fx CUDA graphs: pieces sized by %s met more than max_captured_shapes=%d "
                                "shapes; the least recently used shape's graphs are dropped, and a shape that comes "
                                "back runs without graphs until it is captured again. Pad such inputs to buckets, "
                                "or raise max_captured_shapes.", ", ".join(sizes), max_shapes)
        else:
            self.shapes.move_to_end(key)
        shape.calls += 1
        self.active = shape


class CapturedPiece:
    """Stands in the split graph for a compiled piece: runs it plainly, or captures and replays it, as its domain's
    active shape says."""

    def __init__(self, runner: GraphRunner, domain: _Domain, position: int, compiled, name: str, mutated: set[int],
                 escaping: frozenset[int], contiguous: frozenset[int]):
        self.runner, self.domain, self.position, self.compiled, self.name = runner, domain, position, compiled, name
        self.mutated, self.escaping, self.contiguous = mutated, escaping, contiguous - mutated
        self.failed = False

    def __call__(self, *args):
        args = self.restrided(args)
        shape = self.domain.active
        if shape is None or shape.calls < 2 or self.failed:
            return self.compiled(*args)
        graph = shape.graphs.get(self.position)
        if graph is not None and graph.stale(args):
            self.runner.restart(shape)
            return self.compiled(*args)
        if graph is None:
            if shape.calls > 2:  # the capture call raised before this piece: capture them all again, in order
                self.runner.restart(shape)
                return self.compiled(*args)
            graph = self._capture(shape, args)
            if graph is None:
                return self.compiled(*args)
        self.runner.stats.replays += 1
        return graph.replay(args)

    def restrided(self, args) -> tuple:
        """`args` with the inputs compiled as contiguous made so: the runs between pieces are eager, and an eager
        kernel may lay out its output otherwise than the fake one the piece was compiled for (a cache's keys as a
        transposed view). Inputs the piece writes stay as they are."""
        late = [index for index in self.contiguous if not args[index].is_contiguous()]
        if not late:
            return args
        args = list(args)
        for index in late:
            args[index] = args[index].contiguous()
        return tuple(args)

    def _capture(self, shape: _Shape, args) -> PieceGraph | None:
        stats = self.runner.stats
        try:
            graph = PieceGraph(self.compiled, args, pool=self.domain.pool, mutated=self.mutated, owned=shape.owned,
                               escaping=self.escaping)
        except Exception as error:  # an op the graph cannot hold: this piece runs without graphs from now on
            self.failed = True
            self.domain.pool.drop()
            message = f"{self.name}: CUDA graph capture failed ({describe_error(error)}); it runs without graphs"
            record_fallback(stats.failures, message)
            if self.runner.report is not None:
                self.runner.report.uncaptured.append(message)
            return None
        stats.graphs += 1
        stats.captures += 1
        shape.graphs[self.position] = graph
        shape.owned |= graph.owned
        return graph


class GraphRunner:
    """Calls a split graph whose captured pieces are `CapturedPiece`s, keeping their graphs per shape of their
    domain.

    Args:
        split: the split graph, its captured pieces already compiled.
        compiled: the compiled callable of each captured piece, in `split.captured` order.
        shape_inputs: the whole graph's inputs that tell shapes apart (`shape_inputs`).
        runtime: the backend's `CUDAGraphRuntime` (pools, stats, cap).
        capture: False runs the pieces without graphs (CPU, or graphs switched off).
        report: the compiled graph's report, which names the pieces whose capture failed.
    """

    def __init__(self, split: SplitGraph, compiled: list, shape_inputs: list[ShapeInput], runtime: CUDAGraphRuntime,
                 *, capture: bool, report: Report | None = None):
        self.module, self.capture, self.report, self.runtime = split.module, capture, report, runtime
        self.domains: dict[tuple[ShapeInput, ...], _Domain] = {}  # in the order their first pieces run
        self.retired: list[PieceGraph] = []  # dropped during the current call (`restart`)
        for position, (piece, fn) in enumerate(zip(split.captured, compiled)):
            inputs = sized_by(piece.module, shape_inputs)
            if inputs not in self.domains:
                self.domains[inputs] = _Domain(inputs, runtime.pool(len(self.domains)))
            delattr(self.module, piece.name)  # a plain attribute now: the graph's code calls self.<name>(...)
            setattr(self.module, piece.name, CapturedPiece(self, self.domains[inputs], position, fn, piece.name,
                                                           mutated_inputs(piece.module), piece.escaping,
                                                           piece.contiguous))

    @property
    def stats(self) -> CUDAGraphStats:
        return self.runtime.stats

    def restart(self, shape: _Shape) -> None:
        """Drop a shape's graphs (an input used in place moved, a CPU input changed) and run it plainly until its
        next call captures them again, in order: a graph captured after later ones could put its outputs where they
        keep their scratch. The graphs live until the call ends: the outputs their replays gave this call are in
        their pool, which must not be freed under them."""
        self.stats.graphs -= len(shape.graphs)
        self.retired += shape.graphs.values()
        shape.graphs.clear()
        shape.owned.clear()
        shape.calls = 1

    def __call__(self, *args):
        if not self.capture:
            return self.module.forward(*args)
        for domain in self.domains.values():
            domain.enter(args, self.stats, self.runtime.max_shapes)
        try:
            return self.module.forward(*args)
        finally:
            for domain in self.domains.values():
                domain.active = None
            self.retired.clear()


class GraphPool:
    """A memory pool that CUDA graphs are captured into, and the graphs captured into it that are still alive."""

    def __init__(self):
        self.handle = None
        self._graphs = weakref.WeakSet()

    @contextlib.contextmanager
    def capturing(self, graph):
        """The pool's handle to capture `graph` into. The allocator refuses a capture into a pool whose graphs are
        all gone while memory in it lives (an internal assert on the pool's use count): once none is alive
        (dropped, evicted, or collected with its compiled graph after `torch._dynamo.reset()`), a fresh pool. The
        live graphs are held through the capture, so a garbage collection as it begins cannot free the last of
        them."""
        alive = list(self._graphs)
        if not alive or self.handle is None:
            self.handle = torch.cuda.graph_pool_handle()
        yield self.handle
        self._graphs.add(graph)

    def drop(self) -> None:
        """Capture into a fresh pool from now on: a capture that failed may leave its pool marked as recording, and
        the allocator then refuses every later capture into it."""
        self.handle = None

    def bytes(self, snapshot) -> int:
        """Bytes of device memory the pool holds, from the allocator's `snapshot`."""
        if self.handle is None:
            return 0
        handle = tuple(self.handle)
        return sum(segment["total_size"] for segment in snapshot if tuple(segment.get("segment_pool_id", ())) == handle)


class CUDAGraphRuntime:
    """What the graphs of one backend share: the pools (one per domain position, see the module docstring), the cap
    on shapes per domain, the stats."""

    def __init__(self, max_shapes: int):
        self.max_shapes = max_shapes
        self.stats = CUDAGraphStats()
        self.pools: list[GraphPool] = []

    def pool(self, index: int) -> GraphPool:
        """The pool of every compiled graph's `index`-th domain."""
        while len(self.pools) <= index:
            self.pools.append(GraphPool())
        return self.pools[index]

    def pool_bytes(self) -> int:
        """Bytes of device memory the pools hold (reads the allocator's snapshot: not for hot paths)."""
        if not any(pool.handle is not None for pool in self.pools):
            return 0
        snapshot = torch.cuda.memory_snapshot()
        return sum(pool.bytes(snapshot) for pool in self.pools)
