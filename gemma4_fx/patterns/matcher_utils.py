"""What the pattern modules share: how a pattern is traced, and the float stand-ins its scalars are traced with.

Patterns are traced with `fwd_only`, views written as reshapes as the post-grad graph has them (Inductor's
`view_to_reshape` runs before the custom passes). A float argument of a pattern (an eps, a scale) is traced as a
stand-in value and matched as a wildcard (`register_replacement(..., scalar_workaround=...)`): each stand-in must
differ from every other pattern's and from the literals of the math itself (0.5, 2, ...), or a pattern would match
a graph whose constant happens to equal it. One table holds them all so that `tests/test_patterns.py` can check.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import fwd_only

# pattern module NAME -> {argument name: stand-in value}
STAND_INS: dict[str, dict[str, float]] = {
    "router": {"eps": 3.25e-5, "root_size": 0.0471},
    "post_attn_norm": {"eps_post": 1.25e-5, "eps_pre": 1.5e-5, "eps_moe": 1.75e-5, "eps_router": 2.25e-5,
                       "root_size": 0.0517},
    "ple_tail": {"eps_ff": 2.5e-5, "eps_ple": 2.75e-5},
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
