"""Gemma-4 26B-A4B MoE router on one GPU: HF eager, Inductor, gemma4_fx, and the bare gemma4_fx op sequence.

    python benchmarks/router.py [--quick]

E=128 experts, k=8, H=2816, bf16. Each variant is timed as plain calls (µs per call of back-to-back calls, host
wall clock: the host's launch work counts) and as the replay of a CUDA graph holding the call (median of
`triton.testing.do_bench`, which clears L2 before every call, so the 720 KB projection comes from HBM, as it does
between layers of a real model). The floor is the bytes that must move (projection,
x, outputs) over the copy bandwidth measured here. Agreement with eager is counted on 3 x 4096 random tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import Gemma4TextConfig  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter  # noqa: E402

import gemma4_fx.replacements.router  # noqa: E402,F401  (defines torch.ops.gemma4_fx.router_*)
from benchmarks.common import copy_bandwidth, graph_replay_us, markdown, plain_call_us  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 2816, 128, 8
DTYPE = torch.bfloat16


class RouterWeights(torch.nn.Module):
    """The decoder layer's use of the router: it keeps only (top_k_weights, top_k_index)."""

    def __init__(self, router: Gemma4TextRouter):
        super().__init__()
        self.router = router

    def forward(self, x):
        _, weights, ids = self.router(x)
        return weights, ids


def build_router() -> Gemma4TextRouter:
    config = Gemma4TextConfig(hidden_size=HIDDEN, num_experts=EXPERTS, top_k_experts=TOP_K, enable_moe_block=True,
                              rms_norm_eps=1e-6)
    router = Gemma4TextRouter(config).to(device="cuda", dtype=DTYPE).eval()
    with torch.no_grad():  # HF initialises the scales at one, which would hide rounding differences
        router.scale.copy_(1 + 0.1 * torch.randn(HIDDEN))
        router.per_expert_scale.copy_(1 + 0.1 * torch.randn(EXPERTS))
        router.proj.weight.copy_(torch.randn(EXPERTS, HIDDEN) * HIDDEN**-0.5)
    return router


def op_sequence(router: Gemma4TextRouter):
    """What the gemma4_fx backend installs: router_input -> torch.mm -> router_select."""

    def run(x):
        h = torch.ops.gemma4_fx.router_input(x, router.scale, router.eps, router.scalar_root_size, False)
        return torch.ops.gemma4_fx.router_select(torch.mm(h, router.proj.weight.T), router.per_expert_scale, TOP_K)

    return run


def tokens(n: int, seed: int) -> torch.Tensor:
    """Residual-stream-like activations: per-token scales over two orders of magnitude."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.logspace(-1, 1, n, device="cuda")[torch.randperm(n, device="cuda", generator=g)]
    return (torch.randn(n, HIDDEN, device="cuda", generator=g) * scale[:, None]).to(DTYPE)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def agreement(name, fn, router, rows_per_batch, batches) -> dict:
    """Tokens whose expert set differs from eager; ids identical in order; weights bitwise equal."""
    differ = total = same_order = same_weights = 0
    with torch.no_grad():
        for seed in range(batches):
            x = tokens(rows_per_batch, 1000 + seed)
            _, eager_w, eager_ids = router(x)
            weights, ids = fn(x)
            differ += (ids.sort(-1).values != eager_ids.sort(-1).values).any(-1).sum().item()
            same_order += (ids == eager_ids).all(-1).sum().item()
            same_weights += ((weights == eager_w) & (ids == eager_ids)).all(-1).sum().item()
            total += rows_per_batch
    row = {"variant": name, "tokens": total, "set differs": differ, "ids equal %": 100 * same_order / total,
           "weights bitwise %": 100 * same_weights / total}
    if name == "ops":
        worst, equal, count = 0, 0, 0
        with torch.no_grad():
            for seed in range(batches):
                x = tokens(rows_per_batch, 1000 + seed)
                h = torch.ops.gemma4_fx.router_input(x, router.scale, router.eps, router.scalar_root_size, False)
                eager_h = router.norm(x) * router.scale * router.scalar_root_size
                d = ulps(h, eager_h)
                worst, equal, count = max(worst, d.max().item()), equal + (d == 0).sum().item(), count + d.numel()
        row["router_input vs eager"] = f"max {worst} ulp, {100 * equal / count:.4f}% bitwise"
    return row


def kernel_times(router, n) -> dict:
    """Each step of the op sequence alone; `empty` is a one-element fill, the fixed cost of a replay."""
    x = tokens(n, n)
    one = torch.empty(1, device="cuda")
    h = torch.ops.gemma4_fx.router_input(x, router.scale, router.eps, router.scalar_root_size, False)
    logits = torch.mm(h, router.proj.weight.T)
    steps = {
        "empty": lambda x: one.fill_(0),
        "router_input": lambda x: torch.ops.gemma4_fx.router_input(x, router.scale, router.eps,
                                                                   router.scalar_root_size, False),
        "mm": lambda x: torch.mm(h, router.proj.weight.T),
        "router_select": lambda x: torch.ops.gemma4_fx.router_select(logits, router.per_expert_scale, TOP_K),
    }
    return {"tokens": n, **{name: graph_replay_us(fn, x) for name, fn in steps.items()}}


def fixed_replay_cost() -> float:
    """µs of replaying a graph that holds one one-element fill: what every replay costs before any real work."""
    one = torch.empty(1, device="cuda")
    return graph_replay_us(lambda _: one.fill_(0), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three sizes, one agreement batch")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    sizes = [1, 64, 4096] if args.quick else [1, 8, 64, 256, 1024, 4096]
    batches = 1 if args.quick else 3

    router = build_router()
    wrapper = RouterWeights(router)
    variants = {"eager": wrapper, "inductor": torch.compile(wrapper, dynamic=True),
                "gemma4_fx": torch.compile(wrapper, backend=gemma4_fx.gemma4_backend, dynamic=True),
                "ops": op_sequence(router)}
    bandwidth, fixed = copy_bandwidth(), fixed_replay_cost()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"fixed cost of a graph replay {fixed:.1f} µs")

    graph_rows, plain_rows = [], []
    for n in sizes:
        x = tokens(n, n)
        graph_row, plain_row = {"tokens": n}, {"tokens": n, **plain_call_us(variants, x)}
        for name, fn in variants.items():
            try:
                graph_row[name] = graph_replay_us(fn, x)
            except Exception as e:  # a variant that fails to compile or capture is reported, not fatal
                print(f"{name} at {n} tokens failed: {e!r}")
        for name in ("gemma4_fx", "ops"):
            if name in graph_row and "inductor" in graph_row:
                graph_row[f"inductor/{name}"] = graph_row["inductor"] / graph_row[name]
        if "gemma4_fx" in graph_row and "inductor" in graph_row:  # the router's own cost inside a larger graph
            graph_row["inductor/gemma4_fx net of fixed"] = (graph_row["inductor"] - fixed) / (graph_row["gemma4_fx"] - fixed)
        moved = EXPERTS * HIDDEN * 2 + n * HIDDEN * 2 + n * TOP_K * (4 + 8)
        graph_row["floor"] = moved / bandwidth * 1e6
        graph_rows.append(graph_row)
        plain_rows.append(plain_row)
        print(graph_row, plain_row, flush=True)

    kernel_rows = [kernel_times(router, n) for n in sizes]
    agree = []
    for name, fn in variants.items():
        if name != "eager":
            try:
                agree.append(agreement(name, fn, router, 4096, batches))
            except Exception as e:
                print(f"{name} agreement failed: {e!r}")
    print(gemma4_fx.gemma4_backend.report)
    print("\n### The op sequence kernel by kernel (µs, CUDA graph replay)\n\n" + markdown(kernel_rows))
    print("\n### Plain calls (µs per call, back to back, median)\n\n" + markdown(plain_rows))
    print("\n### Agreement with eager\n\n" + markdown(agree))
    print("\n### CUDA graph replay (µs, median, L2 cleared)\n\n" + markdown(graph_rows))


if __name__ == "__main__":
    main()
