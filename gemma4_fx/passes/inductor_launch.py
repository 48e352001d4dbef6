"""Inductor launches our kernels: each gemma4_fx op on CUDA is replaced by the Triton launches it makes.

Why: left as a custom op, each call is an extern call that goes through the dispatcher and Triton's Python launcher
on the host, tens of µs per kernel, more than the Inductor code the op replaced takes outside CUDA graphs.
Replaced by `triton_kernel_wrapper_functional` nodes, the kernels are compiled and launched by Inductor's generated
code like its own (and its wrapper can run them from C++ with `cpp_wrapper`).

How: the op's CUDA implementation (`launch.cuda_kernel`) is traced with make_fx over the node's fake inputs, its
launches recorded (`launch.tracing_launches`) and functionalised: a kernel's writes into the buffers the
implementation allocates become its outputs; Inductor's reinplacing, later in post-grad, makes them writes again.
The traced graph (allocations, views, launches) replaces the node. An output that its kernel may store over an input
(`launch.may_overwrite`) gets that input's buffer where a kernel made it and nothing reads it after the launch,
instead of the allocation the implementation made: Inductor's reinplacing then writes it there, as it reuses
buffers for its own kernels (an allocation costs host time per call outside CUDA graphs).

An op stays an extern call when its CUDA implementation launches no Triton kernel (the exact router prologue runs
eager's own ops), and, recorded in the report, when its launches cannot be traced, or when Inductor could not tell
which arguments a kernel writes (its analysis of the kernel's code failed: it would assume every argument written,
inputs included).
"""

from __future__ import annotations

import operator

import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from triton.runtime.autotuner import Autotuner

from ..fx_utils import value
from ..report import describe_error
from ..replacements.launch import CUDA_KERNELS, OVERWRITABLE, tracing_launches
from .context import PassContext

NAME = "inductor_launch"


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    nodes = [node for target in CUDA_KERNELS for node in graph.find_nodes(op="call_function", target=target)]
    order = {node: i for i, node in enumerate(graph.nodes)}
    inlined = []
    for node in sorted(nodes, key=order.__getitem__):
        if not _on_cuda(node):
            continue
        if not _read_by_getitem(node):
            ctx.skipped(NAME, node, "its outputs are read other than one by one (getitem)")
            continue
        implementation = CUDA_KERNELS[node.target]
        try:
            traced = _trace(implementation, node)
        except Exception as error:
            ctx.skipped(NAME, node, f"its kernel launches could not be traced ({describe_error(error)})")
            continue
        launches = traced.graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional)
        if not launches:
            continue
        reason = _unsafe(traced.graph)
        if reason:
            ctx.skipped(NAME, node, reason)
            continue
        inlined += _inline(graph, node, traced.graph)
    _store_over_dead_inputs(graph, inlined)


def _on_cuda(node: torch.fx.Node) -> bool:
    vals = [value(arg) for arg in node.all_input_nodes]
    return bool(vals) and all(isinstance(v, torch.Tensor) and v.is_cuda for v in vals)


def _read_by_getitem(node: torch.fx.Node) -> bool:
    """A single tensor, or outputs each read by a getitem: what `_inline` can rewire."""
    return isinstance(value(node), torch.Tensor) or all(
        user.op == "call_function" and user.target is operator.getitem for user in node.users)


def _trace(implementation, node: torch.fx.Node) -> torch.fx.GraphModule:
    """The functionalised graph of `implementation(*node.args, **node.kwargs)`, over the inputs' fake values."""
    inputs = node.all_input_nodes

    def call(*values):
        by_node = dict(zip(inputs, values))
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), by_node.__getitem__)
        return implementation(*args, **kwargs)

    values = [value(arg) for arg in inputs]
    with detect_fake_mode(values), tracing_launches():
        return make_fx(torch.func.functionalize(call, remove="mutations"), tracing_mode="real")(*values)


def _unsafe(graph: torch.fx.Graph) -> str | None:
    """Why the traced launches must not replace the op, or None."""
    if any(n.target is torch.ops.aten.copy_.default for n in graph.nodes):
        return ("Inductor could not tell which arguments a kernel writes (its analysis of the kernel failed), so it "
                "would copy into the op's inputs")
    for launch in graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional):
        written = [launch.kwargs["kwargs"][name] for name in launch.kwargs["tensors_to_clone"]]
        if len(set(written)) < len(written):
            return "a kernel writes one buffer through two arguments"
    return None


def _inline(graph: torch.fx.Graph, node: torch.fx.Node, traced: torch.fx.Graph) -> list[torch.fx.Node]:
    """Copy `traced` in place of `node`: its placeholders are the node's inputs, its outputs the node's. Returns
    the launches copied."""
    env = dict(zip(traced.find_nodes(op="placeholder"), node.all_input_nodes))
    with graph.inserting_before(node):
        for traced_node in traced.nodes:
            if traced_node.op == "output":
                result = torch.fx.node.map_arg(traced_node.args[0], env.__getitem__)
            elif traced_node.op != "placeholder":
                env[traced_node] = graph.node_copy(traced_node, env.__getitem__)
    if isinstance(result, torch.fx.Node):
        node.replace_all_uses_with(result)
    else:  # a list or tuple of tensors, read by getitem nodes (`_read_by_getitem`)
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)
    return [env[launch] for launch in traced.find_nodes(op="call_function", target=triton_kernel_wrapper_functional)]


_ALLOCATIONS = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                torch.ops.aten.new_empty.default)


def _store_over_dead_inputs(graph: torch.fx.Graph, launches: list[torch.fx.Node]) -> None:
    """Point each output of `launches` that its kernel may store over an input (`OVERWRITABLE`) at such an input
    that a kernel made (`_kernel_made`), that nothing reads after the launch and that has the output's layout, in
    place of the buffer the implementation allocated for it (then erased)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for launch in launches:
        kernel = kernel_side_table.get_kernel(launch.kwargs["kernel_idx"])
        overwritable = OVERWRITABLE.get(kernel.fn if isinstance(kernel, Autotuner) else kernel, {})
        args, written = dict(launch.kwargs["kwargs"]), launch.kwargs["tensors_to_clone"]
        for output in written:
            buffer = args[output]
            if not (isinstance(buffer, torch.fx.Node) and buffer.target in _ALLOCATIONS and len(buffer.users) == 1):
                continue
            for name in overwritable.get(output, ()):
                # Passed through other arguments as well, it was copied for each of them (seen on the GPU).
                candidate = args.get(name)
                if [arg is candidate for arg in args.values()].count(True) == 1 \
                        and _reusable(candidate, buffer, launch, order):
                    args[output] = candidate
                    launch.update_kwarg("kwargs", dict(args))
                    graph.erase_node(buffer)
                    break


def _reusable(candidate, buffer: torch.fx.Node, launch: torch.fx.Node, order: dict) -> bool:
    """`candidate` is a tensor a kernel made in the graph with the layout of its value (`_kernel_made`), which is
    `buffer`'s, and no node after `launch` reads it."""
    if not _kernel_made(candidate):
        return False
    made, wanted = value(candidate), value(buffer)
    if not (isinstance(made, torch.Tensor) and made.dtype == wanted.dtype and made.device == wanted.device
            and made.dim() == wanted.dim() and statically_known_true(made.storage_offset() == 0)
            and all(statically_known_true(a == b) for a, b in zip((*made.shape, *made.stride()),
                                                                 (*wanted.shape, *wanted.stride())))):
        return False
    readers, seen = list(candidate.users), set()
    while readers:
        reader = readers.pop()
        if reader is launch or reader in seen:
            continue
        seen.add(reader)
        if order.get(reader, len(order)) > order[launch]:
            return False
        if _aliases(reader):  # a view read later reads the candidate's memory
            readers += reader.users
    return True


def _kernel_made(node) -> bool:
    """The node is an output of a Triton launch or an mm: a buffer of its own (no graph input or view: nothing else
    sees its memory) that Inductor lays out as the node's value says and passes to a launch as it is.

    Why not any op's output: stored over the pointwise output that carries the residual, E2B's decode graphs at
    batch 8 and its prefill graphs failed in Inductor's scheduler (KeyError in `compute_ancestors`; H200, torch
    2.11) and fell back to plain Inductor. The likely cause, not reduced to a small case: Inductor lays out its own
    kernels' buffers itself, a launch's arguments must have the traced strides
    (`triton_kernel_default_layout_constraint`), and where they differ it copies a written argument and copies it
    back, a copy that can read and write one buffer (pytorch#189271)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return node.args[0].target is triton_kernel_wrapper_functional
    return node.target is torch.ops.aten.mm.default


def _aliases(node: torch.fx.Node) -> bool:
    """The node's result may share memory with one of its inputs (a view, an in-place op, `_unsafe_view`)."""
    target = node.target
    if target is operator.getitem:  # one output of a launch, or of an op that returns several (`split`: views)
        source = node.args[0]
        return source.target is not triton_kernel_wrapper_functional and _aliases(source)
    if target is torch.ops.aten._unsafe_view.default:
        return True
    schema = getattr(target, "_schema", None)
    return schema is None or any(ret.alias_info is not None for ret in schema.returns)
