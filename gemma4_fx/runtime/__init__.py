"""What runs at call time around a compiled graph (verify mode; CUDA graphs later)."""
