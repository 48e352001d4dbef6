"""Gemma-4 26B-A4B MoE experts on one GPU: gemma4_fx's fused kernels against transformers' experts forwards.

    python benchmarks/moe.py           # the table (a few minutes on an H200)
    python benchmarks/moe.py --tune    # sweep block configs per tokens bucket, print entries for moe_experts_configs.py
    python benchmarks/moe.py --profile # our kernels one by one (torch.profiler), against the graph replay
    python benchmarks/moe.py --smoke   # tiny widths on CPU under the Triton interpreter: does the script run?

One layer's experts: E=128, N=704, H=2816, top-8, bf16, with the routing given (random top-8 per token, fp32 weights
renormalised as the router does). Each variant is one call captured in a CUDA graph and timed as the median replay
of `triton.testing.do_bench` (which clears L2 before each); a variant that cannot be captured is timed as plain calls
and marked so. The floor is the bytes that must move, the touched experts' weights (3·N·H·2 bytes each, counted from
the routing) plus x and out, over the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:  # Triton picks the interpreter when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from transformers import Gemma4TextConfig  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts  # noqa: E402

from benchmarks.common import copy_bandwidth, cuda_graph, kernel_profile, markdown  # noqa: E402
from gemma4_fx.replacements import moe_experts as M  # noqa: E402

EXPERTS, INTER, HIDDEN, TOP_K = 128, 704, 2816, 8
DTYPE = torch.bfloat16
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
BATCHED_MM_MAX_BYTES = 32 << 30  # batched_mm gathers every pair's weights: 95 MB a token here


def experts_weights(device, experts=EXPERTS, inter=INTER, hidden=HIDDEN, dtype=DTYPE):
    g = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype, generator=g) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=g) * inter**-0.5
    return gate_up, down


def routed_tokens(tokens: int, experts: int, hidden: int, device, seed: int = 0, dtype=DTYPE):
    """x (per-token scales over two orders of magnitude), and a router's top-k ids and renormalised fp32 weights
    for random logits."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(tokens, hidden, device=device, generator=g)
         * torch.logspace(-1, 1, tokens, device=device)[:, None]).to(dtype)
    probs = torch.softmax(torch.randn(tokens, experts, device=device, generator=g), dim=-1)
    weights, ids = torch.topk(probs, min(TOP_K, experts), dim=-1)
    return x, ids, weights / weights.sum(-1, keepdim=True)


def hf_experts(implementation: str, gate_up: torch.Tensor, down: torch.Tensor,
               top_k: int = TOP_K) -> Gemma4TextExperts:
    """transformers' `Gemma4TextExperts` in `implementation` over these weights (shared: the tests use it too)."""
    experts, two_inter, hidden = gate_up.shape
    config = Gemma4TextConfig(hidden_size=hidden, moe_intermediate_size=two_inter // 2, num_experts=experts,
                              top_k_experts=top_k, enable_moe_block=True, experts_implementation=implementation)
    with torch.device("meta"):
        module = Gemma4TextExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module.eval()


def time_us(fn, args, rep_ms: int = 100) -> tuple[float, str]:
    """(median µs, how): a CUDA graph's replay, else (capture failed) plain calls, with the capture's error."""
    with torch.no_grad():
        try:
            replay = cuda_graph(lambda: fn(*args))
        except Exception as error:  # noqa: BLE001 (e.g. a host sync inside the forward)
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(lambda: fn(*args), warmup=10, rep=rep_ms, return_mode="median")
            return ms * 1e3, f"no graph ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
        ms = triton.testing.do_bench(replay, warmup=10, rep=rep_ms, return_mode="median")
        del replay
        return ms * 1e3, "graph"


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    scale = ref.float().abs().amax(-1, keepdim=True)
    return {"max rel err": ((out.float() - ref.float()).abs() / scale).max().item(),
            "bitwise %": 100 * (out == ref).double().mean().item()}


def benchmark(tokens_list: list[int]) -> None:
    gate_up, down = experts_weights("cuda")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s", flush=True)
    torch._dynamo.config.recompile_limit = 64
    grouped, batched = hf_experts("grouped_mm", gate_up, down), hf_experts("batched_mm", gate_up, down)
    loop = hf_experts("eager", gate_up, down)
    variants = {
        "ours": lambda x, ids, weights: torch.ops.gemma4_fx.moe_experts(x, ids, weights, gate_up, down),
        "hf grouped_mm": grouped,
        "hf batched_mm": batched,
        "compiled grouped_mm": torch.compile(grouped, dynamic=True),
        "compiled batched_mm": torch.compile(batched, dynamic=True),
        "ours, eager's order": lambda x, ids, weights: torch.ops.gemma4_fx.moe_experts(x, ids, weights, gate_up, down,
                                                                                       expert_order=True),
        "hf eager": loop,
        "compiled eager": torch.compile(loop, dynamic=True),
    }
    rows, notes = [], {}
    for tokens in tokens_list:
        x, ids, weights = routed_tokens(tokens, EXPERTS, HIDDEN, "cuda", seed=tokens)
        args = (x, ids, weights, gate_up, down)
        touched = ids.unique().numel()
        floor = (touched * 3 * INTER * HIDDEN * 2 + 2 * x.numel() * 2) / bandwidth * 1e6
        with torch.no_grad():
            ours = torch.ops.gemma4_fx.moe_experts(*args)
            row = {"tokens": tokens, "experts": touched, "floor µs": floor,
                   **accuracy(ours, M.moe_experts_reference(*args)),
                   "bitwise % vs grouped_mm": accuracy(ours, grouped(x, ids, weights))["bitwise %"],
                   "eager's order: bitwise % vs hf eager": accuracy(variants["ours, eager's order"](x, ids, weights),
                                                                    loop(x, ids, weights))["bitwise %"]}
        for name, fn in variants.items():
            if "batched" in name and tokens * TOP_K * 3 * INTER * HIDDEN * 2 > BATCHED_MM_MAX_BYTES:
                row[name] = "n/a (gathers > 32 GB)"
                continue
            try:
                us, how = time_us(fn, (x, ids, weights))
            except Exception as error:  # noqa: BLE001 (a variant that fails is reported, not fatal)
                row[name] = "n/a"
                notes.setdefault(name, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
                continue
            row[name] = f"{us:.1f} ({us / floor:.2f}x)"
            if how != "graph":
                row[name] += " *"
                notes.setdefault(name, how)
            if name == "ours":
                row["ours TFLOP/s"] = 2 * tokens * TOP_K * 3 * INTER * HIDDEN / us * 1e-6
        rows.append(row)
        print(row, flush=True)
    print(f"\n### One MoE layer's experts, E={EXPERTS} N={INTER} H={HIDDEN} top-{TOP_K} bf16: µs (times the floor)\n")
    print(markdown(rows))
    for name, note in notes.items():
        print(f"\n{name}: {note}" + (" (* timed as plain calls)" if note.startswith("no graph") else ""))


def profile(tokens_list: list[int]) -> None:
    gate_up, down = experts_weights("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for tokens in tokens_list:
        x, ids, weights = routed_tokens(tokens, EXPERTS, HIDDEN, "cuda", seed=tokens)
        config = M.tuned_config(tokens, TOP_K, EXPERTS, INTER, HIDDEN, DTYPE, x.device)
        us = time_us(torch.ops.gemma4_fx.moe_experts, (x, ids, weights, gate_up, down))[0]
        _, summary = kernel_profile(lambda: torch.ops.gemma4_fx.moe_experts(x, ids, weights, gate_up, down))
        print(f"\n{tokens} tokens, {ids.unique().numel()} experts: graph replay {us:.1f} µs; {config}\n{summary}",
              flush=True)


# --------------------------------------------------------------------------------------------------------------------
# --tune: coordinate descent over block configs, compiled ahead in a process pool

def tune_block_ms(tokens: int) -> list[int]:
    """BLOCK_M candidates around the mean rows per expert (16 in the streaming regime, where the launcher raises it
    to the token count)."""
    rows = tokens * TOP_K / EXPERTS
    return [m for m in (16, 32, 64, 128) if rows / 4 <= m <= max(16, 2 * rows)][-3:] or [128]


def gemm_candidates(block_m: int, down: bool) -> list[M.GemmConfig]:
    """Thin tiles, deep K and stages for streaming weights (BLOCK_M <= 32); square-ish tiles for the tensor cores
    above. Those over 200 KB of shared memory are left out."""
    if block_m <= 32:
        shapes = [(n, k, 8, 4, s) for n in ((32, 64, 128) if down else (16, 32, 64)) for k in (64, 128, 256)
                  for s in (3, 4, 5)]
    else:
        shapes = [(n, k, 8, w, s) for n in ((64, 128, 256) if down else (64, 128)) for k in (64, 128) for w in (4, 8)
                  for s in (3, 4) if n * (1 if down else 2) <= 32 * w]  # accumulators at most 32 columns a warp
    operands = 1 if down else 2
    return [M.GemmConfig(*c) for c in shapes if c[4] * (block_m + operands * c[0]) * c[1] * 2 <= 200 << 10]


def _compile_job(jobs):
    """Worker: run each (tokens, config) once so its kernels land in Triton's cache."""
    gate_up, down = torch.empty(EXPERTS, 2 * INTER, HIDDEN, dtype=DTYPE, device="cuda"), torch.empty(
        EXPERTS, HIDDEN, INTER, dtype=DTYPE, device="cuda")
    for tokens, config in jobs:
        x, ids, weights = routed_tokens(tokens, EXPERTS, HIDDEN, "cuda")
        try:
            M.moe_experts_triton(x, ids, weights, gate_up, down, config=config)
        except Exception:  # noqa: BLE001 (out of resources: the timing pass skips it too)
            pass
    torch.cuda.synchronize()


def precompile(jobs: list) -> None:
    """Compile every config in a pool of processes; the main process then loads them from Triton's cache."""
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    context = torch.multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        pool.map(_compile_job, [jobs[i::workers] for i in range(workers)])


def tune(tokens_list: list[int]) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    begin = time.time()
    tokens_for = {}  # the GEMM kernels depend on BLOCK_M and the config, not on the token count
    for tokens in tokens_list:
        for block_m in tune_block_ms(tokens):
            tokens_for.setdefault(block_m, tokens)
    jobs = []
    for block_m, tokens in tokens_for.items():
        gate_up, down = gemm_candidates(block_m, False), gemm_candidates(block_m, True)
        jobs += [(tokens, M.Config(block_m, gate_up[i % len(gate_up)], down[i % len(down)]))
                 for i in range(max(len(gate_up), len(down)))]
    precompile(jobs)
    print(f"compiled {len(jobs)} configs in {time.time() - begin:.0f} s", flush=True)

    gate_up_w, down_w = experts_weights("cuda")
    gpu = "H200" if "H200" in torch.cuda.get_device_name() else "H100"
    entries = {}
    for tokens in tokens_list:
        x, ids, weights = routed_tokens(tokens, EXPERTS, HIDDEN, "cuda", seed=tokens)
        start = M.tuned_config(tokens, TOP_K, EXPERTS, INTER, HIDDEN, DTYPE, x.device)

        def run_us(config):
            try:
                return time_us(lambda: M.moe_experts_triton(x, ids, weights, gate_up_w, down_w, config=config), (),
                               rep_ms=20)[0]
            except Exception:  # noqa: BLE001 (out of resources)
                return float("inf")

        start_us = run_us(start)
        best = (start_us, start)
        for block_m in tune_block_ms(tokens):
            config = M.Config(block_m, gemm_candidates(block_m, False)[0], gemm_candidates(block_m, True)[0])
            for field in ("gate_up", "down"):  # one GEMM at a time, the other at its best so far
                timed = [(run_us(c), c) for c in (config._replace(**{field: g})
                                                  for g in gemm_candidates(block_m, field == "down"))]
                config = min(timed)[1]
            best = min(best, (run_us(config), config))
        us, config = best
        entries[(triton.next_power_of_2(tokens), EXPERTS, INTER, HIDDEN, gpu)] = (
            config.block_m, tuple(config.gate_up), tuple(config.down))
        print(f"{tokens} tokens: {us:.1f} µs (the table's or default config: {start_us:.1f} µs) with {config}",
              flush=True)
    print(f"\ntuned in {time.time() - begin:.0f} s; paste into gemma4_fx/replacements/moe_experts_configs.py:\n")
    print("CONFIGS = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in entries.items()) + "}")


# --------------------------------------------------------------------------------------------------------------------
# --smoke: the script's path on CPU with tiny widths


def smoke() -> None:
    """fp32: the interpreter truncates bf16 casts, where the GPU rounds."""
    experts, inter, hidden = 8, 24, 40
    gate_up, down = experts_weights("cpu", experts, inter, hidden, torch.float32)
    grouped, loop = hf_experts("grouped_mm", gate_up, down), hf_experts("eager", gate_up, down)
    rows = []
    for tokens in (1, 9):
        x, ids, weights = routed_tokens(tokens, experts, hidden, "cpu", seed=tokens, dtype=torch.float32)
        with torch.no_grad():
            ours = M.moe_experts_triton(x, ids, weights, gate_up, down)
            in_order = M.moe_experts_triton(x, ids, weights, gate_up, down, expert_order=True)
            rows.append({"tokens": tokens, **accuracy(ours, M.moe_experts_reference(x, ids, weights, gate_up, down)),
                         "bitwise % vs grouped_mm": accuracy(ours, grouped(x, ids, weights))["bitwise %"],
                         "eager's order: bitwise % vs hf eager":
                             accuracy(in_order, loop(x, ids, weights))["bitwise %"]})
    print(markdown(rows))
    print({tokens: tune_block_ms(tokens) for tokens in TOKENS}, len(gemm_candidates(16, False)),
          len(gemm_candidates(128, True)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune", action="store_true", help="sweep block configs and print the table's entries")
    parser.add_argument("--profile", action="store_true", help="our kernels one by one under torch.profiler")
    parser.add_argument("--smoke", action="store_true", help="tiny widths on CPU under the Triton interpreter")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS, help="token counts (default: %(default)s)")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    elif args.tune:
        tune(args.tokens)
    elif args.profile:
        profile(args.tokens)
    else:
        benchmark(args.tokens)


if __name__ == "__main__":
    main()
