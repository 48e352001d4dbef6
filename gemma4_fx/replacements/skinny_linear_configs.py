"""Block configs of `skinny_linear` (`skinny_linear.py`), tuned per GPU and shape at decode rows.

Key: (hidden K, the weights' widths N_i, gated, GPU); value: `Config` fields (BLOCK_N, BLOCK_K, SPLIT_K, num_warps,
num_stages), taken for calls of at most `skinny_linear.TUNED_MAX_ROWS` rows (one 16-row tile, as at M = 1, where
they were swept). `python benchmarks/skinny_linear.py --sweep --singles --rows 1` times every config of a grid per
shape on the GPU it runs on, as a decode step runs them (`stack_us`), and prints entries to paste here. A shape or GPU
without an entry gets `skinny_linear.default_config`; an H100 takes the H200's entries (the same SMs).

A single linear's entry (one width, not gated) also says that ours beat cuBLAS's GEMM there: the `skinny_single`
pattern takes a lone linear on CUDA only where its shape has one (BENCHMARKS.md, skinny linear). The comments give
ours, the rule's default and cuBLAS's µs at M = 1 (H200, torch 2.11, triton 3.6, 2026-12-03).
"""

CONFIGS: dict[tuple[int, tuple[int, ...], bool, str], tuple[int, int, int, int, int]] = {
    # E2B
    (1536, (2048, 256, 256), False, 'H200'): (64, 256, 1, 4, 4),  # q/k/v: 5.6, default 11.5, cuBLAS 15.4
    (1536, (4096, 512, 512), False, 'H200'): (128, 128, 1, 4, 4),  # q/k/v: 8.1, default 11.7, cuBLAS 16.5
    (1536, (6144, 6144), True, 'H200'): (32, 128, 2, 4, 3),  # gate/up: 15.1, default 16.6, cuBLAS 19.8
    (1536, (12288, 12288), True, 'H200'): (32, 128, 1, 4, 4),  # gate/up: 25.1, default 31.3, cuBLAS 29.0
    (2048, (1536,), False, 'H200'): (64, 128, 4, 4, 4),  # o_proj: 5.2, default 7.8, cuBLAS 7.7
    (4096, (1536,), False, 'H200'): (64, 128, 4, 4, 4),  # o_proj: 7.3, default 12.3, cuBLAS 8.8
    (6144, (1536,), False, 'H200'): (64, 256, 4, 4, 4),  # down_proj: 9.0, default 17.5, cuBLAS 10.3
    (12288, (1536,), False, 'H200'): (128, 128, 8, 8, 4),  # down_proj: 14.1, default 29.3, cuBLAS 16.0
    (1536, (2048,), False, 'H200'): (32, 256, 6, 4, 4),  # q: 5.2, default 7.3, cuBLAS 5.5
    (1536, (256,), False, 'H200'): (16, 128, 6, 4, 4),  # per_layer_input_gate: 2.8, default 2.8, cuBLAS 4.9
    (256, (1536,), False, 'H200'): (32, 256, 1, 8, 3),  # per_layer_projection: 1.8, default 2.9, cuBLAS 2.9
    # E4B
    (2560, (2048, 512, 512), False, 'H200'): (32, 128, 4, 4, 4),  # q/k/v: 8.1, default 17.3, cuBLAS 19.8
    (2560, (4096, 1024, 1024), False, 'H200'): (64, 128, 4, 4, 3),  # q/k/v: 12.3, default 18.8, cuBLAS 37.9
    (2560, (10240, 10240), True, 'H200'): (64, 128, 4, 4, 4),  # gate/up: 33.2, default 42.0, cuBLAS 36.3
    (4096, (2560,), False, 'H200'): (64, 128, 8, 4, 3),  # o_proj: 9.3, default 20.4, cuBLAS 10.9
    (10240, (2560,), False, 'H200'): (64, 128, 8, 4, 3),  # down_proj: 18.3, default 41.0, cuBLAS 19.4
    (2560, (2048,), False, 'H200'): (64, 128, 4, 4, 4),  # q: 6.4, default 9.4, cuBLAS 7.0
    (2560, (256,), False, 'H200'): (16, 128, 5, 4, 4),  # per_layer_input_gate: 3.4, default 3.4, cuBLAS 6.0
    (256, (2560,), False, 'H200'): (32, 256, 1, 4, 4),  # per_layer_projection: 2.3, default 4.6, cuBLAS 2.9
    # 26B-A4B (the dense layers beside the experts)
    (2816, (4096, 2048, 2048), False, 'H200'): (128, 128, 2, 8, 4),  # q/k/v: 16.3, default 24.2, cuBLAS 26.0
    (2816, (8192, 1024), False, 'H200'): (128, 128, 2, 4, 3),  # q/k (k = v): 18.5, default 21.8, cuBLAS 22.7
    (2816, (2112, 2112), True, 'H200'): (64, 128, 2, 4, 4),  # gate/up: 11.2, default 18.4, cuBLAS 20.2
    (4096, (2816,), False, 'H200'): (128, 128, 4, 4, 4),  # o_proj: 9.6, default 22.1, cuBLAS 10.8
    (8192, (2816,), False, 'H200'): (128, 128, 4, 4, 4),  # o_proj: 16.0, default 36.7, cuBLAS 17.1
}
# Measured no faster than cuBLAS, so without an entry (ours tuned / cuBLAS, µs): E2B q 1536 -> 4096 (6.4 / 6.5),
# E4B o_proj 2048 -> 2560 (6.7 / 6.5), q 2560 -> 4096 (9.1 / 8.8), and per_layer_model_projection of E2B (11.6 /
# 10.7) and E4B (19.6 / 17.8), 26B-A4B down_proj 2112 -> 2816 (6.7 / 6.5).
