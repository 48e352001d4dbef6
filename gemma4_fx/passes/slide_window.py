"""A full sliding-window cache's update at decode, in place: roll, write, copy back becomes `gemma4_fx::slide_window`.

Matched on Dynamo's graph, where transformers' `StaticSlidingWindowLayer.update` (5.x), once the window is full and
one token comes per sequence, is still its three steps:

    rolled = cache.roll(-1, dims=-2)              # the window one row toward the start, in a new tensor
    rolled[:, :, torch.tensor([-1])] = new        # the new token in the last row
    cache.copy_(rolled)                           # copied back, so the cache keeps its address

becomes `slide_window(cache, new)` where the copy back was (replacements/slide_window.py): the rows move in place,
one read and one write of the window instead of two of each. Later reads of the cache (attention) read it as before.

Left alone (with the reason): a cache read between the roll and the copy back (it would see the update early), a new
row whose shape, dtype or layout the kernel does not take, a symbolic window or head dim, and on CUDA a window below
MIN_WINDOW_BYTES at a static batch (there the roll and copy, two launches, cost what the edge copy and the kernel do).
A roll that is not followed by exactly this write and copy back is not a candidate.
"""

from __future__ import annotations

import operator

import torch

from ..fx_utils import ALIASING, needs_grad, node_calls, same, value
from ..replacements import slide_window as ops
from ..report import Report, node_location

NAME = "slide_window"
# On an H200, 26B-A4B's sliding windows (8 heads x 1024 x 256, bf16): 4 MiB each at bs 1, no faster in place; 64 MiB
# at bs 16, 1.09x faster on the whole decode step (BENCHMARKS.md).
MIN_WINDOW_BYTES = 16 << 20


def _argument(node: torch.fx.Node, position: int, name: str, default=None):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _one(x):
    """The int in -1, (-1,) or [-1]; None for anything else."""
    if isinstance(x, (tuple, list)) and len(x) == 1:
        x = x[0]
    return x if isinstance(x, int) else None


def _last_row(index, rows: int) -> bool:
    """`index` picks the last of `rows` along the keys: transformers' `torch.tensor([-1])`, or a slice from it."""
    if isinstance(index, slice):
        return index.start in (-1, rows - 1) and index.stop is None and index.step in (None, 1)
    return (node_calls(index, ("tensor",)) and index.args and isinstance(index.args[0], (list, tuple))
            and _one(index.args[0]) in (-1, rows - 1))


def _match(roll: torch.fx.Node):
    """(cache, write, copy, new) where `roll` is the first step of the update above, else None."""
    cache = roll.args[0] if roll.args else None
    cache_value = value(cache)
    if not (isinstance(cache, torch.fx.Node) and isinstance(cache_value, torch.Tensor) and cache_value.dim() == 4):
        return None
    if _one(_argument(roll, 1, "shifts")) != -1 or _one(_argument(roll, 2, "dims")) not in (-2, 2):
        return None
    writes = [u for u in roll.users if u.op == "call_function" and u.target is operator.setitem]
    copies = [u for u in roll.users if node_calls(u, ("copy_",)) and u.args[0] is cache and u.args[1] is roll]
    if len(writes) != 1 or len(copies) != 1 or len(roll.users) != 2:
        return None
    write, copy = writes[0], copies[0]
    index = write.args[1]
    if not (isinstance(index, tuple) and len(index) == 3 and index[:2] == (slice(None),) * 2
            and _last_row(index[2], cache_value.shape[2])):
        return None
    return cache, write, copy, write.args[2]


def _aliases(node: torch.fx.Node) -> set:
    """`node` and every view of it in the graph (what reads the same memory)."""
    found, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in found and node_calls(user, ALIASING):
                found.add(user)
                todo.append(user)
    return found


def _unsupported(roll, cache, copy, new) -> str | None:
    cache_value, new_value = value(cache), value(new)
    if not all(isinstance(size, int) for size in cache_value.shape[2:]):
        return "a symbolic window or head dim"
    batch, heads, _, dim = cache_value.shape
    if not (isinstance(new_value, torch.Tensor) and new_value.dim() == 4
            and all(same(a, b) for a, b in zip(new_value.shape, (batch, heads, 1, dim)))):
        shape = tuple(new_value.shape) if isinstance(new_value, torch.Tensor) else new_value
        return f"a new row of shape {shape} for a cache of {tuple(cache_value.shape)} (broadcast)"
    if needs_grad(cache, new):
        return "a backward may follow (the new row requires grad): the kernel has none"
    try:
        ops.check_inputs(cache_value, new_value)
    except ValueError as error:
        return str(error)
    size = batch * heads * cache_value.shape[2] * dim * cache_value.element_size()
    if cache_value.device.type == "cuda" and isinstance(batch, int) and size < MIN_WINDOW_BYTES:
        return (f"a window of {size / 2**20:.1f} MiB: below {MIN_WINDOW_BYTES >> 20} MiB the roll and copy back cost "
                f"what the update in place does (BENCHMARKS.md)")
    aliases, node = _aliases(cache), roll.next
    while node is not copy:
        if aliases.intersection(node.all_input_nodes):
            return "the cache is read between the roll and the copy back"
        node = node.next
    return None


def apply(gm: torch.fx.GraphModule, example_inputs=None, *, report: Report | None = None,
          graph_name: str = "graph") -> torch.fx.GraphModule:
    """Rewrite every full sliding-window update the kernel takes, in place; matches and reasons go to `report`."""
    graph = gm.graph
    for roll in [n for n in graph.nodes if node_calls(n, ("roll",))]:
        match = _match(roll)
        if match is None:
            continue
        cache, write, copy, new = match
        reason = _unsupported(roll, cache, copy, new)
        if reason is not None:
            if report is not None:
                report.add_skip(NAME, graph_name, node_location(roll), reason, [roll.name])
            continue
        with graph.inserting_before(copy):
            fused = graph.call_function(torch.ops.gemma4_fx.slide_window.default, (cache, new))
        fused.meta.update({k: v for k, v in copy.meta.items() if k != "example_value"})
        copy.replace_all_uses_with(cache)
        index = write.args[1][2]
        for node in (copy, write, roll):
            graph.erase_node(node)
        if isinstance(index, torch.fx.Node) and not index.users:
            graph.erase_node(index)
        if report is not None:
            report.add_match(NAME, graph_name, node_location(fused), [roll.name, write.name, copy.name])
    gm.recompile()
    return gm
