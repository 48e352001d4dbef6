"""Passes: what runs over whole graphs. `pipeline` runs the patterns on Inductor's post-grad graph (`context` is
what a pattern records into while it runs), then `inductor_launch` turns the ops into Inductor-launched kernels;
`yoco` (with its op classification in `row_local`), `decode_attention`, `prefill_attention` and `slide_window`
rewrite Dynamo's graph, for what only it shows: which rows reach the output, attention as one SDPA call, a cache
updated in place. Any other rewrite of a subgraph is a pattern (`gemma4_fx.patterns`), not a pass."""
