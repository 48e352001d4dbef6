"""Block configs of the fused MoE experts kernels (`moe_experts.py`), tuned per GPU and shape.

Key: (tokens bucket, experts E, intermediate N, hidden H, GPU): a call with T tokens takes the bucket nearest T (in
log2) among its shape's. Value: (BLOCK_M, gate_up, down), each GEMM's as (BLOCK_N, BLOCK_K, GROUP_M, num_warps,
num_stages).
`python benchmarks/moe.py --tune` sweeps candidates on the GPU it runs on and prints entries to paste here. A shape
or GPU with no entry gets `moe_experts.default_config`; an H100 takes the H200's entries (the same SMs).
"""

CONFIGS: dict[tuple[int, int, int, int, str], tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    (1, 128, 704, 2816, 'H200'): (16, (64, 128, 8, 4, 4), (64, 64, 8, 4, 4)),
    (2, 128, 704, 2816, 'H200'): (16, (64, 128, 8, 4, 3), (64, 64, 8, 4, 3)),
    (4, 128, 704, 2816, 'H200'): (16, (32, 256, 8, 4, 3), (64, 64, 8, 4, 4)),
    (8, 128, 704, 2816, 'H200'): (16, (32, 128, 8, 4, 4), (64, 128, 8, 4, 4)),
    (16, 128, 704, 2816, 'H200'): (16, (32, 256, 8, 4, 3), (64, 128, 8, 4, 4)),
    (64, 128, 704, 2816, 'H200'): (16, (32, 256, 8, 4, 3), (128, 128, 8, 4, 3)),
    (256, 128, 704, 2816, 'H200'): (32, (64, 128, 8, 4, 5), (128, 64, 8, 4, 5)),
    (1024, 128, 704, 2816, 'H200'): (128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 4)),
    (4096, 128, 704, 2816, 'H200'): (128, (128, 64, 8, 8, 4), (128, 64, 8, 4, 3)),
}
