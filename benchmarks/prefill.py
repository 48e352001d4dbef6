"""Gemma-4 prefill with and without YOCO: eager, Inductor, gemma4_fx without `yoco`, gemma4_fx with it.

    python benchmarks/prefill.py [--preset e2b e4b] [--shapes 1x512 1x2048 1x8192 8x1024] [--variants ...]
                                 [--cuda-graph] [--no-cache] [--layers N] [--budget 220] [--json rows.json]
    python benchmarks/prefill.py --preset tiny-e2b --device cpu --dtype float32 --shapes 1x64 2x32   # a dry run

A prefill as HF `generate` runs it: `model(input_ids, logits_to_keep=1, use_cache=True)` with the DynamicCache the
model makes. Random weights at the published widths and full depth. Each variant is compiled once with dynamic
shapes (Dynamo still specialises batch 1 apart from batch 8) and timed as the median of CUDA-event timings after a
warm-up. Its last-token logits are compared with its partner without YOCO where that ran, else with eager's (max
|diff| / max |eager| and whether the greedy token agrees). The floor is 2 x (weights of the matmuls each token goes
through) x tokens over the bf16 matmul rate measured here; with YOCO the tokens that go through the KV-shared
layers are the kept ones only. Attention's own FLOPs are left out of the floor. A time budget stops the run early
with the rows it has.

Compile time decides what fits in a lease: on an H100 host, Inductor took 218 s to compile E2B at full depth with
dynamic shapes, so a run of every variant at full depth needs about 15 minutes (or `--layers` to cut the depth;
keep the KV-shared share of layers, e.g. 14 layers of which 8 shared for E2B). The "graph" variants cost one Dynamo
trace each (about 20 s for E2B) and isolate the pass. `--cuda-graph` needs `--no-cache`: HF's DynamicCache copies a
CPU tensor in prefill, which a CUDA graph cannot hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.gemma4 import modeling_gemma4  # noqa: E402

import gemma4_fx  # noqa: E402
import gemma4_fx.passes.yoco  # noqa: E402

# "graph": Dynamo's graph run op by op (eager kernels, no compiler): with "graph+yoco" it isolates the pass, and it
# costs no compile time. --cuda-graph replays every compiled variant from a CUDA graph (no launch overhead).
VARIANTS = ("eager", "graph", "graph+yoco", "inductor", "gemma4_fx", "gemma4_fx+yoco")
# A variant's logits are checked against its partner without YOCO where that ran (same kernels), else eager's:
# random bf16 weights at full depth amplify any change of kernel (Inductor's, SDPA's) into large logit differences.
REFERENCE = {"graph+yoco": "graph", "gemma4_fx+yoco": "gemma4_fx"}
YOCO_PAIRS = (("graph", "graph+yoco"), ("inductor", "gemma4_fx+yoco"), ("gemma4_fx", "gemma4_fx+yoco"))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, tokens = text.partition("x")
    if not (batch.isdigit() and tokens.isdigit()) or int(batch) < 1 or int(tokens) < 1:
        raise argparse.ArgumentTypeError(f"shape: expected BATCHxTOKENS such as 1x2048, got {text!r}")
    return int(batch), int(tokens)


def backend(variant: str):
    """The torch.compile backend of a variant; our CUDA graphs are off so only the graph rewrites differ."""
    if variant == "inductor":
        return "inductor"
    if variant.startswith("graph"):
        return gemma4_fx.passes.yoco.apply if variant == "graph+yoco" else lambda gm, example_inputs: gm
    names = [name for name in (*gemma4_fx.GRAPH_PASSES, *gemma4_fx.PATTERNS)
             if variant == "gemma4_fx+yoco" or name != "yoco"]
    return gemma4_fx.Gemma4Backend(patterns=names, cudagraphs=None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def cuda_graph(fn):
    """`fn` captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def matmul_tflops(device, dtype) -> float:
    """Measured rate of a large matrix product (random data) in this dtype."""
    size = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * size**3 / ms / 1e9


def matmul_weights(model) -> tuple[int, int, int]:
    """(weights every token goes through, of those the ones in the KV-shared layers, the LM head's): linear layers
    only; embedding lookups touch one row per token."""
    first_shared = model.config.num_hidden_layers - model.config.num_kv_shared_layers
    every = shared = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        every += module.weight.numel()
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= first_shared:
            shared += module.weight.numel()
    return every, shared, model.lm_head.weight.numel()


def floor_ms(weights, batch: int, tokens: int, tflops: float, yoco: bool) -> float:
    every, shared, head = weights
    flops = 2 * (every * batch * tokens + head * batch)
    if yoco:
        flops -= 2 * shared * batch * (tokens - 1)
    return flops / tflops / 1e9


def run_preset(preset, args, device, dtype, tflops, deadline, rows):
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    begin = time.perf_counter()
    model = gemma4_fx.build_model(preset, dtype=dtype, device=device, **overrides)
    config = model.config
    print(f"\n{preset}: {config.num_hidden_layers} layers ({config.num_kv_shared_layers} KV-shared), hidden "
          f"{config.hidden_size}, built in {time.perf_counter() - begin:.1f} s", flush=True)
    weights = matmul_weights(model)
    inputs = {shape: torch.randint(0, config.vocab_size, shape, device=device,
                                   generator=torch.Generator(device=device).manual_seed(sum(shape)))
              for shape in args.shapes}
    outputs = {}  # (variant, shape) -> last-token logits
    for variant in args.variants:
        if time.perf_counter() > deadline:
            print(f"  {variant}: skipped (time budget)", flush=True)
            continue
        torch._dynamo.reset()
        compiler = None if variant == "eager" else backend(variant)
        forward = model if compiler is None else torch.compile(model, backend=compiler, dynamic=True)
        for shape in args.shapes:
            if time.perf_counter() > deadline:
                print(f"  {variant} {shape}: skipped (time budget)", flush=True)
                continue
            input_ids = inputs[shape]

            def prefill():
                with torch.no_grad():
                    return forward(input_ids, logits_to_keep=1, use_cache=not args.no_cache).logits

            begin = time.perf_counter()
            logits = prefill()
            synchronize(device)
            first_s = time.perf_counter() - begin
            timed, replayed = prefill, False
            if args.cuda_graph and compiler is not None and device.type == "cuda":
                try:
                    timed, replayed = cuda_graph(prefill), True
                except Exception as error:  # noqa: BLE001 (then timed as plain calls, and said so)
                    print(f"  {variant}: no CUDA graph ({type(error).__name__}: {str(error)[:120]})")
            ms = median_ms(timed, device, args.warmup, args.repeats)
            row = dict(preset=preset, layers=config.num_hidden_layers, variant=variant, batch=shape[0],
                       tokens=shape[1], ms=ms, first_call_s=first_s, cuda_graph=replayed,
                       floor_ms=floor_ms(weights, *shape, tflops, yoco=False),
                       floor_yoco_ms=floor_ms(weights, *shape, tflops, yoco=True))
            outputs[(variant, shape)] = logits
            reference = REFERENCE.get(variant, "eager") if (REFERENCE.get(variant), shape) in outputs else "eager"
            if variant != "eager" and (reference, shape) in outputs:
                expected = outputs[(reference, shape)]
                row["vs"] = reference
                row["max_rel_err"] = ((logits.double() - expected.double()).abs().max()
                                      / expected.double().abs().max()).item()
                row["same_token"] = bool(torch.equal(logits.argmax(-1), expected.argmax(-1)))
            if isinstance(compiler, gemma4_fx.Gemma4Backend):
                row["yoco_layers"] = compiler.report.counts.get("yoco", 0)
                row["fallbacks"] = len(compiler.report.fallbacks)
            rows.append(row)
            print(f"  {variant:<15} {shape[0]}x{shape[1]:<6} {ms:9.2f} ms{' (CUDA graph)' if replayed else ''}"
                  f"  (first call {first_s:6.1f} s)"
                  + (f"  vs {row['vs']}: rel err {row['max_rel_err']:.2e}, same token {row['same_token']}"
                     if "same_token" in row
                     else "") + (f"  yoco layers {row['yoco_layers']}" if "yoco_layers" in row else ""), flush=True)
        if isinstance(compiler, gemma4_fx.Gemma4Backend) and compiler.report.fallbacks:
            print("  fallbacks:", *compiler.report.fallbacks, sep="\n    ")
    del model
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    pairs = [(a, b) for a, b in YOCO_PAIRS if a in variants and b in variants]
    header = " | ".join(f"{v} ms" for v in variants) + "".join(f" | {b} vs {a}" for a, b in pairs)
    lines = [f"| model | shape | {header} | floor ms (no yoco / yoco) |",
             "|---" * (3 + len(variants) + len(pairs)) + "|"]
    for key in dict.fromkeys((r["preset"], r["layers"], r["batch"], r["tokens"]) for r in rows):
        by = {r["variant"]: r for r in rows if (r["preset"], r["layers"], r["batch"], r["tokens"]) == key}
        cells = [f"{by[v]['ms']:.2f}" if v in by else "-" for v in variants]
        cells += [f"{by[a]['ms'] / by[b]['ms']:.2f}x" if a in by and b in by else "-" for a, b in pairs]
        any_row = next(iter(by.values()))
        lines.append(f"| {key[0]} ({key[1]} layers) | {key[2]}x{key[3]} | " + " | ".join(cells)
                     + f" | {any_row['floor_ms']:.2f} / {any_row['floor_yoco_ms']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["e2b", "e4b"], choices=sorted(gemma4_fx.PRESETS))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 512), (1, 2048), (1, 8192), (8, 1024)],
                        metavar="BATCHxTOKENS")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--layers", type=int, default=None, help="depth (default: the preset's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--no-cache", action="store_true", help="use_cache=False (default: a DynamicCache)")
    parser.add_argument("--cuda-graph", action="store_true", help="time compiled variants as CUDA graph replays")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=220.0, help="seconds; later work is skipped past it")
    parser.add_argument("--json", default=None, help="write every row there")
    args = parser.parse_args()
    if args.cuda_graph and not args.no_cache:
        parser.error("cuda-graph: needs --no-cache (HF's DynamicCache copies a CPU tensor during prefill)")
    if args.variants[0] != "eager" and "eager" in args.variants:
        parser.error("variants: eager must come first (the others are checked against it)")
    deadline = time.perf_counter() + args.budget
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("device: CUDA is not available here (try --device cpu with a tiny preset)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} (model drops rows before its "
          f"KV-shared layers itself: {hasattr(modeling_gemma4.Gemma4TextModel, '_maybe_slice_kv_shared_inputs')}),"
          f" {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    tflops = matmul_tflops(device, dtype)
    print(f"matmul rate: {tflops:.3g} TFLOP/s ({args.dtype})", flush=True)
    rows = []
    for preset in args.preset:
        if time.perf_counter() > deadline:
            print(f"{preset}: skipped (time budget)")
            continue
        run_preset(preset, args, device, dtype, tflops, deadline, rows)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(tflops=tflops, transformers=transformers.__version__, rows=rows), file, indent=1)


if __name__ == "__main__":
    main()
