"""Replacements: the fused ops the patterns install. One module per op family, named after it: the math in its
docstring, an eager reference (the CPU implementation and the tests' oracle) beside each Triton kernel, and the
`torch.library` custom op with its fake. `rows` holds what the one-row-per-program kernels share, `eager_math` the
arithmetic that must give eager's bits however a kernel is compiled, `launch` how the ops launch their kernels (or
record the launches for Inductor), `gemm` what the GEMM kernels share."""
