"""What the pattern modules share: how a pattern is traced, the float stand-ins its scalars are traced with, and the
forms an RMSNorm is written in.

Patterns are traced with `fwd_only`, views written as reshapes as the post-grad graph has them (Inductor's
`view_to_reshape` runs before the custom passes). A float argument of a pattern (an eps, a scale) is traced as a
stand-in value and matched as a wildcard (`register_replacement(..., scalar_workaround=...)`): each stand-in must
differ from every other pattern's and from the literals of the math itself (0.5, 2, ...), or a pattern would match
a graph whose constant happens to equal it. One table holds them all so that `tests/test_patterns.py` can check.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import Match, fwd_only, gen_pattern

from ..fx_utils import calls, find_op, value
from ..replacements.rows import rms_norm

# Ops that change a tensor's shape and none of its values (`not_gelu_tanh` passes its probe through them)
_SHAPE_ONLY = frozenset({"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "permute", "transpose"})

# pattern module NAME -> {argument name: stand-in value}
STAND_INS: dict[str, dict[str, float]] = {
    "router": {"eps": 3.25e-5, "root_size": 0.0471},
    "post_attn_norm": {"eps_post": 1.25e-5, "eps_pre": 1.5e-5, "eps_moe": 1.75e-5, "eps_router": 2.25e-5,
                       "root_size": 0.0517},
    "ple_tail": {"eps_ff": 2.5e-5, "eps_ple": 2.75e-5},
    "skinny_linear": {"eps": 3.5e-5},  # `match_norm`'s, which post_attn_norm uses too
}


def stand_ins(pattern: str, names=None) -> dict[str, float]:
    """The stand-ins of `pattern`'s float arguments (those in `names`, in that order, if given)."""
    table = STAND_INS[pattern]
    return dict(table) if names is None else {name: table[name] for name in names}


def trace(fn, args, **kwargs) -> torch.fx.GraphModule:
    gm = fwd_only(fn, args, **kwargs)
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default):
        node.target = torch.ops.aten.reshape.default
    gm.recompile()
    return gm


def bind(fn, **fixed):
    """`fn` with keyword arguments `fixed` (the others with a default keep it), as a function of its inputs alone:
    `register_replacement` names a pattern's inputs after its parameters, and make_fx counts them from its code
    object (so no `*args` wrapper)."""
    params = [name for name, p in inspect.signature(fn).parameters.items()
              if name not in fixed and p.default is p.empty]
    namespace = {"fn": fn, "fixed": fixed}
    exec(f"def {fn.__name__}({', '.join(params)}):\n    return fn({', '.join(params)}, **fixed)", namespace)
    return namespace[fn.__name__]


def residual_first(residual, x):
    return residual + x


def residual_last(residual, x):
    return x + residual


def computed(nodes) -> bool:
    """Any of `nodes` (a match's norm weights) is computed in the graph rather than taken as a parameter: Gemma-2/3
    weigh their rsqrt norms by `1 + w`, which a Gemma-4 norm's wildcard weight would otherwise take."""
    return any(node.op not in ("placeholder", "get_attr") for node in nodes)


# The two orders a residual add is written in (HF: `residual + x`, vLLM: `x + residual`): a pattern matches aten.add's
# arguments in order.
RESIDUAL_ADDS = (residual_first, residual_last)


# How an RMSNorm is written. Each form is proven equal to `rows.rms_norm` (HF's `Gemma4RMSNorm`, what the replacements
# compute) in tests/test_patterns.py, where it is rewritten.


def rms_norm_rsqrt(x, weight, eps):
    """`rsqrt` for HF's `pow(·, -0.5)` (ATen computes that pow as rsqrt on CPU and CUDA), weighed in fp32, rounded
    once: HF's math."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (out if weight is None else out * weight.float()).type_as(x)


def rms_norm_rsqrt_cast(x, weight, eps):
    """vLLM's `rms_norm` (`vllm.ir.ops`): rsqrt, cast to the weight's dtype, then weighed. In fp32 the casts vanish
    and it is `rms_norm_rsqrt`'s graph; in bf16/fp16 it rounds before the weight, which the replacements do not."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (out if weight is None else out.to(weight.dtype) * weight).to(x.dtype)


@dataclass(frozen=True)
class NormForm:
    name: str
    fn: Callable  # fn(x, weight | None, eps)
    rounds_before_weight: bool = False  # exact (the replacements' math) only where x and the weight are fp32

    def reason(self, dtype: torch.dtype) -> str | None:
        """Why a match of this form in `dtype` is left alone, or None."""
        if self.rounds_before_weight and dtype != torch.float32:
            return (f"{self.name} RMSNorm rounds to {dtype} before its weight; the replacements weigh in fp32 and "
                    "round once (HF's Gemma4RMSNorm)")
        return None


NORM_FORMS = {form.name: form for form in (NormForm("hf", rms_norm), NormForm("rsqrt", rms_norm_rsqrt),
                                           NormForm("rsqrt_cast", rms_norm_rsqrt_cast, True))}


@functools.cache
def op_norm_form(name: str) -> NormForm:
    """The form of an engine's norm op "ns::name" (`Gemma4Passes(rms_norm_ops=...)`): vLLM's semantics."""
    op = find_op(name)
    return NormForm(name, lambda x, weight, eps: op(x, weight, eps), True)


def norm_forms(graph: torch.fx.Graph, options: dict) -> list[NormForm]:
    """The norm forms that can be in `graph`: HF's if it has a pow(·, -0.5), the rsqrt ones if it has an rsqrt, and
    the configured norm ops it calls. Patterns register one set per form, so a graph pays only for its own."""
    aten = torch.ops.aten
    forms = []
    if any(node.args[1] == -0.5 for node in graph.find_nodes(op="call_function", target=aten.pow.Tensor_Scalar)):
        forms.append(NORM_FORMS["hf"])
    if graph.find_nodes(op="call_function", target=aten.rsqrt.default):
        forms += [NORM_FORMS["rsqrt"], NORM_FORMS["rsqrt_cast"]]
    return forms + [op_norm_form(name) for name in options.get("rms_norm_ops", ()) if calls(graph, name)]


def _weighted_norm(x, weight, eps, norm):
    return norm(x, weight, eps)


def _plain_norm(x, eps, norm):
    return norm(x, None, eps)


@functools.cache
def _norm_pattern(form: NormForm, dtype: torch.dtype, weighted: bool):
    example = [torch.empty(6, 16, dtype=dtype), *([torch.empty(16, dtype=dtype)] if weighted else [])]
    fn = bind(_weighted_norm if weighted else _plain_norm, norm=form.fn)
    return gen_pattern(fn, [*example, STAND_INS["skinny_linear"]["eps"]], trace, stand_ins("skinny_linear"))


def match_norm(node: torch.fx.Node, forms: list[NormForm], weighted: bool) -> tuple[Match, NormForm] | None:
    """(match, form) of `node` as the output of an RMSNorm in one of `forms` (`norm_forms`), weighed by a graph input
    (`weighted`) or by nothing, else None. The match's kwargs are x, weight, eps. A norm weighed by a computed
    `1 + w` (Gemma-2/3) is not matched."""
    val = value(node)
    if not isinstance(val, torch.Tensor):
        return None
    for form in forms:
        match = _norm_pattern(form, val.dtype, weighted).match(node)
        if match and isinstance(match.kwargs.get("eps"), float) \
                and not (weighted and computed([match.kwargs["weight"]])):
            return match, form
    return None


def norm_below(inputs, forms: list[NormForm], weighted: bool) -> tuple[Match, NormForm] | None:
    """(match, form) of an RMSNorm (`match_norm`) of one of the nodes `inputs`, its output at most 5 ops below them
    (bf16: cast, normalise, weigh, cast back), else None."""
    inputs = set(inputs)
    candidates, frontier = {}, list(inputs)
    for _ in range(5):
        frontier = [user for node in frontier for user in node.users if user not in candidates]
        candidates.update(dict.fromkeys(frontier))
    for candidate in candidates:
        found = match_norm(candidate, forms, weighted)
        if found and found[0].kwargs["x"] in inputs:
            return found
    return None


def not_gelu_tanh(gate: torch.fx.Node, act: torch.fx.Node, where: str) -> str | None:
    """Why the elementwise ops from `gate` to `act` are not gelu_tanh(gate) in gate's dtype, or None. Inductor
    decomposes gelu and engines write it their own way, so the ops are run on probe values (magnitudes from 2**-10
    to 2**5, both signs, zero) against a float64 gelu_tanh, to two ulps; a tanh among them (or gelu's own
    `approximate="tanh"`) tells it from the erf form, which no bf16 probe could. The ops must read the gate's values
    (and numbers) alone; views and reshapes among them (a 2-D GEMM's output made 3-D) leave the probe as it is: they
    change no value."""
    aten = torch.ops.aten
    nodes, stack = {}, [act]
    while stack:
        node = stack.pop()
        if node is gate or node in nodes:
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return f"activation: {node.name} is not an aten op"
        if not node.all_input_nodes:  # a tensor made from nothing (arange, full): not the gate's values alone
            return f"activation {where} reads {node.name}, not its input alone"
        nodes[node] = None
        stack += node.all_input_nodes
    if not any(node.target is aten.tanh.default or node.target is aten.gelu.default
               and node.kwargs.get("approximate") == "tanh" for node in nodes):
        return f"activation {where} has no tanh: not gelu_tanh"
    order = {node: i for i, node in enumerate(gate.graph.nodes)}
    dtype = value(gate).dtype
    magnitudes = torch.logspace(-10, 5, 2048, base=2.0, dtype=torch.float64)
    probe = torch.cat([magnitudes, torch.zeros(1, dtype=torch.float64)])
    probe = torch.cat([probe, -probe]).to(dtype)
    env = {gate: probe}
    for node in sorted(nodes, key=order.get):
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        env[node] = args[0] if node.target._opname in _SHAPE_ONLY else node.target(*args, **kwargs)
    got, exact = env[act], F.gelu(probe.double(), approximate="tanh")
    eps = torch.finfo(dtype).eps
    if got.dtype != dtype or got.shape != exact.shape or \
            ((got.double() - exact).abs() > 2 * eps * (exact.abs() + 1)).any():
        return f"activation {where} is not gelu_tanh in the activation dtype"
    return None
