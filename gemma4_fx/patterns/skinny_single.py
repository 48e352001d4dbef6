"""A Gemma-4 linear alone on its input, at a decode step's few rows: one `gemma4_fx::skinny_linear` launch
(replacements/skinny_linear.py) with its tuned block config instead of cuBLAS's GEMM.

    y = x @ W.T          x: [M <= TUNED_MAX_ROWS, K], W: [N, K], fp32 accumulation rounded once (as cuBLAS)

Why: at a few rows cuBLAS reads these weights well under the copy bandwidth; with its tuned configs the kernel is
faster on the shapes in `skinny_linear_configs.py` (E2B/E4B o_proj, down_proj, a KV-shared layer's q_proj, the PLE
gate and projection; BENCHMARKS.md, skinny linears).

Matched in the post-grad graph as `skinny_linear`'s groups are (`mm(x, permute(w, [1, 0]))`, w a graph input), after
the epilogue patterns have taken the norms around them, for a linear that no other linear shares x with and whose
output one of these takes, which only Gemma-4's layers do:
- an RMSNorm weighed by a graph input (o_proj and down_proj before the sandwich norms, the PLE projection, a
  KV-shared layer's q_proj before q_norm; Gemma-2/3 weigh by a computed `1 + w`, Llama's and Qwen3's o_proj and
  down_proj feed the residual);
- the post_attn_norm or ple_norm_add op, as the input it norms (the same norms, folded into our ops);
- `gelu_tanh(y) * t` with t no linear's output (the PLE gate; the MLP's gate meets its up projection). The op
  then computes the product too (its `gelu_times` epilogue) where t has the product's shape and nothing else reads
  y: one launch fewer per layer.
A linear that another rewrite made (one with no module path: the PLE tail's, where ple_tail took the tail) is that
rewrite's, and stays as it made it.
On CUDA a candidate is taken only where its shape has a tuned config (measured faster than cuBLAS); elsewhere it is
left alone with that reason. On CPU the op is eager's linear: every candidate is taken (the tests' path).
"""

from __future__ import annotations

import torch

from ..fx_utils import value
from ..passes.context import PassContext
from ..replacements import skinny_linear as ops
from . import skinny_linear as groups
from .matcher_utils import norm_forms, not_gelu_tanh

NAME = "skinny_single"
aten = torch.ops.aten
# The argument of our epilogue ops where they read a Gemma-4 linear's output: the input post_attn_norm and
# ple_norm_add norm (o_proj; down_proj).
_OUR_CONSUMERS = {torch.ops.gemma4_fx.post_attn_norm.default: 0, torch.ops.gemma4_fx.ple_norm_add.default: 0}


def _gelu_gate(y: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the product, t) where `gelu_tanh(y) * t` is computed from y (within the ops of a decomposed gelu), with t no
    linear's output (the PLE gate; the MLP's gate meets its up projection); else None."""
    below, frontier = set(), [y]
    for _ in range(12):  # gelu_tanh decomposed, with casts around it; not past another linear
        frontier = [user for node in frontier for user in node.users
                    if user not in below and user.target is not aten.mm.default]
        below.update(frontier)
    for mul in below:
        if mul.target is not aten.mul.Tensor or len(mul.args) != 2:
            continue
        for act, other in (mul.args, mul.args[::-1]):
            if isinstance(act, torch.fx.Node) and isinstance(other, torch.fx.Node) and other not in below \
                    and groups.source_of(other).target is not aten.mm.default \
                    and not_gelu_tanh(y, act, "on the PLE gate") is None:
                return mul, other
    return None


def _foldable(mm: torch.fx.Node, product: torch.fx.Node, times: torch.fx.Node) -> bool:
    """The op can compute the product itself (`gelu_times`): t has the product's shape and the linear's dtype, as the
    product has (no broadcast, no cast), and only the ops from the mm to the product read the mm's output on the
    way, so the linear's own output is needed no more."""
    if not (value(times).shape == value(product).shape and value(product).shape.numel() == value(mm).shape.numel()
            and value(times).dtype == value(product).dtype == value(mm).dtype):
        return False
    below, frontier = {mm}, [mm]
    for _ in range(16):  # the reshapes and the decomposed gelu
        frontier = [user for node in frontier for user in node.users if user not in below]
        below.update(frontier)
    chain, stack = set(), [product]  # the nodes below the mm that the product is computed from
    while stack:
        node = stack.pop()
        if node in below and node not in chain:
            chain.add(node)
            stack += node.all_input_nodes
    return mm in chain and all(user in chain for node in chain - {product} for user in node.users)


def _normed_by_gemma4(mm: torch.fx.Node, forms) -> bool:
    """One of the module docstring's consumers takes the mm's output (or a reshape of it)."""
    outputs = groups.outputs_of(mm)
    if any(user.target in _OUR_CONSUMERS and user.args[_OUR_CONSUMERS[user.target]] in outputs
           for node in outputs for user in node.users):
        return True
    return groups.normed(mm, forms, weighted=(True,)) or _gelu_gate_of(mm) is not None


def _gelu_gate_of(mm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """`_gelu_gate` of the mm's output after its reshapes."""
    outputs = groups.outputs_of(mm)
    leaves = [node for node in outputs if not any(user in outputs for user in node.users)]
    return next(filter(None, map(_gelu_gate, leaves)), None)


def _untuned(mm: torch.fx.Node) -> str | None:
    """On CUDA, why the shape is left to cuBLAS: no tuned config, or more rows than the tuned ones."""
    x, w = value(mm.args[0]), value(groups.weight_of(mm))
    if x.device.type != "cuda":
        return None
    if x.shape[0] > ops.TUNED_MAX_ROWS:
        return f"{x.shape[0]} rows: a single linear is tuned up to {ops.TUNED_MAX_ROWS}"
    if ops.tuned_config(x.shape[0], x.shape[1], [w.shape[0]], x.dtype, False, x.device) is None:
        return (f"no config measured faster than cuBLAS for [{w.shape[0]}, {x.shape[1]}] {x.dtype} on this GPU "
                "(skinny_linear_configs.py)")
    return None


def apply(graph: torch.fx.Graph, ctx: PassContext) -> None:
    forms = norm_forms(graph, ctx.options)
    for mms in groups.linears_by_input(graph):
        if len(mms) != 1 or not _normed_by_gemma4(mms[0], forms):
            continue
        mm = mms[0]
        x = mm.args[0]
        if any(not isinstance(size, int) for size in value(x).shape) or "nn_module_stack" not in mm.meta:
            continue  # symbolic rows (a prefill-shaped graph), or another rewrite's linear: not a candidate
        reason = groups.unsupported(x, [groups.weight_of(mm)], None) or _untuned(mm)
        gate = _gelu_gate_of(mm)
        product, times = gate if gate is not None and _foldable(mm, *gate) else (None, None)
        if ctx.decide(NAME, mm, reason):
            groups.rewrite(graph, [mm], product, times)
    graph.eliminate_dead_code()
