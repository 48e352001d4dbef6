"""Replacements: the fused ops the patterns install. One module per op family, named after it: the math in its
docstring, an eager reference (the CPU implementation and the tests' oracle) beside each Triton kernel, and the
`torch.library` custom op with its fake. `rows` holds what the one-row-per-program kernels share."""
