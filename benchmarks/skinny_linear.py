"""Decode-step linears that share their input (q/k/v; the MLP's gate and up with gelu_tanh(gate) * up) at E2B/E4B
widths: gemma4_fx's one-launch `skinny_linear` against separate cuBLAS linears and Inductor's.

    python benchmarks/skinny_linear.py            # the table (a minute or two on an H200)
    python benchmarks/skinny_linear.py --sweep    # our block configs per shape: what default_config should pick
    python benchmarks/skinny_linear.py --singles  # also the linears a decode step runs alone: would one launch of
                                                  # ours beat cuBLAS's there too? (with --sweep: their best configs)
    python benchmarks/skinny_linear.py --smoke    # tiny widths on CPU under the Triton interpreter: does it run?

Shapes: every distinct group in the layers of `--presets` (default E2B and E4B): q/k/v of sliding and full layers,
where a layer computes its own k/v; gate/up, double-wide in E2B's KV-shared layers. Rows M = 1, 8, 32, bf16. Each
variant runs as a decode step runs it: one CUDA graph holds a call per copy of the weights, enough copies for 256 MB
(at least 4), back to back, so each call finds its weights cold in L2 and no launch gap before it; the median replay
(`triton.testing.do_bench`) over the copies is the time per call. The floor is the bytes that must move (weights, x,
outputs) over the copy bandwidth measured here. "bitwise %" compares ours with cuBLAS's outputs (they differ in the
order of the sum along K). Inductor's compiled variant is timed for the gated groups only: elsewhere it calls the
same cuBLAS GEMMs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if "--smoke" in sys.argv:  # Triton picks the interpreter when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from transformers import Gemma4ForCausalLM  # noqa: E402

from benchmarks.common import copy_bandwidth, graph_stack_us, markdown  # noqa: E402
from gemma4_fx import presets  # noqa: E402
from gemma4_fx.replacements import skinny_linear as S  # noqa: E402
from gemma4_fx.replacements.launch import SMS, sm_count  # noqa: E402

ROWS = [1, 8, 32]
DTYPE = torch.bfloat16


def shapes(preset_names=("e2b", "e4b"), singles: bool = False, only=()
           ) -> list[tuple[str, int, tuple[int, ...], bool, int]]:
    """(name, hidden, widths, gated, layers) of each distinct group of linears that share an input in the presets'
    decoder layers, read off the model built on the meta device (KV-shared layers have no k/v projections; E2B's
    have a double-wide MLP); with `singles`, also the linears a decode step runs alone (o_proj, down_proj, a q_proj
    without k/v, the PLE gate and projection, the per-layer-input projection), which stay cuBLAS's today; `only`:
    the groups whose name holds one of these words."""
    groups: dict[tuple, int] = {}

    def add(name, linears, gated):
        key = (name, linears[0].in_features, tuple(p.out_features for p in linears), gated)
        groups[key] = groups.get(key, 0) + 1

    for preset in preset_names:
        with torch.device("meta"):
            model = Gemma4ForCausalLM(presets.text_config(preset))
        for layer in model.model.layers:
            attention = [p for p in (getattr(layer.self_attn, name, None) for name in ("q_proj", "k_proj", "v_proj"))
                         if p is not None]
            for name, linears, gated in (("q/k/v", attention, False),
                                         ("gate/up", [layer.mlp.gate_proj, layer.mlp.up_proj], True)):
                if len(linears) > 1 or singles:
                    add(f"{preset} {name if len(linears) > 1 else 'q'}", linears, gated)
            if singles:
                for name in ("self_attn.o_proj", "mlp.down_proj", "per_layer_input_gate", "per_layer_projection"):
                    linear = layer.get_submodule(name) if hasattr(layer, name.split(".")[0]) else None
                    if linear is not None:
                        add(f"{preset} {name.split('.')[-1]}", [linear], False)
        if singles and hasattr(model.model, "per_layer_model_projection"):
            add(f"{preset} per_layer_model_projection", [model.model.per_layer_model_projection], False)
    return [(*key, layers) for key, layers in groups.items() if not only or any(word in key[0] for word in only)]


def inputs(rows: int, hidden: int, widths, device, dtype=DTYPE):
    g = torch.Generator(device=device).manual_seed(rows * 7 + hidden)
    x = torch.randn(rows, hidden, device=device, generator=g).to(dtype)
    weights = [(torch.randn(n, hidden, device=device, generator=g) * hidden**-0.5).to(dtype) for n in widths]
    return x, weights


STACK_BYTES = 256 << 20  # several times any GPU's L2


def stack_us(fn, x, weights, gated, rep: int = 200) -> float:
    """µs per call of `fn(x, weights', gated)` over copies of the weights, as the layers of a step call it."""
    copies = max(4, -(-STACK_BYTES // sum(w.numel() * w.element_size() for w in weights)))
    return graph_stack_us(fn, [(x, [w.clone() for w in weights], gated) for _ in range(copies)], rep=rep)


def separate(x, weights, gated):
    """What eager runs: one linear per weight (gated: then gelu and the product, two more launches)."""
    ys = [F.linear(x, w) for w in weights]
    return [F.gelu(ys[0], approximate="tanh") * ys[1]] if gated else ys


def floor_bytes(x, weights, gated) -> int:
    outputs = x.shape[0] * (weights[0].shape[0] if gated else sum(w.shape[0] for w in weights))
    return (sum(w.numel() for w in weights) + x.numel() + outputs) * x.element_size()


def benchmark(rows_list: list[int], preset_names, singles: bool = False, only=()) -> None:
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s", flush=True)
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(separate, dynamic=False)
    variants = {"ours": lambda x, ws, gated: torch.ops.gemma4_fx.skinny_linear(x, ws, gated),
                "cuBLAS separate": separate, "compiled separate": compiled}
    rows_out = []
    groups = shapes(preset_names, singles=singles, only=only)
    for (name, hidden, widths, gated, layers), rows in itertools.product(groups, rows_list):
        x, weights = inputs(rows, hidden, widths, "cuda")
        floor = floor_bytes(x, weights, gated) / bandwidth * 1e6
        with torch.no_grad():
            ours, theirs = S.skinny_linear_triton(x, weights, gated), separate(x, weights, gated)
        config = S.config_for(rows, hidden, list(widths), DTYPE, gated, x.device)  # what "ours" runs
        row = {"group": name, "layers": layers, "M": rows, "K": hidden, "N": "+".join(map(str, widths)),
               "floor µs": floor,
               "config (N, K, split, warps, stages)": tuple(config),
               "bitwise %": 100 * sum((a == b).sum().item() for a, b in zip(ours, theirs)) / sum(
                   a.numel() for a in ours),
               "max rel err": max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                  for a, b in zip(ours, theirs))}
        for variant, fn in variants.items():
            if variant == "compiled separate" and not gated:
                continue
            us = stack_us(fn, x, weights, gated)
            row[variant] = f"{us:.1f} ({us / floor:.2f}x)"
            if variant == "ours":
                row["ours TB/s"] = floor_bytes(x, weights, gated) / us * 1e-6
        rows_out.append(row)
        print(row, flush=True)
    print("\n### Linears sharing their input at decode rows, bf16: µs (times the floor)\n")
    print(markdown(rows_out))


SWEEP = {"block_n": (16, 32, 64, 128), "block_k": (128, 256), "split_k": (1, 2, 4, 8),
         "num_warps": (4, 8), "num_stages": (3, 4)}


def fits(config: S.Config, rows: int, gated: bool) -> bool:
    """Whether the config's stages fit 200 KB of shared memory."""
    return config.num_stages * (S.block_m(rows) + (2 if gated else 1) * config.block_n) * config.block_k * 2 <= 200 << 10


def candidates(rows: int, hidden: int, widths, gated: bool) -> list[S.Config]:
    """`default_config` and every config of the SWEEP grid that fits, one per effective K split."""
    default = S.default_config(rows, hidden, list(widths), DTYPE, gated, sm_count(torch.device("cuda")))
    seen, out = set(), []
    for config in [default, *itertools.starmap(S.Config, itertools.product(*SWEEP.values()))]:
        effective = config._replace(split_k=S.split_runs(triton.cdiv(hidden, config.block_k), config.split_k))
        if fits(effective, rows, gated) and effective not in seen:
            seen.add(effective)
            out.append(effective)
    return out


def _compile(job) -> None:
    """One call per config, in a worker process: fills Triton's on-disk cache, so the timing process only loads."""
    rows, hidden, widths, gated, configs = job
    x, weights = inputs(rows, hidden, widths, "cuda")
    for config in configs:
        try:
            S.skinny_linear_triton(x, weights, gated, config=config)
        except Exception:  # noqa: BLE001 (out of resources: the timing reports it)
            pass
    torch.cuda.synchronize()


def sweep(rows_list: list[int], preset_names, singles: bool = False, only=()) -> None:
    """Every config of the grid per (shape, rows), compiled side by side in worker processes, then timed one by one
    as `stack_us` times them; prints cuBLAS's and the default's times and the best few."""
    import multiprocessing

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    work = [(rows, hidden, widths, gated, name) for (name, hidden, widths, gated, _), rows
            in itertools.product(shapes(preset_names, singles=singles, only=only), rows_list)]
    jobs = [(rows, hidden, widths, gated, chunk) for rows, hidden, widths, gated, _ in work
            for configs in [candidates(rows, hidden, widths, gated)] for chunk in (configs[0::2], configs[1::2])]
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), max(1, (os.cpu_count() or 2) - 2))) as pool:
        pool.map(_compile, jobs)
    gpu, entries = torch.cuda.get_device_name().split()[1], []
    for rows, hidden, widths, gated, name in work:
        x, weights = inputs(rows, hidden, widths, "cuda")
        timed = []
        for config in candidates(rows, hidden, widths, gated):
            try:
                us = stack_us(lambda x, ws, gated, c=config: S.skinny_linear_triton(x, ws, gated, config=c),
                              x, weights, gated, rep=50)
            except Exception:  # noqa: BLE001 (out of resources)
                us = float("inf")
            timed.append((us, tuple(config)))
        default_us, cublas_us = timed[0][0], stack_us(separate, x, weights, gated, rep=50)
        best = sorted(timed)[:3]
        print(f"{name} M={rows}: cuBLAS {cublas_us:.1f} µs, default {timed[0][1]} {default_us:.1f} µs; best "
              + ", ".join(f"{c} {us:.1f} µs" for us, c in best), flush=True)
        entries.append(f"    ({hidden}, {widths}, {gated}, {gpu!r}): {best[0][1]},  # {name}, M={rows}: "
                       f"{best[0][0]:.1f}, default {default_us:.1f}, cuBLAS {cublas_us:.1f}")
    print("\n".join(["entries:", *entries]))


def smoke(singles: bool = False) -> None:
    """Tiny widths, fp32 (the interpreter truncates bf16 casts, where the GPU rounds); the default split rule and a
    forced split; the GPU table's shapes listed."""
    rows_out = []
    split = S.Config(16, 32, 4, 4, 2)
    for rows, widths, gated, config in [(1, (40, 24, 24), False, None), (3, (40, 24, 24), False, split),
                                        (8, (48, 48), True, None), (8, (48, 48), True, split)]:
        x, weights = inputs(rows, 128, widths, "cpu", torch.float32)
        ours = S.skinny_linear_triton(x, weights, gated, config=config)
        ref = S.skinny_linear_reference(x, weights, gated)
        rows_out.append({"M": rows, "N": "+".join(map(str, widths)), "gated": gated, "config": config or "default",
                         "max rel err": max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))})
    print(markdown(rows_out))
    print(markdown([{"group": name, "layers": layers, "K": hidden, "N": "+".join(map(str, widths)),
                     "default config at M=1 (132 SMs)": tuple(S.default_config(1, hidden, list(widths), DTYPE, gated,
                                                                               SMS))}
                    for name, hidden, widths, gated, layers in shapes(singles=singles)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time block configs per shape, print the best")
    parser.add_argument("--smoke", action="store_true", help="tiny widths on CPU under the Triton interpreter")
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS, help="rows M (default: %(default)s)")
    parser.add_argument("--only", nargs="*", default=(), help="groups whose name holds one of these words "
                        "(e.g. down_proj e4b)")
    parser.add_argument("--presets", nargs="+", default=["e2b", "e4b"], help="models whose linears to take "
                        "(default: %(default)s)")
    parser.add_argument("--singles", action="store_true",
                        help="also the linears a decode step runs alone (o_proj, down_proj, ...): one launch each")
    args = parser.parse_args()
    if args.smoke:
        smoke(args.singles)
    elif args.sweep:
        sweep(args.rows, args.presets, args.singles, args.only)
    else:
        benchmark(args.rows, args.presets, args.singles, args.only)


if __name__ == "__main__":
    main()
