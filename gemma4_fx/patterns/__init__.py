"""The Gemma-4 subgraph rewrites, one module each: the math a pattern matches sits beside the replacement it installs.

Each module has `NAME` (the report's name for it) and `apply(graph, ctx)`.
"""

from . import norm_chain, ple_tail, router

PATTERNS = {module.NAME: module for module in (router, norm_chain, ple_tail)}
