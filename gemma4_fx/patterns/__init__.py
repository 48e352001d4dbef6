"""Patterns: the Gemma-4 math each rewrite matches in Inductor's post-grad graph, beside the replacement it installs.

One module per rewrite, with `NAME` (its name in reports and in `Gemma4Backend(patterns=...)`) and
`apply(graph, ctx)`. Kernels and custom ops live in `gemma4_fx.replacements`; the tracing helpers and the table of
float stand-ins all patterns share live in `matcher_utils`.
"""

from . import moe_experts, ple_tail, post_attn_norm, rotary_table, router, skinny_linear, skinny_single

# The order the passes run in, whatever order a user names them in:
# - skinny_linear first: it tells Gemma-4's gate/up from Gemma-2/3's by the MLP's input norm, which post_attn_norm
#   then folds into its op; it takes only linears that share an input and are normed as q/k/v or feed a gelu-tanh
#   gate, so the others' linears stay theirs (the router's projection and the PLE tail's gate and projection each
#   read an input of their own; the experts' GEMMs are not `mm`s);
# - router before post_attn_norm: post_attn_norm's widest variant consumes the `router_input` op that the router
#   rewrite creates, and folds the router's norm into the layer's one pass over the residual;
# - moe_experts reads the routing whichever op computes it (eager's or the router rewrite's);
# - ple_tail after them: it matches the end of a layer, after the MLP and the experts, which it takes as a wildcard;
# - skinny_single last of the rewrites: it takes a lone linear by the norm its output feeds, which the epilogues
#   (post_attn_norm, ple_tail) find by that linear's mm, and may have folded into their ops by then;
# - rotary_table apart: it stores the RoPE tables that the layers' rotations read, which no rewrite takes.
PATTERNS = {module.NAME: module
            for module in (skinny_linear, router, post_attn_norm, moe_experts, ple_tail, skinny_single, rotary_table)}
