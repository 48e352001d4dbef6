"""What the GPU benchmarks share: the measured copy bandwidth (the floors' denominator), graph-replay timing and
the markdown tables they print."""

from __future__ import annotations

import torch
import triton.testing


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def graph_replay_us(fn, *args) -> float:
    """Median µs of replaying a CUDA graph that holds one call of `fn(*args)`; do_bench clears L2 before each."""
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*args)
        return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3


def markdown(rows: list[dict]) -> str:
    """A markdown table with a column for every key any row has."""
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
