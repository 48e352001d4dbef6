"""Attention of one query token over a cache: SDPA with q of one row becomes `gemma4_fx::decode_attention`.

Matched on Dynamo's graph (as YOCO is), where attention is still one `scaled_dot_product_attention` call:

    k = repeat_kv(k_cache, n)    # k_cache[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D), or k itself
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)   # q: [B, H, 1, D], mask bool or None

becomes `decode_attention(q, k_cache, v_cache, mask, scale)` (replacements/decode_attention.py): the cache read
once per kv head, split along the keys over the GPU, where SDPA's kernels for many query rows take a few programs
(E2B's global layers: 112 us a call on an H200). The repeat is looked through, so the cache is not copied per query
head either. It runs after YOCO, which leaves KV-shared layers one query row in a prefill that keeps one.

Left alone (with the reason): dropout, `is_causal`, a mask that is not a bool [B or 1, 1, 1, S] (None is taken: every
key visible, as transformers leaves a full-attention layer over a dynamic cache), symbolic heads or
head dim, shapes the kernels do not take (`check_inputs`). A symbolic batch or cache length is taken: the launch
sizes its grid from the tensors it gets (Dynamo makes the batch symbolic at a decode step's second batch size).
"""

from __future__ import annotations

import torch

from ..fx_utils import SDPA, needs_grad, node_calls, value
from ..replacements import decode_attention as ops
from ..report import Report, node_location

NAME = "decode_attention"
_RESHAPES = ("reshape", "view")


def _cache(kv: torch.fx.Node) -> torch.fx.Node:
    """The [B, Hkv, S, D] tensor that HF's `repeat_kv` expanded into `kv` ([B, Hkv * n, S, D], each kv head
    repeated n times in a row, as the kernels read it), or `kv` itself."""
    if not node_calls(kv, _RESHAPES):
        return kv
    expand = kv.args[0]
    if not node_calls(expand, ("expand",)):
        return kv
    unsqueezed = expand.args[0]
    if not (node_calls(unsqueezed, _RESHAPES + ("getitem", "unsqueeze"))
            and isinstance(unsqueezed.args[0], torch.fx.Node)):
        return kv
    index = unsqueezed.args[1] if node_calls(unsqueezed, ("getitem",)) else ()
    indices = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i == slice(None) or i is Ellipsis for i in indices):
        return kv  # an index that picks or reorders: not a plain repeat
    source = unsqueezed.args[0]
    cache, expanded, repeated = value(source), value(expand), value(kv)
    if not (isinstance(cache, torch.Tensor) and cache.dim() == 4):
        return kv
    batch, kv_heads, keys, dim = cache.shape
    if tuple(value(unsqueezed).shape) != (batch, kv_heads, 1, keys, dim) or expanded.dim() != 5 \
            or tuple(expanded.shape[:2]) + tuple(expanded.shape[3:]) != (batch, kv_heads, keys, dim) \
            or tuple(repeated.shape) != (batch, kv_heads * expanded.shape[2], keys, dim):
        return kv
    return source


def _arguments(node: torch.fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _unsupported(args: dict, k_cache, v_cache, check_inputs, causal_ok: bool) -> str | None:
    if args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) and not causal_ok:
        return "dropout or is_causal"
    mask = args.get("attn_mask")
    if mask is not None and not isinstance(mask, torch.fx.Node):
        return f"an attention mask that is not a tensor ({mask!r})"
    if mask is not None and args.get("is_causal", False):
        return "both a mask and is_causal"
    if needs_grad(args["query"], k_cache, v_cache, mask):
        return "a backward may follow (an input requires grad): the kernels have none"
    q, k, v, m = (value(n) for n in (args["query"], k_cache, v_cache, mask))
    if any(not isinstance(size, int) for size in (q.shape[1], q.shape[3], k.shape[1])):
        return "symbolic heads or head dim"
    if not isinstance(args.get("scale"), (float, int, type(None))):
        return "a scale computed in the graph (the kernels take a constant)"
    try:
        check_inputs(q, k, v, m)
    except ValueError as error:
        return str(error)
    return None


def apply(gm: torch.fx.GraphModule, example_inputs=None, *, report: Report | None = None,
          graph_name: str = "graph") -> torch.fx.GraphModule:
    """Rewrite every one-query-row SDPA the kernels take, in place; matches and reasons go to `report`."""
    return rewrite_sdpa(gm, NAME, torch.ops.gemma4_fx.decode_attention.default, ops.check_inputs,
                        takes=lambda rows: rows == 1, causal_ok=False, report=report, graph_name=graph_name)


def rewrite_sdpa(gm: torch.fx.GraphModule, name: str, op, check_inputs, *, takes, causal_ok: bool,
                 report: Report | None, graph_name: str, mask_reason=None) -> torch.fx.GraphModule:
    """Replace each SDPA call whose query rows `takes` (an int, or a symbol for a prompt's length) by
    `op(q, k_cache, v_cache, mask, scale[, is_causal])` where `check_inputs` takes its tensors and `mask_reason`
    (of the mask node and the query's example value) gives no reason not to; the others that `takes` are left alone
    with the reason in `report` under `name`. Shared by the decode and prefill passes."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA]:
        args = _arguments(node)
        q = value(args["query"])
        if not (isinstance(q, torch.Tensor) and q.dim() == 4 and takes(q.shape[2])):
            continue  # not this pass's shape: not a candidate
        k_cache, v_cache = _cache(args["key"]), _cache(args["value"])
        if value(k_cache).shape[1] != value(v_cache).shape[1]:
            k_cache, v_cache = args["key"], args["value"]
        reason = _unsupported(args, k_cache, v_cache, check_inputs, causal_ok)
        if reason is None and mask_reason is not None and isinstance(args.get("attn_mask"), torch.fx.Node):
            reason = mask_reason(args["attn_mask"], q)
        if reason is not None:
            if report is not None:
                report.add_skip(name, graph_name, node_location(node), reason, [node.name])
            continue
        scale = args.get("scale")
        scale = value(args["query"]).shape[-1] ** -0.5 if scale is None else scale
        op_args = (args["query"], k_cache, v_cache, args.get("attn_mask"), scale)
        if causal_ok:
            op_args += (bool(args.get("is_causal", False)),)
        with graph.inserting_before(node):
            fused = graph.call_function(op, op_args)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        for repeated in {args["key"], args["value"]}:
            _erase_unused(graph, repeated)
        if report is not None:
            report.add_match(name, graph_name, node_location(fused), [node.name])
    gm.recompile()
    return gm


def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase the repeat of the cache that nothing reads any more (reshape, expand, indexing: no side effects)."""
    while isinstance(node, torch.fx.Node) and not node.users and node.op in ("call_method", "call_function") \
            and (node_calls(node, _RESHAPES + ("expand", "getitem", "unsqueeze"))):
        source = node.args[0]
        graph.erase_node(node)
        node = source
