"""Gemma-4 PLE tail (E2B/E4B layers with per-layer inputs): the decoder layer's end after its MLP.

    h = residual + rmsnorm(mlp_out, w_ff)                        post_feedforward_layernorm, residual add
    g = gelu_tanh(h @ gate.T) * per_layer_input                  per_layer_input_gate, act_fn, * per_layer_input
    out = (h + rmsnorm(g @ proj.T, w_ple)) * layer_scalar        per_layer_projection, post_per_layer_input_norm

becomes `ple_norm_add` → the same mm as eager → `ple_gate` → the same mm → `ple_norm_add` (with the scalar): the
GEMMs stay eager's, the three steps around them are one launch each and round where eager rounds. On MoE layers
mlp_out is the sum of the two post-FF norms; it enters as a wildcard, so those match too. Matched on
[batch, seq, hidden] and [tokens, hidden] (a linear lowers differently on each), with the residual added on either
side, the norms in any form of `matcher_utils.NORM_FORMS`, and the projections as an engine's linear op
(`Gemma4Passes(linear_ops=...)`), which the replacement then calls for its GEMMs.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement

from ..passes.context import current
from ..replacements import ple_tail as ple_ops
from ..replacements.rows import rms_norm
from ..fx_utils import calls, find_op
from .matcher_utils import RESIDUAL_ADDS, NormForm, bind, computed, norm_forms, residual_first, stand_ins, trace

NAME = "ple_tail"


def ple_tail_pattern(mlp_out, residual, per_layer_input, ff_weight, gate_weight, proj_weight, ple_weight,
                     layer_scalar, eps_ff, eps_ple, norm=rms_norm, linear=torch.nn.functional.linear,
                     add=residual_first):
    h = add(residual, norm(mlp_out, ff_weight, eps_ff))
    g = torch.nn.functional.gelu(linear(h, gate_weight), approximate="tanh") * per_layer_input
    return (h + norm(linear(g, proj_weight), ple_weight, eps_ple)) * layer_scalar


def ple_tail_replacement(mlp_out, residual, per_layer_input, ff_weight, gate_weight, proj_weight, ple_weight,
                         layer_scalar, eps_ff, eps_ple, linear=None):
    """`linear`: the engine's op the pattern matched (None: the GEMM was aten's, and is eager's `mm`)."""
    mm = linear or (lambda x, weight: torch.mm(x, weight.t()))
    # The ops take rows in any leading shape, so the only view of the activations is the GEMM's: each view costs
    # host time in every call of Inductor's code.
    h = torch.ops.gemma4_fx.ple_norm_add(mlp_out, residual, ff_weight, None, eps_ff)
    g = torch.ops.gemma4_fx.ple_gate(mm(h.reshape(-1, residual.shape[-1]), gate_weight), per_layer_input)
    return torch.ops.gemma4_fx.ple_norm_add(mm(g, proj_weight), h, ple_weight, layer_scalar, eps_ple)


# Below this many static tokens on CUDA the rewrite only ties Inductor's own fusion of the tail (the same five
# launches), so it is left to Inductor (BENCHMARKS.md, layer epilogues).
CUDA_MIN_TOKENS = 512

_SCALARS = stand_ins(NAME)  # traced as wildcards (`matcher_utils.STAND_INS`)
_TENSORS = ("mlp_out", "residual", "per_layer_input", "ff_weight", "gate_weight", "proj_weight", "ple_weight",
            "layer_scalar")


def _unsupported(match: Match) -> str | None:
    """Why the kernels cannot take this match's operands, or None."""
    mlp_out, residual, pli, ff_w, gate_w, proj_w, ple_w, scalar = (match.kwargs[name].meta["val"]
                                                                   for name in _TENSORS)
    hidden, ple = residual.shape[-1], pli.shape[-1]
    if not isinstance(hidden, int) or not isinstance(ple, int):
        return "symbolic hidden or per-layer-input size"
    if residual.device.type not in ("cuda", "cpu"):
        return f"device {residual.device.type}"
    if not ple_ops.supports(hidden, ple, residual.dtype):
        return (f"{residual.dtype} rows of {hidden} are outside the kernels' range (dtypes "
                f"{', '.join(map(str, ple_ops.DTYPES))}, hidden <= {ple_ops.MAX_HIDDEN})")
    dtype, rows = residual.dtype, residual.shape[:-1]
    if mlp_out.shape != residual.shape or pli.shape[:-1] != rows:
        return (f"mlp_out {tuple(mlp_out.shape)}, per_layer_input {tuple(pli.shape)} do not share the residual's "
                f"rows {tuple(rows)}")
    tokens = math.prod(rows)
    if residual.device.type == "cuda" and isinstance(tokens, int) and tokens < CUDA_MIN_TOKENS:
        return f"{tokens} tokens: below {CUDA_MIN_TOKENS} Inductor's own fusion of the PLE tail is as fast"
    for name, t in zip(_TENSORS, (mlp_out, residual, pli, ff_w, gate_w, proj_w, ple_w, scalar)):
        if t.dtype != dtype:
            return f"{name} is {t.dtype}, the residual {dtype}: the kernels take one dtype"
    if scalar.numel() != 1:
        return f"layer_scalar has {scalar.numel()} elements, want one"
    for name, w in (("ff_weight", ff_w), ("ple_weight", ple_w)):
        if tuple(w.shape) != (hidden,) or w.stride(-1) != 1:
            return f"{name} is {tuple(w.shape)} stride {w.stride()}, want a contiguous ({hidden},) vector"
    if any(not isinstance(match.kwargs.get(name, 0.0), (int, float)) for name in _SCALARS):
        return "eps is not a Python float (under dynamic=True it is a 0-d tensor)"
    return None


def _check(match: Match, form: NormForm) -> bool:
    if computed([match.kwargs["ff_weight"], match.kwargs["ple_weight"]]):
        return False  # not a Gemma-4 norm (see `computed`)
    reason = _unsupported(match) or form.reason(match.kwargs["residual"].meta["val"].dtype)
    return current().decide(NAME, match.output_nodes()[0], reason)  # anchor: the `* layer_scalar`


@functools.cache
def _patterns(form: NormForm, linear_op: str | None) -> PatternMatcherPass:
    """The PLE tail with norms written in `form`, either order of the first residual add, and its projections as
    aten's linear (views around an `mm` on [batch, seq, hidden], a bare `mm` on [tokens, hidden]) or as the engine's
    op `linear_op`."""
    patterns = PatternMatcherPass(pass_name=f"gemma4_fx_ple_tail_{form.name}_{linear_op}")
    linear = {} if linear_op is None else {"linear": functools.partial(_call, linear_op)}
    hidden, ple = 16, 8
    for dtype, rows, add in itertools.product((*ple_ops.DTYPES, torch.float64),  # float64: to say why it is left
                                              ((2, 3), (6,)) if linear_op is None else ((6,),), RESIDUAL_ADDS):
        example = [torch.empty(*rows, hidden, dtype=dtype), torch.empty(*rows, hidden, dtype=dtype),
                   torch.empty(*rows, ple, dtype=dtype), torch.empty(hidden, dtype=dtype),
                   torch.empty(ple, hidden, dtype=dtype), torch.empty(hidden, ple, dtype=dtype),
                   torch.empty(hidden, dtype=dtype), torch.empty(1, dtype=dtype), *_SCALARS.values()]
        register_replacement(bind(ple_tail_pattern, norm=form.fn, add=add, **linear),
                             bind(ple_tail_replacement, **linear), example, trace, patterns,
                             extra_check=functools.partial(_check, form=form),
                             scalar_workaround=_SCALARS, skip_duplicates=True)
    return patterns


def _call(name: str, x, weight):
    """The engine's linear op "ns::name" on x (looked up when traced: a module-level function, so patterns cache)."""
    return find_op(name)(x, weight)


def apply(graph: torch.fx.Graph, ctx) -> None:
    linear_ops = [name for name in ctx.options.get("linear_ops", ()) if calls(graph, name)]
    for form in norm_forms(graph, ctx.options):
        for linear_op in (None, *linear_ops):
            _patterns(form, linear_op).apply(graph)
