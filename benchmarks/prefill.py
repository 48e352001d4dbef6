"""Gemma-4 prefill with and without YOCO: eager, Inductor, gemma4_fx without `yoco`, gemma4_fx with it.

    python benchmarks/prefill.py [--preset e2b e4b] [--shapes 1x512 1x2048 1x8192 8x1024] [--variants ...]
                                 [--cuda-graph] [--cudagraphs auto] [--no-cache] [--profile] [--timeline] [--layers N]
                                 [--rounds N] [--deadline 540] [--json rows.json] [--images N [N ...] --image-size HxW]
    python benchmarks/prefill.py --preset tiny-e2b --device cpu --dtype float32 --shapes 1x64 2x32   # a dry run
    python benchmarks/prefill.py --preset e4b --images 2 --image-size 768x768 --shapes 1x512   # a multimodal prompt
    python benchmarks/prefill.py --preset e4b --images 1 4 --shapes 1x512 1x2048   # 1 image + 512, 4 images + 2048

A prefill as HF `generate` runs it: `model(input_ids, logits_to_keep=1, use_cache=True)` with the DynamicCache the
model makes. Random weights at the published widths and full depth (`--layers` cuts it, keeping the preset's share
of KV-shared layers). Each variant is compiled once with dynamic shapes (Dynamo still specialises batch 1 apart from
batch 8) and timed as the median of CUDA-event timings after a warm-up. Its last-token logits are compared with its
partner without YOCO where that ran, else with eager's (max |diff| / max |eager| and whether the greedy token
agrees). The floor is 2 x (weights of the matmuls each token goes through) x tokens over the bf16 matmul rate
measured here; with YOCO the tokens that go through the KV-shared layers are the kept ones only. Attention's own
FLOPs are left out of the floor.

Compiling E2B at full depth takes Inductor minutes, so every (preset, variant) runs in its own process over one
shared copy of the weights (`common.run_jobs`): they compile side by side, then time one at a time; `--deadline`
bounds the whole run. The host these jobs share can drift over a run by more than the gaps between variants
(host-bound ones most): `--rounds N` times every job in N rounds that take turns with the other jobs' and reports
the median of the rounds' medians and their range. The "graph" variants run Dynamo's graph op by op (no compiler)
and isolate the pass.
Our variants run without our CUDA graphs unless `--cudagraphs auto` (the backend's default) says otherwise;
`--cuda-graph` instead captures each whole compiled call, and needs `--no-cache` (HF's DynamicCache copies a CPU
tensor in prefill, which a whole-call graph cannot hold; our runtime runs that copy between its graphs).
`--profile` prints, per variant and shape, the GPU's busy time against the wall time, the top kernels and host ops,
and where the GPU waits between kernels (and the same for the vision encoder alone, with `--images`): up to ~2k
tokens a prefill without graphs is bound by the host, and its wall time varies between processes.
`--timeline` prints, for our variants with CUDA graphs, when the host and the GPU reached each captured piece of one
unprofiled call (`common.piece_timeline`): the GPU's start (Dynamo's entry before it) and where it waited for the host.

`--images N` prefills `Gemma4ForConditionalGeneration` (the preset with its vision encoder) on N random images of
`--image-size` (laid out as the image processor does, 280 soft tokens' budget) between the shape's text tokens, in
each sequence, compiled and run under `gemma4_fx.capture_data_dependent_ops()` (one graph), except reduce-overhead:
on the one graph Inductor's CUDA graph trees fail (torch 2.11: an `AssertionError`, a graph input neither tensor nor
int), so it gets Dynamo's default graph breaks (with which it ran at 1 image; 4 images failed either way). The
vision encoder alone (`get_image_features`, compiled by the same variant) is timed too, for its share of the
prefill. With images the floor counts the prompt's rows as the language model sees them (each image's soft tokens
included) and the vision encoder's linears over its patches (padding patches included, as it computes them).
Several counts (`--images 1 4`) pair with the shapes, one each; every (variant, count) is a job of its own.
"""

from __future__ import annotations

import argparse
import contextlib
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
from gemma4_fx.multimodal import capture_data_dependent_ops  # noqa: E402
from benchmarks.common import (cuda_graph, image_prompt, kernel_profile, parse_image_size, piece_timeline,  # noqa: E402
                               rebuild, run_jobs, shareable, synchronize)

# "graph": Dynamo's graph run op by op (eager kernels, no compiler): with "graph+yoco" it isolates the pass, and it
# costs no compile time. --cuda-graph replays every compiled variant from a CUDA graph (no launch overhead).
VARIANTS = ("eager", "graph", "graph+yoco", "inductor", "reduce-overhead", "gemma4_fx", "gemma4_fx+yoco",
            "gemma4_fx, no prefill_attention", "gemma4_fx+yoco, no prefill_attention")
# A variant's logits are checked against its partner without YOCO where that ran (same kernels), else eager's:
# random bf16 weights at full depth amplify any change of kernel (Inductor's, SDPA's) into large logit differences.
REFERENCE = {"graph+yoco": "graph", "gemma4_fx+yoco": "gemma4_fx"}
YOCO_PAIRS = (("graph", "graph+yoco"), ("inductor", "gemma4_fx+yoco"), ("reduce-overhead", "gemma4_fx+yoco"),
              ("gemma4_fx", "gemma4_fx+yoco"))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, tokens = text.partition("x")
    if not (batch.isdigit() and tokens.isdigit()) or int(batch) < 1 or int(tokens) < 1:
        raise argparse.ArgumentTypeError(f"shape: expected BATCHxTOKENS such as 1x2048, got {text!r}")
    return int(batch), int(tokens)


def backend(variant: str, emulate_precision_casts: bool = True, cudagraphs: str | None = None):
    """The torch.compile backend of a variant; our CUDA graphs off by default, so only the graph rewrites differ."""
    if variant in ("inductor", "reduce-overhead"):
        return "inductor"
    if variant.startswith("graph"):
        return gemma4_fx.passes.yoco.apply if variant == "graph+yoco" else lambda gm, example_inputs: gm
    ours, _, without = variant.partition(", no ")
    names = [name for name in (*gemma4_fx.GRAPH_PASSES, *gemma4_fx.PATTERNS)
             if (ours == "gemma4_fx+yoco" or name != "yoco") and name != without]
    return gemma4_fx.Gemma4Backend(patterns=names, cudagraphs=cudagraphs,
                                   emulate_precision_casts=emulate_precision_casts)


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


def matmul_tflops(device, dtype) -> float:
    """Measured rate of a large matrix product (random data) in this dtype."""
    size = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * size**3 / ms / 1e9


def matmul_weights(model) -> tuple[int, int, int, int]:
    """(weights every token goes through, of those the ones in the KV-shared layers, the LM head's, the vision
    encoder's that every patch goes through): linear layers only; embedding lookups touch one row per token."""
    text = model.config.get_text_config()
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    language_model = "model.language_model." if hasattr(model.model, "language_model") else "model."
    every = shared = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(language_model):
            continue
        every += module.weight.numel()
        parts = name[len(language_model):].split(".")
        if parts[0] == "layers" and int(parts[1]) >= first_shared:
            shared += module.weight.numel()
    vision = getattr(model.model, "vision_tower", None)
    encoder = sum(m.weight.numel() for m in vision.modules() if isinstance(m, torch.nn.Linear)) if vision else 0
    return every, shared, model.lm_head.weight.numel(), encoder


def floor_ms(weights, batch: int, tokens: int, tflops: float, yoco: bool, patches: int = 0) -> float:
    """`tokens` per sequence through the language model, `patches` in all through the vision encoder."""
    every, shared, head, encoder = weights
    flops = 2 * (every * batch * tokens + head * batch + encoder * patches)
    if yoco:
        flops -= 2 * shared * batch * (tokens - 1)
    return flops / tflops / 1e9


def job(spec, turn) -> dict:
    """One variant of one model at the shapes of one batch size, in a process of its own (see `common.run_jobs`):
    compiles (once: with dynamic shapes where there are several lengths) and runs every shape once (and captures it
    with --cuda-graph), then, on its turn, times them. Returns per shape the median ms, the first call's seconds and
    the last-token logits."""
    variant, shapes, images_per_prompt, shared, args = spec
    model = rebuild(shared)
    device = model.device
    compiler = None if variant == "eager" else backend(variant, args.emulate_precision_casts, args.cudagraphs)
    mode = "reduce-overhead" if variant == "reduce-overhead" else None
    forward = model if compiler is None else torch.compile(model, backend=compiler, mode=mode, dynamic=len(shapes) > 1)
    runs, encoders, result = {}, {}, {"shapes": {}}
    traced_sizes = contextlib.nullcontext if variant == "reduce-overhead" else capture_data_dependent_ops
    for shape in shapes:
        if images_per_prompt:
            input_ids, images = image_prompt(model, *shape, images_per_prompt, args.image_size, seed=sum(shape))
            encode = model.model.get_image_features if compiler is None else \
                torch.compile(model.model.get_image_features, backend=compiler, mode=mode)
        else:
            images, encode = {}, None
            input_ids = torch.randint(0, model.config.vocab_size, shape, device=device,
                                      generator=torch.Generator(device=device).manual_seed(sum(shape)))

        def prefill(input_ids=input_ids, images=images):
            with torch.no_grad(), traced_sizes():
                return forward(input_ids, **images, logits_to_keep=1, use_cache=not args.no_cache).logits

        if encode is not None:
            def encoder(encode=encode, images=images):
                with torch.no_grad(), traced_sizes():
                    return encode(images["pixel_values"], images["image_position_ids"])

            encoder()
            encoders[shape] = encoder

        begin = time.perf_counter()
        logits = prefill()
        synchronize(device)
        out = result["shapes"][shape] = {"first_call_s": time.perf_counter() - begin, "cuda_graph": False,
                                         "logits": logits.float().cpu().numpy(), "rows": input_ids.shape[1],
                                         "patches": images["pixel_values"].shape[:2].numel() if images else 0}
        runs[shape] = prefill
        if args.cuda_graph and compiler is not None and mode is None and device.type == "cuda":
            try:
                runs[shape], out["cuda_graph"] = cuda_graph(prefill), True
            except Exception as error:  # noqa: BLE001 (then timed as plain calls, and said so)
                print(f"  {variant}: no CUDA graph ({type(error).__name__}: {str(error)[:120]})")
    rounds = {shape: {"ms": [], "encoder_ms": []} for shape in runs}
    for _ in range(args.rounds):  # turns taken in rounds interleave with the other jobs' (common.run_jobs)
        with turn() as alone:
            for shape, run in runs.items():
                rounds[shape]["ms"].append(median_ms(run, device, args.warmup, args.repeats))
                if shape in encoders:
                    rounds[shape]["encoder_ms"].append(median_ms(encoders[shape], device, args.warmup, args.repeats))
    timeline = args.timeline and device.type == "cuda" and args.cudagraphs and variant.startswith("gemma4_fx")
    with turn() if args.profile and device.type == "cuda" or timeline else contextlib.nullcontext():
        for shape, run in runs.items():
            out = result["shapes"][shape]
            out["timed_alone"] = alone
            out.update({key: statistics.median(times) for key, times in rounds[shape].items() if times})
            out["rounds_ms"] = (min(rounds[shape]["ms"]), max(rounds[shape]["ms"]))
            if args.profile and device.type == "cuda":
                out["gpu_busy_ms"], out["profile"] = kernel_profile(run, top=args.profile)
                if shape in encoders:
                    out["profile"] += "\n vision encoder alone: " + kernel_profile(encoders[shape], top=args.profile)[1]
            if timeline:
                out["profile"] = "\n".join(filter(None, (out.get("profile"), piece_timeline(run))))
    result["images"] = images_per_prompt
    if isinstance(compiler, gemma4_fx.Gemma4Backend):
        result["yoco_layers"] = compiler.report.counts.get("yoco", 0)
        result["fallbacks"] = compiler.report.fallbacks + compiler.cudagraph_stats.failures
        if args.cudagraphs:
            print(f"{variant}, {images_per_prompt} images: {len(compiler.graph_reports)} graphs compiled; "
                  f"{compiler.cudagraph_stats}".splitlines()[0], flush=True)
        for reason in sorted({f"{skip.pattern}: {skip.reason}" for skip in compiler.report.skipped
                              if skip.pattern == "yoco"}):
            print(f"{variant}, {images_per_prompt} images: YOCO left a graph alone: {reason}", flush=True)
    for reason, count in torch._dynamo.utils.counters["graph_break"].items():  # a break can cost YOCO its cut
        print(f"{variant}, {images_per_prompt} images: graph break ({count}x): {reason[:300]}", flush=True)
    print(f"{model.config.get_text_config().num_hidden_layers} layers, {variant}, {images_per_prompt} images: "
          + ", ".join(f"{b}x{t} {r['ms']:.2f} ms (rounds {r['rounds_ms'][0]:.2f}-{r['rounds_ms'][1]:.2f}; "
                      f"first call {r['first_call_s']:.0f} s"
                      + (f"; vision encoder {r['encoder_ms']:.2f} ms, {r['encoder_ms'] / r['ms']:.0%})"
                         if "encoder_ms" in r else ")")
                      for (b, t), r in result["shapes"].items()), flush=True)
    return result


def rows_of(preset: str, model, results: list[tuple[str, dict | str]], tflops: float) -> list[dict]:
    """A row per (variant, shape) of the (variant, result) of the preset's jobs; a variant's logits are checked
    against its partner's without YOCO where that ran, else eager's."""
    weights, rows = matmul_weights(model), []
    logits = {(variant, shape, result["images"]): out["logits"] for variant, result in results
              if isinstance(result, dict) for shape, out in result["shapes"].items()}
    for variant, result in results:
        if isinstance(result, str):
            print(f"{preset} {variant}: {result}")
            continue
        for fallback in result.get("fallbacks", []):
            print(f"{preset} {variant} fallback: {fallback}")
        for shape, out in result["shapes"].items():
            if "profile" in out:
                print(f"{preset} {variant} {shape[0]}x{shape[1]}: {out['profile']}")
            images = result["images"]
            row = dict(preset=preset, layers=model.config.get_text_config().num_hidden_layers, variant=variant,
                       batch=shape[0], tokens=shape[1], images=images, ms=out["ms"], encoder_ms=out.get("encoder_ms"),
                       timed_alone=out["timed_alone"], gpu_busy_ms=out.get("gpu_busy_ms"),
                       first_call_s=out["first_call_s"], cuda_graph=out["cuda_graph"],
                       floor_ms=floor_ms(weights, shape[0], out["rows"], tflops, yoco=False, patches=out["patches"]),
                       floor_yoco_ms=floor_ms(weights, shape[0], out["rows"], tflops, yoco=True,
                                              patches=out["patches"]))
            reference = REFERENCE.get(variant) if (REFERENCE.get(variant), shape, images) in logits else "eager"
            if variant != "eager" and (reference, shape, images) in logits:
                expected = torch.from_numpy(logits[(reference, shape, images)]).double()
                actual = torch.from_numpy(out["logits"]).double()
                row.update(vs=reference, max_rel_err=((actual - expected).abs().max() / expected.abs().max()).item(),
                           same_token=bool(torch.equal(actual.argmax(-1), expected.argmax(-1))))
                print(f"{preset} {variant} {shape[0]}x{shape[1]} vs {reference}: max rel err {row['max_rel_err']:.2e},"
                      f" same token {row['same_token']}")
            if "yoco_layers" in result:
                row.update(yoco_layers=result["yoco_layers"], fallbacks=len(result["fallbacks"]))
            rows.append(row)
    return rows


def table(rows) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    pairs = [(a, b) for a, b in YOCO_PAIRS if a in variants and b in variants]
    header = " | ".join(f"{v} ms" for v in variants) + "".join(f" | {b} vs {a}" for a, b in pairs)
    lines = [f"| model | shape | {header} | floor ms (no yoco / yoco) |",
             "|---" * (3 + len(variants) + len(pairs)) + "|"]
    encoders = any(r.get("encoder_ms") is not None for r in rows)
    for key in dict.fromkeys((r["preset"], r["layers"], r["batch"], r["tokens"], r["images"]) for r in rows):
        by = {r["variant"]: r for r in rows if (r["preset"], r["layers"], r["batch"], r["tokens"], r["images"]) == key}
        cells = [f"{by[v]['ms']:.2f}{'' if by[v]['timed_alone'] else '*'}" if v in by else "-" for v in variants]
        cells += [f"{by[a]['ms'] / by[b]['ms']:.2f}x" if a in by and b in by else "-" for a, b in pairs]
        any_row = next(iter(by.values()))
        images = f" + {key[4]} images" if key[4] else ""
        lines.append(f"| {key[0]} ({key[1]} layers) | {key[2]}x{key[3]}{images} | " + " | ".join(cells)
                     + f" | {any_row['floor_ms']:.2f} / {any_row['floor_yoco_ms']:.2f} |")
    if encoders:  # the vision encoder alone, compiled by each variant, and its share of that variant's prefill
        lines += ["", "vision encoder alone, ms (share of the prefill):", "",
                  "| model | shape | " + " | ".join(f"{v}" for v in variants) + " |",
                  "|---" * (2 + len(variants)) + "|"]
        for key in dict.fromkeys((r["preset"], r["layers"], r["batch"], r["tokens"], r["images"]) for r in rows
                                 if r.get("encoder_ms") is not None):
            by = {r["variant"]: r for r in rows
                  if (r["preset"], r["layers"], r["batch"], r["tokens"], r["images"]) == key}
            cells = [f"{by[v]['encoder_ms']:.2f} ({by[v]['encoder_ms'] / by[v]['ms']:.0%})"
                     if v in by and by[v].get("encoder_ms") is not None else "-" for v in variants]
            lines.append(f"| {key[0]} ({key[1]} layers) | {key[2]}x{key[3]} + {key[4]} images | "
                         + " | ".join(cells) + " |")
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
    parser.add_argument("--no-emulate-precision-casts", dest="emulate_precision_casts", action="store_false",
                        help="gemma4_fx variants with Gemma4Backend(emulate_precision_casts=False)")
    parser.add_argument("--cudagraphs", default=None, choices=[m for m in gemma4_fx.backend.CUDAGRAPH_MODES if m],
                        help="the gemma4_fx variants' CUDA graphs (default: none)")
    parser.add_argument("--profile", type=int, nargs="?", const=8, default=0, metavar="TOP",
                        help="print where the time of one call goes (CUDA): kernel families and the TOP (default 8) "
                             "kernels")
    parser.add_argument("--timeline", action="store_true",
                        help="gemma4_fx variants with --cudagraphs (CUDA): when the host and the GPU reach each "
                             "captured piece in one call, unprofiled (where the host or the GPU bounds the call)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1,
                        help="timing rounds per job, taken in turn with the other jobs; the median of the rounds' "
                             "medians is reported")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--json", default=None, help="write every row there")
    parser.add_argument("--images", type=int, nargs="+", default=[0],
                        help="images in a multimodal prompt (batch 1): one count for every shape, or one per shape")
    parser.add_argument("--image-size", type=parse_image_size, default=(768, 768), metavar="HxW",
                        help="pixels, multiples of patch x pooling size (48 at the published widths; default 768x768)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.cuda_graph and not args.no_cache:
        parser.error("cuda-graph: needs --no-cache (HF's DynamicCache copies a CPU tensor during prefill)")
    if len(args.images) not in (1, len(args.shapes)):
        parser.error(f"images: expected one count or one per shape ({len(args.shapes)}), got {args.images}")
    images_of = dict(zip(args.shapes, args.images * len(args.shapes) if len(args.images) == 1 else args.images))
    if any(images_of.values()) and any(batch != 1 for batch, _ in args.shapes):
        parser.error(f"shapes: --images takes batch 1 only, got {[f'{b}x{t}' for b, t in args.shapes]}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("device: CUDA is not available here (try --device cpu with a tiny preset)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} (model drops rows before its "
          f"KV-shared layers itself: {hasattr(modeling_gemma4.Gemma4TextModel, '_maybe_slice_kv_shared_inputs')}),"
          f" {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    tflops = matmul_tflops(device, dtype)
    print(f"matmul rate: {tflops:.3g} TFLOP/s ({args.dtype})", flush=True)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    models = {preset: gemma4_fx.build_model(preset, dtype=dtype, device=device, multimodal=any(images_of.values()),
                                            **overrides) for preset in args.preset}
    for preset, model in models.items():
        config = model.config.get_text_config()
        print(f"{preset}: {config.num_hidden_layers} layers ({config.num_kv_shared_layers} KV-shared), hidden "
              f"{config.hidden_size}")
    # A job per batch size: Dynamo specialises batch 1 apart from the others, so that takes a compile of its own;
    # and per count of images (a count of one is specialised too).
    groups = {}
    for shape in args.shapes:
        groups.setdefault((shape[0], images_of[shape]), []).append(shape)
    jobs = [(preset, variant, group) for preset in models for variant in args.variants for group in groups.items()]
    shared = {preset: shareable(model) for preset, model in models.items()}
    results = run_jobs(job, [(variant, shapes, images, shared[preset], args)
                             for preset, variant, ((_, images), shapes) in jobs],
                       deadline_s=args.deadline - (time.perf_counter() - start))
    print(f"{len(jobs)} jobs, {time.perf_counter() - start:.0f} s in all\n")
    rows = []
    for preset, model in models.items():
        rows += rows_of(preset, model, [(v, r) for (p, v, _), r in zip(jobs, results) if p == preset], tflops)
    print(table(rows))
    if not all(row["timed_alone"] for row in rows):
        print("* timed while other jobs may still have been compiling: host-bound timings suffer (raise --deadline)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(tflops=tflops, transformers=transformers.__version__, rows=rows), file, indent=1)


if __name__ == "__main__":
    main()
