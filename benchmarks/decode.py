"""Gemma-4 decode step with HF's static cache: eager, Inductor, reduce-overhead, gemma4_fx piecewise and full graphs.

    python benchmarks/decode.py                                   # E2B (35 layers) and 26B-A4B (8 layers), bf16
    python benchmarks/decode.py --device cpu --preset tiny-e2b --batch 1 2 --context 16 --steps 3   # smoke run

One forward of one new token per sequence over a static cache filled to `--context` (sized for the timed steps
too: every forward appends), timed as the host wall clock of
`--steps` back-to-back steps after a synchronize (what generation sees: launch overhead included), median of
`--repeats` such blocks. Each compiled variant is compiled once with `dynamic=True` and then serves every batch size;
its compiled-graph count is printed so recompiles show. The floor is the bytes of weights one step must read (all but
the embedding tables, which are gathered; the LM head; for MoE the experts the batch is expected to hit) over the
device-to-device copy bandwidth measured here. `--generate` also times HF `generate` (decode tokens per second).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import CompileConfig, StaticCache  # noqa: E402

import gemma4_fx  # noqa: E402
from benchmarks.common import copy_bandwidth, markdown  # noqa: E402

VARIANTS = ("eager", "inductor", "reduce-overhead", "gemma4_fx piecewise", "gemma4_fx auto")


def compiled_variant(model, name: str):
    """(callable, backend or None) for variant `name`."""
    if name == "eager":
        return model, None
    if name == "inductor":
        return torch.compile(model, dynamic=True), None
    if name == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead", dynamic=True), None
    backend = gemma4_fx.Gemma4Backend(cudagraphs=name.split()[1])
    return torch.compile(model, backend=backend, dynamic=True), backend


def filled_cache(model, batch: int, context: int, steps: int, device) -> StaticCache:
    """A static cache holding `context` tokens per sequence and room for `steps` more (every forward appends, whatever
    `cache_position` says), filled by eager prefills of at most a sliding window each (transformers 5.17's sliding
    cache indexes out of bounds on longer prefills)."""
    cache = StaticCache(config=model.config, max_cache_len=context + steps)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    chunk = model.config.sliding_window
    with torch.no_grad():
        for start in range(0, context, chunk):
            model(ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1,
                  cache_position=torch.arange(start, min(start + chunk, context), device=device))
    return cache


def step_time_ms(fn, model, cache, batch: int, context: int, steps: int, repeats: int, device) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    position = torch.tensor([context], device=device)

    def step():
        return fn(ids, past_key_values=cache, cache_position=position, use_cache=True).logits

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(3):  # warm-up, then capture, for the graph runtimes
            step()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def weight_bytes(model, batch: int) -> float:
    """Bytes of parameters one decode step reads (see the module docstring)."""
    config = model.config
    total = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if "embed_tokens" in name:
            continue
        if "experts" in name:
            experts, k = config.num_experts, config.top_k_experts
            size *= 1 - (1 - k / experts) ** batch  # expected share of experts hit by `batch` tokens
        total += size
    head = model.lm_head.weight
    if head is model.model.embed_tokens.weight:  # tied: skipped above, but the head reads all of it
        total += head.numel() * head.element_size()
    return total


def generate_tokens_per_s(model, compile_config, batch: int, context: int, new_tokens: int, device) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    kwargs = dict(do_sample=False, cache_implementation="static", min_new_tokens=new_tokens,
                  max_new_tokens=new_tokens, disable_compile=compile_config is None, compile_config=compile_config)
    model.generate(ids, **kwargs)  # warm-up: compiles, captures
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    sync()
    return batch * new_tokens / (time.perf_counter() - start)


def bench_model(args, preset: str, layers: int | None, bandwidth: float | None) -> tuple[list, list]:
    device = torch.device(args.device)
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    if layers is not None and "num_kv_shared_layers" in gemma4_fx.PRESETS[preset]:
        full = gemma4_fx.PRESETS[preset]["num_hidden_layers"]
        overrides["num_kv_shared_layers"] = gemma4_fx.PRESETS[preset]["num_kv_shared_layers"] * layers // full
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = gemma4_fx.build_model(preset, dtype=dtype, device=device, **overrides)
    label = f"{preset} ({model.config.num_hidden_layers} layers)"
    rows = {batch: {"model": label, "batch": batch} for batch in args.batch}
    for name in args.variants:
        torch._dynamo.reset()
        fn, backend = compiled_variant(model, name)
        start = time.perf_counter()
        for batch in args.batch:
            cache = filled_cache(model, batch, args.context, 3 + args.steps * args.repeats, device)
            rows[batch][name] = step_time_ms(fn, model, cache, batch, args.context, args.steps, args.repeats, device)
        graphs = len(backend.graph_reports) if backend else None
        print(f"{label} {name}: {time.perf_counter() - start:.0f} s with compile"
              + (f", {graphs} compiled graph(s); {backend.cudagraph_stats}" if backend else ""), flush=True)
    for batch, row in rows.items():
        for name in ("inductor", "reduce-overhead"):
            best = min((row[v] for v in row if str(v).startswith("gemma4_fx")), default=None)
            if name in row and best:
                row[f"{name} / gemma4_fx"] = row[name] / best
        if bandwidth:
            row["floor"] = weight_bytes(model, batch) / bandwidth * 1e3
            best = min((row[v] for v in row if str(v).startswith("gemma4_fx")), default=None)
            if best:
                row["gemma4_fx / floor"] = best / row["floor"]
    generate_rows = []
    if args.generate:
        configs = {"eager": None, "reduce-overhead": CompileConfig(),
                   "gemma4_fx auto": CompileConfig(backend=gemma4_fx.Gemma4Backend())}
        for batch in args.generate:
            row = {"model": label, "batch": batch}
            for name, config in configs.items():
                torch._dynamo.reset()
                row[name] = generate_tokens_per_s(model, config, batch, args.context, args.new_tokens, device)
            generate_rows.append(row)
            print(row, flush=True)
    del model
    return list(rows.values()), generate_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", nargs="*", default=["e2b:35", "26b-a4b:8"],
                        help="preset[:layers] (default: e2b at 35 layers, 26b-a4b at 8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--generate", type=int, nargs="*", default=[], help="batch sizes for HF generate")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth() if args.device == "cuda" else None
    if bandwidth:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    step_rows, generate_rows = [], []
    for spec in args.preset:
        preset, _, layers = spec.partition(":")
        steps, generates = bench_model(args, preset, int(layers) if layers else None, bandwidth)
        step_rows += steps
        generate_rows += generates
        print(markdown(steps), flush=True)
    if generate_rows:
        print("\n### HF generate, decode tokens/s (higher is better)\n\n" + markdown(generate_rows))
    print(f"\n### Decode step, ms (context {args.context}, lower is better)\n\n" + markdown(step_rows))


if __name__ == "__main__":
    main()
