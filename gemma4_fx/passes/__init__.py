"""Passes: what runs over whole graphs. `pipeline` runs the patterns on Inductor's post-grad graph (`context` is
what a pattern records into while it runs), then `inductor_launch` turns the ops into Inductor-launched kernels;
`yoco` rewrites Dynamo's graph, with its op classification in `row_local`. A new rewrite of a subgraph is a
pattern (`gemma4_fx.patterns`), not a pass."""
