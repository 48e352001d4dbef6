"""How our patterns are traced: `fwd_only`, with views written as reshapes, as the post-grad graph has them
(Inductor's `view_to_reshape` runs before the custom passes)."""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import fwd_only


def trace(fn, args, **kwargs) -> torch.fx.GraphModule:
    gm = fwd_only(fn, args, **kwargs)
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default):
        node.target = torch.ops.aten.reshape.default
    gm.recompile()
    return gm
