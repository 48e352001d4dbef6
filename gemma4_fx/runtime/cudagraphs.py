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

All graphs of a backend share one memory pool, and hold what they write there without keeping it allocated: a
tensor a capture made is freed at its last use in the split graph, and pieces captured after that reuse its memory
(BENCHMARKS.md has the pool of an E4B prefill at three lengths, against each graph keeping its outputs).
That is safe because graphs of one shape replay in the order they were captured, graphs of different shapes never
interleave within a call, and nothing the caller holds lives in the pool.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.symbolic_shapes import free_symbols

from ..fx_utils import method_name, writes_in_place
from ..report import Report, describe_error, record_fallback
from .split import SplitGraph, host_value_symbols


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


def shape_inputs(gm: torch.fx.GraphModule) -> list[tuple[int, bool]]:
    """(position, is_tensor) of the inputs that tell shapes apart: tensors with a symbolic size, and SymInts,
    except those that size nothing (`split.host_value_symbols`: no captured piece sees them)."""
    host_values = host_value_symbols(gm.graph)
    values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
    return [(index, isinstance(value, torch.Tensor)) for index, value in enumerate(values)
            if isinstance(value, torch.SymInt) and not free_symbols(value) <= host_values
            or isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)]


def _capture(fn, args: list, runtime: CUDAGraphRuntime):
    """Record `fn(*args)` into a CUDA graph in the runtime's pool; returns (replay, the outputs the graph writes).
    Capturing runs nothing: the caller replays once for the values."""
    graph = torch.cuda.CUDAGraph()
    with runtime.capturing(graph) as pool, torch.cuda.graph(graph, pool=pool):
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

    def __init__(self, fn, args, *, runtime: CUDAGraphRuntime, mutated: set[int], owned: set[int],
                 escaping: frozenset[int]):
        self._place_inputs(args, mutated, owned)
        self.replay_graph, outputs = _capture(fn, self.static_args, runtime)
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


class CapturedPiece:
    """Stands in the split graph for a compiled piece: runs it plainly, or captures and replays it, as the runner's
    current shape says."""

    def __init__(self, runner: GraphRunner, position: int, compiled, name: str, mutated: set[int],
                 escaping: frozenset[int], contiguous: frozenset[int]):
        self.runner, self.position, self.compiled, self.name = runner, position, compiled, name
        self.mutated, self.escaping, self.contiguous = mutated, escaping, contiguous - mutated
        self.failed = False

    def __call__(self, *args):
        args = self.restrided(args)
        shape = self.runner.active
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
            graph = PieceGraph(self.compiled, args, runtime=self.runner.runtime, mutated=self.mutated,
                               owned=shape.owned, escaping=self.escaping)
        except Exception as error:  # an op the graph cannot hold: this piece runs without graphs from now on
            self.failed = True
            self.runner.runtime.drop_pool()
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
    """Calls a split graph whose captured pieces are `CapturedPiece`s, keeping their graphs per input shape.

    Args:
        split: the split graph, its captured pieces already compiled.
        compiled: the compiled callable of each captured piece, in `split.captured` order.
        shape_inputs: (position, is_tensor) of the inputs whose values (ints) or shapes (tensors) tell shapes apart.
        runtime: the backend's `CUDAGraphRuntime` (pool, stats, cap).
        capture: False runs the pieces without graphs (CPU, or graphs switched off).
        report: the compiled graph's report, which names the pieces whose capture failed.
    """

    def __init__(self, split: SplitGraph, compiled: list, shape_inputs: list[tuple[int, bool]],
                 runtime: CUDAGraphRuntime, *, capture: bool, report: Report | None = None):
        self.module, self.capture, self.report = split.module, capture, report
        self.shape_inputs, self.runtime = shape_inputs, runtime
        self.shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        self.active: _Shape | None = None
        self.retired: list[PieceGraph] = []  # dropped during the current call (`restart`)
        for position, (piece, fn) in enumerate(zip(split.captured, compiled)):
            delattr(self.module, piece.name)  # a plain attribute now: the graph's code calls self.<name>(...)
            setattr(self.module, piece.name, CapturedPiece(self, position, fn, piece.name, mutated_inputs(piece.module),
                                                           piece.escaping, piece.contiguous))

    @property
    def stats(self) -> CUDAGraphStats:
        return self.runtime.stats

    def key(self, args) -> tuple:
        return tuple(tuple(args[i].shape) if is_tensor else args[i] for i, is_tensor in self.shape_inputs)

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
        key = self.key(args)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = _Shape()
            if len(self.shapes) > self.runtime.max_shapes:
                _, evicted = self.shapes.popitem(last=False)
                self.stats.graphs -= len(evicted.graphs)
                self.stats.evicted_shapes += 1
        else:
            self.shapes.move_to_end(key)
        shape.calls += 1
        self.active = shape
        try:
            return self.module.forward(*args)
        finally:
            self.active = None
            self.retired.clear()


class CUDAGraphRuntime:
    """What the graphs of one backend share: the memory pool, the cap on shapes per graph, the stats."""

    def __init__(self, max_shapes: int):
        self.max_shapes = max_shapes
        self.stats = CUDAGraphStats()
        self._pool = None
        self._graphs = weakref.WeakSet()  # the graphs captured into `_pool` that are still alive

    @contextlib.contextmanager
    def capturing(self, graph):
        """The pool to capture `graph` into. The allocator refuses a capture into a pool whose graphs are all gone
        while memory in it lives (an internal assert on the pool's use count): once none is alive (dropped,
        evicted, or collected with its compiled graph after `torch._dynamo.reset()`), a fresh pool. The live
        graphs are held through the capture, so a garbage collection as it begins cannot free the last of them."""
        alive = list(self._graphs)
        if not alive or self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        yield self._pool
        self._graphs.add(graph)

    def drop_pool(self) -> None:
        """Capture into a fresh pool from now on: a capture that failed may leave its pool marked as recording, and
        the allocator then refuses every later capture into it."""
        self._pool = None

    def pool_bytes(self) -> int:
        """Bytes of device memory the shared pool holds (reads the allocator's snapshot: not for hot paths)."""
        if self._pool is None:
            return 0
        pool = tuple(self._pool)
        return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
                   if tuple(segment.get("segment_pool_id", ())) == pool)
