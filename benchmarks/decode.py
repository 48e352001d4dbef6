"""Gemma-4 decode step with HF's static cache: eager, Inductor, reduce-overhead, gemma4_fx piecewise and full graphs.

    python benchmarks/decode.py --generate 1          # E2B (35 layers) and 26B-A4B (8 layers), bf16, bs 1 8 32
    python benchmarks/decode.py --device cpu --preset tiny-e2b --batch 1 2 --context 16 --steps 3 \
        --variants eager "gemma4_fx piecewise"      # smoke run
    python benchmarks/decode.py --preset e4b --batch 1 --variants "gemma4_fx auto" --multimodal   # both classes

One forward of one new token per sequence over a static cache filled to `--context` (sized for the timed steps
too: every forward appends), timed as the host wall clock of `--steps` back-to-back steps after a synchronize (what
generation sees: launch overhead included), median of `--repeats` such blocks. Each (variant, batch size) compiles
on its own, with torch.compile's default dynamism (as HF generate compiles); our variants print their compiled-graph
count and CUDA-graph stats.
`gemma4_fx auto, no epilogues` leaves out the post-attention norm and PLE tail rewrites, so the difference to
`gemma4_fx auto` is their share of the step. The floor is the bytes of weights one step must read (all but the
embedding tables, which are gathered; the LM head; for MoE the experts the batch is expected to hit) over the
device-to-device copy bandwidth measured here. `--generate` also times HF `generate` (ms per decoded token, prefill
left out), and beside it `gemma4_fx.generate`, our decode loop (each step one compiled call, sampling included)
through the backend. Each step's `, host` column is the host's time per step to return from the calls, before the
final synchronize: near the step's time, the host bounds it (`gemma4_fx auto, module guards off` drops Dynamo's
guards on the model's modules, the largest host cost per call). `--profile` prints, per job, the GPU's busy time
against the wall time, the kernel families and where the GPU waits between kernels. `--multimodal` times each preset
twice over the same weights: as `Gemma4ForConditionalGeneration` (with its encoders, on text tokens) and as
`Gemma4ForCausalLM` made of its language model and LM head. With `--images N` the multimodal class alone generates,
from a prompt of N random images (`--image-size`) between the text, and its generate jobs also time the first token
(a whole `generate` call of one new token: prefill, vision encoder and sampling). HF generate compiles the decode
steps only and runs the prefill uncompiled; the `, compiled forward` variants compile `model.forward` itself (as a
user who wants a compiled prefill does), so the prefill and the steps both run compiled. Image prompts run over one
`StaticCache` held across calls and reset before each (README: the setup that keeps captured graphs).

Every variant runs in its own process over one shared copy of the weights (`common.run_jobs`): they compile side
by side, then time one at a time. `--deadline` bounds the whole run; unfinished variants are reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import CompileConfig, StaticCache  # noqa: E402

import gemma4_fx  # noqa: E402
from gemma4_fx.multimodal import capture_data_dependent_ops  # noqa: E402
from gemma4_fx.presets import cache_kwargs  # noqa: E402
from benchmarks.common import (copy_bandwidth, image_prompt, kernel_profile, markdown, parse_image_size,  # noqa: E402
                               rebuild, run_jobs, shareable, synchronize)

# "gemma4_fx auto, no <what>": the backend without these rewrites, to time what they gain
LEFT_OUT = {"epilogues": ("post_attn_norm", "ple_tail"), "decode_attention": ("decode_attention",),
            "singles": ("skinny_single",), "slide_window": ("slide_window",), "rotary_table": ("rotary_table",)}
VARIANTS = ("eager", "inductor", "reduce-overhead", "gemma4_fx piecewise", "gemma4_fx auto",
            *(f"gemma4_fx auto, no {what}" for what in LEFT_OUT))
GENERATE_VARIANTS = ("eager", "reduce-overhead", "gemma4_fx auto", "gemma4_fx.generate")
# HF generate (or a step) with Dynamo's guards on the model's modules dropped
# (`torch.compiler.skip_guard_on_all_nn_modules_unsafe` as `guard_filter_fn`): each step no longer checks every
# parameter and attribute of every layer. Unsafe where the model's modules change between calls, so not a default;
# timed on request.
GUARDS_OFF = ", module guards off"


def guards_off_options() -> dict:
    """torch.compile's options for GUARDS_OFF (a new dict each time: torch.compile pops the filter from it)."""
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


# HF generate with Dynamo's guards kept but checked by dict tags
# (`torch._dynamo.config.use_recursive_dict_tags_for_guards`): an unchanged module's subtree of guards is skipped
# whole. Off by default in torch (a use-after-free risk before CPython 3.12's dict watchers, pytorch/pytorch#188103);
# timed on request.
DICT_TAGS = ", dict-tag guards"
# HF generate over `model.forward` compiled by the variant (`disable_compile=True`): the prefill runs compiled too.
COMPILED_FORWARD = ", compiled forward"
GENERATE_CHOICES = (GENERATE_VARIANTS
                    + tuple(variant + suffix for variant in ("reduce-overhead", "gemma4_fx auto")
                            for suffix in (GUARDS_OFF, DICT_TAGS))
                    + tuple(variant + COMPILED_FORWARD
                            for variant in ("inductor", "reduce-overhead", "gemma4_fx auto")))
MULTIMODAL = ", multimodal class"  # the label suffix of `--multimodal`'s Gemma4ForConditionalGeneration
FIRST_TOKEN = "first token ms"  # a generate row's column suffix: the time to the first token
GENERATE_SHORT = 16  # new tokens left out of the per-token rate (the first steps: compile, capture)
PROFILED_STEPS = 10  # decode steps under the profiler (`--profile`)
WARMUP = 4  # steps before timing: compile, recompile with the cache's moving int dynamic, warm up, capture


def ours(cudagraphs: str, patterns=None) -> gemma4_fx.Gemma4Backend:
    # The FX graph cache lets identical pieces (one per layer in piecewise mode) compile once.
    return gemma4_fx.Gemma4Backend(patterns, cudagraphs=cudagraphs, fx_graph_cache=True)


def compiled_variant(model, name: str):
    """(callable, our backend or None) for variant `name`."""
    options = guards_off_options() if name.endswith(GUARDS_OFF) else None  # ours alone takes the suffix
    name = name.removesuffix(GUARDS_OFF)
    if name == "eager":
        return model, None
    if name == "inductor":
        return torch.compile(model), None
    if name == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead"), None
    if ", no " in name:
        left_out = LEFT_OUT[name.split(", no ")[1]]
        backend = ours("auto", [p for p in (*gemma4_fx.GRAPH_PASSES, *gemma4_fx.PATTERNS) if p not in left_out])
    else:
        backend = ours(name.split()[1])
    return torch.compile(model, backend=backend, options=options), backend


def described(backend: gemma4_fx.Gemma4Backend) -> str:
    """Each compiled graph's match counts, why candidates were left alone, failed captures and the CUDA-graph stats:
    what a user should check before reading the times."""
    report = backend.report
    counts = "; ".join(f"{name}: " + ", ".join([f"{p} {n}" for p, n in r.counts.items() if n]
                                               + [f"{len(r.cached)} from the FX graph cache"] * bool(r.cached))
                       for name, r in backend.graph_reports.items())
    reasons = sorted({f"{skip.pattern}: {skip.reason}" for skip in report.skipped})
    return (f"{len(backend.graph_reports)} compiled graph(s) [{counts}]; {backend.cudagraph_stats}"
            + "".join(f"\n    left alone: {reason}" for reason in reasons)
            + "".join(f"\n    {line}" for line in report.fallbacks + report.uncaptured))


def text_config(model):
    """The language model's config (the multimodal class nests it)."""
    return model.config.get_text_config()


def words(model, shape) -> torch.Tensor:
    """Random token ids below the lowest special one of a multimodal config (image, audio placeholders)."""
    top = min(text_config(model).vocab_size, getattr(model.config, "boi_token_id", None) or 1 << 62)
    return torch.randint(3, top, shape, device=model.device)


def filled_cache(model, batch: int, context: int, steps: int) -> StaticCache:
    """A static cache holding `context` tokens per sequence and room for `steps` more (every forward appends, whatever
    `cache_position` says), filled by eager prefills of at most a sliding window each (transformers 5.17's sliding
    cache indexes out of bounds on longer prefills)."""
    cache = StaticCache(config=model.config, max_cache_len=context + steps)
    ids = words(model, (batch, context))
    chunk = text_config(model).sliding_window
    with torch.no_grad():
        for start in range(0, context, chunk):
            model(ids[:, start:start + chunk], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1,
                  cache_position=torch.arange(start, min(start + chunk, context), device=model.device))
    return cache


def median_block_ms(fn, steps: int, repeats: int, device) -> tuple[float, float]:
    """Medians over `repeats` of the host time per call of `steps` back-to-back calls, and of the time per call to
    return from them, before the final synchronize: near the first, the host is what bounds the calls; well under,
    the GPU."""
    times, returned = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        returned.append((time.perf_counter() - start) / steps * 1e3)
        synchronize(device)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times), statistics.median(returned)


def step_job(variant: str, batch: int, model, args, turn) -> dict:
    fn, backend = compiled_variant(model, variant)
    cache = filled_cache(model, batch, args.context, WARMUP + args.steps * args.repeats + 2 * PROFILED_STEPS)
    ids = words(model, (batch, 1))
    position = torch.tensor([args.context], device=model.device)

    def step():
        return fn(ids, **cache_kwargs(model, cache), cache_position=position, use_cache=True).logits

    with torch.no_grad():
        for _ in range(WARMUP):
            step()
        with turn():
            value, host = median_block_ms(step, args.steps, args.repeats, model.device)
            result = {"value": value, "host": host}
            if args.profile:
                result["gpu busy"], result["profile"] = kernel_profile(step, top=args.profile, calls=PROFILED_STEPS)
    if backend is not None:
        result["graphs"] = described(backend)
    return result


def compile_config(variant: str, backend) -> CompileConfig | None:
    """HF generate's `CompileConfig` for an HF generate variant (None: uncompiled)."""
    if variant.endswith(DICT_TAGS):
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True  # this job's process only
        variant = variant.removesuffix(DICT_TAGS)
    base = variant.removesuffix(GUARDS_OFF)
    if base == "eager" or base.endswith(COMPILED_FORWARD):
        return None
    if not variant.endswith(GUARDS_OFF):
        return CompileConfig() if base == "reduce-overhead" else CompileConfig(backend=backend)
    if base == "reduce-overhead":  # torch.compile takes a mode or options, not both: the mode as its option
        return CompileConfig(mode=None, options={"triton.cudagraphs": True, **guards_off_options()})
    return CompileConfig(backend=backend, mode=None, options=guards_off_options())


class TokenClock:
    """A logits processor that notes the host time at each generated token and changes nothing. HF generate reads
    the device every token (its stopping check), so the notes are the tokens' wall times; their spacing after the
    first tokens is the decode rate inside one call, without the call's first steps, where graphs are captured
    again for the new static cache HF makes at each call (a cost that varies by tens of ms between calls)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate_job(variant: str, batch: int, model, args, turn) -> dict:
    """Greedy decode through HF `generate` (`eager` uncompiled, the `, compiled forward` ones over the compiled
    `model.forward`, the others through its `CompileConfig`), or our loop (`gemma4_fx.generate`, through the
    backend), `--new-tokens` N new tokens. Per generated token: in HF generate, the spacing of tokens 16 to N within a
    call (`TokenClock`); in ours, which keeps its cache and so captures once, (t(N) - t(16)) / (N - 16) over two
    calls. Both leave the prefill and the first steps out, as a user sees the decode rate. With `--images`, the
    multimodal class's prompt holds images and the first token is timed too. The text prompt is at most a sliding
    window long (transformers 5.17's static sliding cache fails on longer prefills)."""
    prompt_tokens = min(args.prompt, text_config(model).sliding_window)
    images = args.images and model.config is not text_config(model)
    ids, pixels = image_prompt(model, batch, prompt_tokens, args.images, args.image_size, seed=args.images) \
        if images else (words(model, (batch, prompt_tokens)), {})
    base = variant.removesuffix(GUARDS_OFF).removesuffix(DICT_TAGS).removesuffix(COMPILED_FORWARD)
    backend = ours("auto") if base in ("gemma4_fx auto", "gemma4_fx.generate") else None
    config = None if variant == "gemma4_fx.generate" else compile_config(variant, backend)
    if config is not None and model.device.type == "cpu":
        config._compile_all_devices = True  # HF compiles on CUDA only unless told (a private flag; for smoke runs)
    held = StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.new_tokens) \
        if images and variant != "gemma4_fx.generate" else None  # ours keeps its own
    cache = {"cache_implementation": "static"} if held is None else cache_kwargs(model, held)
    if variant.endswith(COMPILED_FORWARD):
        model.forward = torch.compile(model.forward, backend=backend or "inductor",
                                      mode="reduce-overhead" if base == "reduce-overhead" else None)

    def run(new_tokens: int, clock: TokenClock | None = None):
        kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
        if variant == "gemma4_fx.generate":
            return gemma4_fx.generate(model, ids, backend=backend, **pixels, **kwargs)
        if held is not None:
            held.reset()
        with capture_data_dependent_ops() if images else contextlib.nullcontext():
            return model.generate(ids, **pixels, **cache, disable_compile=config is None, compile_config=config,
                                  logits_processor=[clock] if clock else None, **kwargs)

    def hf_token_ms() -> float:
        clock = TokenClock()
        run(long, clock)
        return (clock.times[-1] - clock.times[short]) / (len(clock.times) - 1 - short) * 1e3

    short, long = GENERATE_SHORT, args.new_tokens
    for new_tokens in (short, long):  # compile, capture: each length sizes its own static cache
        run(new_tokens)
    if images:
        run(1)
    result = {"prompt": ids.shape[1]}
    with turn():
        if variant == "gemma4_fx.generate":
            t_short, t_long = (median_block_ms(lambda: run(n), 1, args.repeats, model.device)[0] for n in (short, long))
            result["value"] = (t_long - t_short) / (long - short)
        else:
            result["value"] = statistics.median(hf_token_ms() for _ in range(args.repeats))
        if images:
            result[FIRST_TOKEN] = median_block_ms(lambda: run(1), 1, args.repeats, model.device)[0]
        if args.profile:  # the whole call, prefill included: how much of the wall time the GPU is busy
            _, result["profile"] = kernel_profile(lambda: run(long), top=args.profile)
    if backend is not None:
        result["graphs"] = described(backend)
    return result


def job(spec, turn) -> dict:
    """One variant of one model, in a process of its own (see `common.run_jobs`)."""
    kind, variant, batch, shared, args = spec
    torch._dynamo.config.recompile_limit = 64
    model = rebuild(shared)
    begin = time.perf_counter()
    label = f"{text_config(model).num_hidden_layers} layers{MULTIMODAL * (model.config is not text_config(model))}" \
            f", {kind} {variant}, batch {batch}"

    def noted_turn():
        print(f"{label}: compiled and warmed up in {time.perf_counter() - begin:.0f} s", flush=True)
        return turn()

    result = (step_job if kind == "step" else generate_job)(variant, batch, model, args, noted_turn)
    details = [result.pop(key) for key in ("graphs", "profile") if key in result]
    print("\n".join([f"{label}: {result}", *details]), flush=True)
    return result


def weight_bytes(model, batch: int) -> float:
    """Bytes of parameters one decode step reads (see the module docstring)."""
    config = text_config(model)
    total = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if "embed_tokens" in name or "vision" in name or "audio" in name:  # gathered; encoders: not run in decode
            continue
        if "experts" in name:
            experts, k = config.num_experts, config.top_k_experts
            size *= 1 - (1 - k / experts) ** batch  # expected share of experts hit by `batch` tokens
        total += size
    head = model.lm_head.weight
    if head is model.get_input_embeddings().weight:  # tied: skipped above, but the head reads all of it
        total += head.numel() * head.element_size()
    return total


def build(spec: str, device, dtype, multimodal: bool = False):
    """The model of `preset[:layers]` (at another depth the preset keeps its share of KV-shared layers)."""
    preset, _, layers = spec.partition(":")
    overrides = {"num_hidden_layers": int(layers)} if layers else {}
    return gemma4_fx.build_model(preset, dtype=dtype, device=device, multimodal=multimodal, **overrides)


def text_only(shared: dict) -> dict:
    """`shareable`'s description of a multimodal model's language model and LM head as a `Gemma4ForCausalLM`: the
    same tensors, so both classes run the same weights."""
    prefix = "model.language_model."
    tensors = {"model." + name[len(prefix):]: t for name, t in shared["tensors"].items() if name.startswith(prefix)}
    tensors["lm_head.weight"] = shared["tensors"]["lm_head.weight"]
    return {"config": shared["config"].get_text_config(), "tensors": tensors}


def tables(models, jobs, results, args, bandwidth) -> tuple[list, list]:
    steps = {(label, batch): {"model": label, "batch": batch} for label in models for batch in args.batch}
    generate = {(label, batch): {"model": label, "batch": batch, "prompt": ""} for label, kind, _, batch in jobs
                if kind == "generate"}
    for (label, kind, variant, batch), result in zip(jobs, results):
        if isinstance(result, str):
            print(f"{label} {kind} {variant} batch {batch}: {result}")
            continue
        row = (steps if kind == "step" else generate)[(label, batch)]
        row[variant] = result["value"]
        if FIRST_TOKEN in result:
            row[f"{variant}, {FIRST_TOKEN}"] = result[FIRST_TOKEN]
        for key, column in (("host", "host"), ("gpu busy", "GPU busy")):
            if key in result:
                row[f"{variant}, {column}"] = result[key]
        if kind == "generate":
            row["prompt"] = result["prompt"]
    for rows in (steps, generate):
        for (label, batch), row in rows.items():
            best = min((row[v] for v in row
                        if str(v).startswith("gemma4_fx") and not str(v).endswith(("busy", "host", FIRST_TOKEN))),
                       default=None)
            for name in ("inductor", "reduce-overhead"):
                if name in row and best:
                    row[f"{name} / gemma4_fx"] = row[name] / best
            if bandwidth:
                row["floor"] = weight_bytes(models[label], batch) / bandwidth * 1e3
                if best:
                    row["gemma4_fx / floor"] = best / row["floor"]
    return list(steps.values()), list(generate.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", nargs="+", default=["e2b", "26b-a4b:8"],
                        help="preset[:layers] (default: e2b at its 35 layers, 26b-a4b at 8)")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32], help="batch sizes of the decode step")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=(*VARIANTS, "gemma4_fx auto" + GUARDS_OFF))
    parser.add_argument("--generate", type=int, nargs="*", default=[],
                        help="batch sizes for HF generate and gemma4_fx.generate")
    parser.add_argument("--generate-variants", nargs="+", default=list(GENERATE_VARIANTS), choices=GENERATE_CHOICES)
    parser.add_argument("--new-tokens", type=int, default=48,
                        help=f"new tokens of the longer generate run (> {GENERATE_SHORT})")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of the generate runs")
    parser.add_argument("--profile", type=int, nargs="?", const=8, default=0, metavar="TOP",
                        help="print the GPU's busy time against the wall time, the kernel families and the TOP "
                             "(default 8) kernels, per job")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--multimodal", action="store_true",
                        help="each preset as Gemma4ForConditionalGeneration and as Gemma4ForCausalLM, same weights")
    parser.add_argument("--images", type=int, default=0,
                        help="with --multimodal: images in the multimodal class's generate prompts (generate "
                             "jobs for that class alone)")
    parser.add_argument("--image-size", type=parse_image_size, default=(768, 768), metavar="HxW")
    args = parser.parse_args()
    if args.profile and args.device != "cuda":
        parser.error("--profile: needs --device cuda")
    if args.images and not (args.multimodal and args.generate):
        parser.error("--images: needs --multimodal and --generate (the multimodal class's generate prompts)")
    if args.images < 0:
        parser.error(f"--images: expected a count >= 0, got {args.images}")
    if args.generate and args.new_tokens <= GENERATE_SHORT:
        parser.error(f"--new-tokens: expected more than {GENERATE_SHORT} (the shorter run's), got {args.new_tokens}")
    start = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("device: CUDA is not available here (try --device cpu with a tiny preset)")
    bandwidth = copy_bandwidth() if device.type == "cuda" else None
    if bandwidth:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models, shared = {}, {}
    for spec in args.preset:
        model = build(spec, device, dtype, args.multimodal)
        label = f"{spec.partition(':')[0]} ({text_config(model).num_hidden_layers} layers)"
        if args.multimodal:
            models[label + MULTIMODAL], shared[label + MULTIMODAL] = model, shareable(model)
            shared[label] = text_only(shared[label + MULTIMODAL])
            models[label] = rebuild(shared[label])
        else:
            models[label], shared[label] = model, shareable(model)
    jobs = [(label, "step", variant, batch) for label in models for variant in args.variants for batch in args.batch]
    generating = [label for label in models if not args.images or label.endswith(MULTIMODAL)]  # images: that class
    jobs += [(label, "generate", variant, batch) for label in generating for variant in args.generate_variants
             for batch in args.generate]
    results = run_jobs(job, [(kind, variant, batch, shared[label], args) for label, kind, variant, batch in jobs],
                       deadline_s=args.deadline - (time.perf_counter() - start))
    print(f"{len(jobs)} jobs, {time.perf_counter() - start:.0f} s in all")
    step_rows, generate_rows = tables(models, jobs, results, args, bandwidth)
    if generate_rows:
        print(f"\n### generate, ms per decoded token (tokens {GENERATE_SHORT} to {args.new_tokens}: within a call in "
              "HF generate, (t(N) - t(16)) / (N - 16) in gemma4_fx.generate; lower is better)\n\n"
              + markdown(generate_rows))
    if step_rows:
        print(f"\n### Decode step, ms (context {args.context}, lower is better)\n\n" + markdown(step_rows))


if __name__ == "__main__":
    main()
