"""The rotary table stored once: a cos or sin table that several nodes read is written to a buffer, not recomputed in
every reader's kernel.

    table = cos(freqs) [* scale] [.to(dtype)]      # or sin; RoPE's, read by every layer's q/k rotation

gets `prims.inductor_force_stride_order(table, its strides)` behind it, and the readers read that. The op computes
nothing (it is the table, in the table's layout); Inductor lowers it by storing the table in a buffer.

Why: Inductor stores a pointwise node that several kernels read only when the node reads many tensors or has many
ops (`should_realize_on_reuse`), not by what its ops cost. The table reads two small tensors, so in one graph every
layer's q/k norm + RoPE kernel computes sin and cos again for each element of q and k, which made that kernel
several times slower than where the table is an input (BENCHMARKS.md, rotary tables stored once).

Not Gemma-specific: any model whose layers share a cos or sin table gets it (Llama's and Qwen3's rotary tables
too). Values are unchanged; the cost is one buffer the size of the table. A sin or cos read by one node is not a
candidate: there is nothing to share.
"""

from __future__ import annotations

import torch

from ..fx_utils import value
from ..passes.context import PassContext
from ..report import node_location

NAME = "rotary_table"
aten = torch.ops.aten
_TRIGONOMETRY = (aten.cos.default, aten.sin.default)
# What may follow the cos or sin before the table is read: transformers scales it (attention_scaling) and casts it
# to the activations' dtype.
_FOLLOWERS = (aten.mul.Tensor, aten.mul.Scalar, torch.ops.prims.convert_element_type.default)


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    for node in [node for target in _TRIGONOMETRY for node in graph.find_nodes(op="call_function", target=target)]:
        table = _table(node)
        if len(table.users) < 2 or not isinstance(value(table), torch.Tensor):
            continue
        strides, last = _strides(graph, table)
        with graph.inserting_after(last):
            stored = graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (table, strides))
        stored.meta.update({key: table.meta[key] for key in ("val", "nn_module_stack", "stack_trace")
                            if key in table.meta})
        ours = {stored, *(stride for stride in strides if isinstance(stride, torch.fx.Node))}
        table.replace_all_uses_with(stored, delete_user_cb=lambda user: user not in ours)
        ctx.report.add_match(NAME, ctx.graph_name, node_location(table), [table.name])


def _strides(graph: torch.fx.Graph, table: torch.fx.Node) -> tuple[list, torch.fx.Node]:
    """(The table's strides, each an int or, where symbolic, a node that reads it, as graph arguments must; the
    last node added)."""
    strides, last = [], table
    for dim, stride in enumerate(value(table).stride()):
        if not isinstance(stride, int):
            with graph.inserting_after(last):
                last = graph.call_function(aten.sym_stride.int, (table, dim))
            last.meta["val"] = stride
            stride = last
        strides.append(stride)
    return strides, last


def _table(node: torch.fx.Node) -> torch.fx.Node:
    """The last node of `node`'s chain of scales and casts, each the only reader of the one before: what the
    layers read."""
    while len(node.users) == 1:
        (user,) = node.users
        if not (user.op == "call_function" and user.target in _FOLLOWERS and user.args[0] is node
                and all(_scalar(arg) for arg in user.args[1:])):
            break
        node = user
    return node


def _scalar(arg) -> bool:
    """A number, a dtype, or a tensor of one element: a scale or a cast's target, not a reader's other operand."""
    val = value(arg)
    return val.numel() == 1 if isinstance(val, torch.Tensor) else val is not None
