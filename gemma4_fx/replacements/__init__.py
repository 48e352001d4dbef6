"""Fused replacements (custom ops with Triton kernels) that the Gemma-4 passes install."""
