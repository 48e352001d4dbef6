"""Attention of many query rows: SDPA in a prefill becomes `gemma4_fx::prefill_attention`.

Matched on Dynamo's graph, as `decode_attention` is (and through its `rewrite_sdpa`), where attention is still one
`scaled_dot_product_attention` call:

    k = repeat_kv(k_cache, n)    # or k itself (enable_gqa)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)  # q: [B, H, M, D]

becomes `prefill_attention(q, k_cache, v_cache, mask, scale, causal)` (replacements/prefill_attention.py), which
walks only the key blocks the mask or causality leaves visible: transformers materialises its sliding-window masks,
so SDPA computes every score of a 4096-token prompt for a window of 1024, and Gemma-4's global layers (head dim 512)
get SDPA's memory-efficient kernel. The repeat of the cache is looked through, as in decode. Each mask is made ready
for the kernel (rows aligned, the keys each block of rows sees) once, before its first attention:

    ready, ranges = prefill_attention_mask(mask)                       # one per mask node
    out = prefill_attention(q, k_cache, v_cache, ready, scale, causal, ranges)

a prompt's sliding layers read one mask, and its global layers another: made ready per call instead, each layer
would read its mask twice and, between CUDA graphs, launch two kernels more from the host. A bool mask of the SDPA
calls left alone is made ready for SDPA the same way, once:

    additive = sdpa_additive_mask(mask, q.dtype)                       # 0 where True, -inf where False
    out = scaled_dot_product_attention(q, k, v, attn_mask=additive, ...)

which is the conversion SDPA itself runs at every call (two kernels and their host work per layer, between CUDA
graphs: 26B-A4B's vision encoder's 27 layers share one padding mask), so each call computes what it did. One
exception: a query row that sees no key gets zeros, SDPA's rule on every backend, where torch 2.11's cuDNN kernel
converts a bool mask with a finite fill and so attends to every key of such a row (pytorch#177842). Gemma-4's masks
leave such rows only at padding (a left-padded batch), whose outputs no other row reads.

Left alone (with the reason): one query row (`decode_attention`'s), dropout, a mask with `is_causal`, a mask that is
not a bool [B or 1, 1, M or 1, N], symbolic heads or head dim, shapes the kernels do not take (`check_inputs`), and
a mask built in the graph without ordering a query position against a key position (`key <= query`, `key > query -
window`) where the head dim is not a power of two: such a mask (bidirectional, padding: the vision encoders') hides
no block of keys as a rule, and the kernel would pad the head dim (26B-A4B's and 31B's vision encoders: 72 to 128)
where SDPA's flash kernels take it as is. At E2B's and E4B's head dim 64 the kernel takes their vision encoder's
padding mask, faster than SDPA over the same keys (BENCHMARKS.md). A mask made from a bool mask the graph gets as
an input is taken.
"""

from __future__ import annotations

import contextlib
import operator

import torch

from ..fx_utils import SDPA, op_name, value, viewed, written_in_place
from ..replacements import prefill_attention as ops
from ..report import Report
from .decode_attention import rewrite_sdpa

NAME = "prefill_attention"
_ORDERINGS = ("le", "lt", "ge", "gt")


def _dense_mask_reason(mask: torch.fx.Node, q: torch.Tensor) -> str | None:
    """Why a mask made in the graph is left to SDPA: none of the ops it is made of orders one tensor against
    another (transformers' causal and sliding-window masks compare key and query positions), it comes from no bool
    mask the graph gets as an input (an engine's, whose structure the graph does not show), and the head dim is not
    a power of two, which the kernel pads to one. Such a mask hides no block of keys as a rule; at a power of two the
    kernel is still faster than SDPA over the same keys (the vision encoder's, head dim 64), padded it does up to
    twice the work."""
    seen, stack = set(), [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if op_name(node) in _ORDERINGS and sum(isinstance(arg, torch.fx.Node) for arg in node.args[:2]) == 2:
            return None
        if node.op == "placeholder" and getattr(value(node), "dtype", None) == torch.bool:
            return None
        stack.extend(node.all_input_nodes)
    dim = q.shape[-1]
    if dim & (dim - 1) == 0:
        return None
    return (f"a mask with no key/query ordering (bidirectional or padding): no key block to skip, and head dim {dim} "
            f"would pad to {1 << dim.bit_length()}; SDPA takes it as is (its mask made additive once)")


def apply(gm: torch.fx.GraphModule, example_inputs=None, *, report: Report | None = None,
          graph_name: str = "graph") -> torch.fx.GraphModule:
    """Rewrite every SDPA of more than one query row the kernels take, in place; matches and reasons to `report`."""
    rewrite_sdpa(gm, NAME, torch.ops.gemma4_fx.prefill_attention.default, ops.check_inputs,
                 takes=lambda rows: not isinstance(rows, int) or rows > 1, causal_ok=True, report=report,
                 graph_name=graph_name, mask_reason=_dense_mask_reason)
    _ready_masks_once(gm.graph)
    gm.recompile()
    return gm


def _ready_masks_once(graph: torch.fx.Graph) -> None:
    """Each mask made ready once, before the first attention over it, for the attention that reads it: ours
    (`prefill_attention_mask`), or SDPA's (a bool mask made additive, per query dtype); every attention over the
    mask reads what was made. A mask written in place (or a tensor it views) is left to each attention: made once,
    the later ones would miss the write."""
    written = written_in_place(graph.nodes)
    ours: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.find_nodes(op="call_function", target=torch.ops.gemma4_fx.prefill_attention.default):
        if isinstance(node.args[3], torch.fx.Node):
            ours.setdefault(node.args[3], []).append(node)
    sdpa: dict[tuple[torch.fx.Node, torch.dtype], list[torch.fx.Node]] = {}
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA]:
        mask, query = (node.kwargs.get(name, node.args[i] if len(node.args) > i else None)
                       for i, name in ((3, "attn_mask"), (0, "query")))
        if isinstance(mask, torch.fx.Node) and getattr(value(mask), "dtype", None) == torch.bool \
                and isinstance(value(query), torch.Tensor) and value(query).is_floating_point():
            sdpa.setdefault((mask, value(query).dtype), []).append(node)
    for mask, attentions in ours.items():
        if not any(node in written for node in viewed(mask)):
            made = _made_once(graph, attentions[0], torch.ops.gemma4_fx.prefill_attention_mask.default, mask)
            ready, ranges = (_made_once(graph, attentions[0], operator.getitem, made, index) for index in range(2))
            for attention in attentions:
                attention.args = (*attention.args[:3], ready, *attention.args[4:6], ranges)
    for (mask, dtype), attentions in sdpa.items():
        if not any(node in written for node in viewed(mask)):
            additive = _made_once(graph, attentions[0], ops.sdpa_additive_mask, mask, dtype)
            for attention in attentions:
                if "attn_mask" in attention.kwargs:
                    attention.kwargs = {**attention.kwargs, "attn_mask": additive}
                else:
                    attention.args = (*attention.args[:3], additive, *attention.args[4:])


def _made_once(graph: torch.fx.Graph, before: torch.fx.Node, fn, source: torch.fx.Node, *args) -> torch.fx.Node:
    """`fn(source, *args)` as a node before `before`, from `source`'s module, with an example value where `source`
    has one, as Dynamo's nodes carry them (the runtime's split reads them)."""
    with graph.inserting_before(before):
        made = graph.call_function(fn, (source, *args))
    made.meta.update({key: source.meta[key] for key in ("stack_trace", "nn_module_stack") if key in source.meta})
    example = value(source)
    if example is not None:
        with getattr(example, "fake_mode", None) or contextlib.nullcontext():  # a tuple made before has none
            made.meta["example_value"] = fn(example, *args)
    return made
