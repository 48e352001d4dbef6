"""Multimodal Gemma-4 requests through the backend: compiles, recompiles and CUDA graphs over a request mix.

    python benchmarks/multimodal_requests.py [--preset e4b:8] [--vision-layers 4] [--requests 50] [--check 2]
    python benchmarks/multimodal_requests.py --max-images 1 --max-clips 2 --max-seconds 8   # audio clips too
    python benchmarks/multimodal_requests.py --preset tiny-e4b --device cpu --dtype float32 --requests 6 \
        --sizes 24x36 36x36 --check 1                                                    # a dry run

`Gemma4ForConditionalGeneration` (random weights; `preset:layers` cuts the language model, keeping its share of
KV-shared layers; `--vision-layers` the vision encoder) compiled once through `gemma4_fx.Gemma4Backend` (CUDA graphs
as `--cudagraphs` says, the default "auto") and called as a serving loop calls its prefill:
`model(input_ids, pixel_values, image_position_ids, logits_to_keep=1, use_cache=True)` under
`capture_data_dependent_ops()`. A warm-up of 0 to `--max-images` images (each count twice, at two sizes; with
`--max-clips`, each count twice more with clips of two length buckets) comes first; then `--requests` requests of a
random count of images of random `--sizes` and of 0 to `--max-clips` audio clips of random lengths up to
`--max-seconds` (padded to `multimodal.AUDIO_BUCKET_SAMPLES`, as the README says to), between random text, twice
over (the second pass repeats the first's requests: shapes seen before). Printed: the graphs the backend compiled (and
Dynamo's frame counters) during the warm-up and after it (naming each request that compiled after it), the
CUDA-graph stats, and for the pieces of the split graph by the part of the model they hold (vision encoder,
language model, both) how many calls ran from a CUDA graph and the graph inputs their CUDA graphs are keyed on (the
vision encoder's: the pixel values, whose shape is the image count; the audio encoder's: the features, whose shape
is the clip count and length bucket); the prompt shapes seen. Each request's
last-token logits are compared with eager's (greedy token, max |diff| / max |eager|), and for the first `--check`
requests with images or clips greedy HF `generate` (`--new-tokens`) compiled through a second backend against
eager's tokens.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import transformers  # noqa: E402

import gemma4_fx  # noqa: E402
import gemma4_fx.backend  # noqa: E402
from gemma4_fx.multimodal import (DEFAULT_SOFT_TOKENS, audio_inputs, capture_data_dependent_ops,  # noqa: E402
                                  image_inputs, prompt)
from gemma4_fx.runtime.cudagraphs import CapturedPiece  # noqa: E402
from benchmarks.common import TURN_LOCK  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PARTS = (("vision", "vision_tower"), ("audio", "audio_tower"), ("language", "language_model"))


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"size: expected HEIGHTxWIDTH such as 768x768, got {text!r}")
    return int(height), int(width)


class PieceTally:
    """Which part of the model each captured piece of the backend's split graphs holds (from its nodes' module
    stacks), and per piece its calls and the calls that replayed a CUDA graph."""

    def __init__(self):
        self.parts: dict[str, str] = {}  # piece name (graph-qualified) -> "vision", "language", "vision+language"...
        self.calls = collections.Counter()
        self.replays = collections.Counter()
        self.keys: dict[str, tuple[str, ...]] = {}  # piece -> the graph inputs its CUDA graphs are keyed on

    def install(self):
        original_split, original_call, tally = gemma4_fx.backend.split_graph, CapturedPiece.__call__, self
        splits: dict[int, int] = {}  # id of a split's module (the runner keeps it) -> the split's number

        def split_graph(gm, *args, **kwargs):
            split = original_split(gm, *args, **kwargs)
            splits[id(split.module)] = number = len(splits)
            for piece in split.captured:
                tally.parts[f"{number}.{piece.name}"] = _parts_of(piece.module)
            return split

        def call(piece, *args):
            key = f"{splits[id(piece.runner.module)]}.{piece.name}"
            before = piece.runner.stats.replays
            out = original_call(piece, *args)
            tally.calls[key] += 1
            tally.replays[key] += piece.runner.stats.replays - before
            if key not in tally.keys:
                inputs = [node.name for node in piece.runner.module.graph.find_nodes(op="placeholder")]
                tally.keys[key] = tuple(inputs[shape_input.position] for shape_input in piece.domain.inputs)
            return out

        gemma4_fx.backend.split_graph = split_graph
        CapturedPiece.__call__ = call

    def table(self) -> str:
        # part -> pieces, pieces called, calls, replays, the inputs its pieces' graphs are keyed on
        rows = collections.defaultdict(lambda: [0, 0, 0, 0, set()])
        for name, part in self.parts.items():
            row = rows[part]
            row[0] += 1
            row[1] += self.calls[name] > 0
            row[2] += self.calls[name]
            row[3] += self.replays[name]
            row[4].add(", ".join(self.keys.get(name, ())) or "nothing")
        lines = ["| part of the model | captured pieces | called | calls | from a CUDA graph | keyed on |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {part} | {n} | {called} | {calls} | {replays} ({replays / max(calls, 1):.0%}) | "
                  f"{'; '.join(sorted(keys))} |" for part, (n, called, calls, replays, keys) in sorted(rows.items())]
        return "\n".join(lines)


def _parts_of(module: torch.fx.GraphModule) -> str:
    """"vision", "language", "vision+language", ... : the model's parts whose modules the piece's nodes come from."""
    found = set()
    for node in module.graph.nodes:
        text = " ".join(str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values())
        found |= {part for part, key in PARTS if key in text}
    return "+".join(part for part, _ in PARTS if part in found) or "other"


def requests(model, count: int, max_images: int, sizes, max_clips: int, max_seconds: float, seed: int, device,
             dtype, warm_up: bool = False) -> list:
    """[(input_ids, encoder inputs, image sizes, clip seconds)]: for the warm-up every count of images
    0..max_images twice, at two sizes and two text lengths, and with `max_clips` twice more with 1 to `max_clips`
    clips of 1 s and 3 s (two length buckets); else `count` random requests."""
    generator = torch.Generator().manual_seed(seed)
    plan = []
    if warm_up:
        for images in range(max_images + 1):
            for turn in range(4 if max_clips else 2):
                clips = [1.0 + 2 * (turn % 2)] * (1 + images % max_clips) if turn >= 2 else []
                plan.append(([sizes[(turn + i) % len(sizes)] for i in range(images)], clips, 16 + 24 * (turn % 2)))
    else:
        for _ in range(count):
            images = int(torch.randint(0, max_images + 1, (), generator=generator))
            picked = [sizes[int(i)] for i in torch.randint(0, len(sizes), (images,), generator=generator)]
            clips = []
            if max_clips:  # drawn only then: the image mix stays what it was without clips
                lengths = torch.empty(int(torch.randint(0, max_clips + 1, (), generator=generator)))
                clips = [round(float(s), 1) for s in lengths.uniform_(0.5, max_seconds, generator=generator)]
            plan.append((picked, clips, int(torch.randint(8, 64, (), generator=generator))))
    out = []
    for index, (picked, clips, text) in enumerate(plan):
        inputs, image_tokens, audio_tokens = {}, [], []
        if picked:
            pixel_values, positions, image_tokens = image_inputs(
                model.config.vision_config, picked, max_soft_tokens=DEFAULT_SOFT_TOKENS, generator=generator,
                device=device, dtype=dtype)
            inputs.update(pixel_values=pixel_values, image_position_ids=positions)
        if clips:
            features, mask, audio_tokens = audio_inputs(model, clips, seed=seed * 100003 + index, device=device,
                                                        dtype=dtype)
            inputs.update(input_features=features, input_features_mask=mask)
        ids = prompt(model.config, text, image_tokens, audio_tokens, generator=generator).to(device)
        out.append((ids, inputs, picked, clips))
    return out


def prefill(fn, input_ids, inputs):
    with torch.no_grad(), capture_data_dependent_ops():
        return fn(input_ids, **inputs, logits_to_keep=1, use_cache=True).logits[:, -1].float()


@contextlib.contextmanager
def alone_on_the_host():
    """The benchmarks' timing lock (`common.run_jobs`): no other benchmark script times while the passes run."""
    with open(TURN_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def frames() -> dict:
    return dict(torch._dynamo.utils.counters["frames"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="e4b:8", help="preset[:layers] of the language model")
    parser.add_argument("--vision-layers", type=int, default=None, help="vision encoder depth (default: the preset's)")
    parser.add_argument("--audio-layers", type=int, default=None, help="audio encoder depth (default: the preset's)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-images", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        default=[(768, 768), (672, 480), (384, 384), (528, 960)], metavar="HxW")
    parser.add_argument("--max-clips", type=int, default=0, help="audio clips per request (E2B and E4B hear)")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="the longest clip")
    parser.add_argument("--cudagraphs", default="auto", choices=[m for m in gemma4_fx.backend.CUDAGRAPH_MODES if m])
    parser.add_argument("--max-captured-shapes", type=int, default=32)
    parser.add_argument("--check", type=int, default=2, help="requests whose greedy generate is checked")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    preset, _, layers = args.preset.partition(":")
    overrides = {"num_hidden_layers": int(layers)} if layers else {}
    encoders = {name: {"num_hidden_layers": layers} for name, layers in
                (("vision", args.vision_layers), ("audio", args.audio_layers)) if layers} or None
    model = gemma4_fx.build_model(preset, multimodal=True, dtype=dtype, device=device, encoder_overrides=encoders,
                                  **overrides)
    text, audio_layers = model.config.text_config, getattr(model.config.audio_config, "num_hidden_layers", 0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {preset}: {text.num_hidden_layers}"
          f" layers ({text.num_kv_shared_layers} KV-shared), vision encoder {model.config.vision_config.num_hidden_layers}"
          f" layers, audio encoder {audio_layers} layers; images {' '.join(f'{h}x{w}' for h, w in args.sizes)}",
          flush=True)

    tally = PieceTally()
    tally.install()
    backend = gemma4_fx.Gemma4Backend(cudagraphs=args.cudagraphs, max_captured_shapes=args.max_captured_shapes)
    compiled = torch.compile(model, backend=backend)
    audio = dict(max_clips=args.max_clips, max_seconds=args.max_seconds)
    warm = requests(model, 0, args.max_images, args.sizes, **audio, seed=args.seed, device=device, dtype=dtype,
                    warm_up=True)
    mix = requests(model, args.requests, args.max_images, args.sizes, **audio, seed=args.seed + 1, device=device,
                   dtype=dtype)

    begin = time.perf_counter()
    for input_ids, inputs, *_ in warm:
        prefill(compiled, input_ids, inputs)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    warm_graphs, warm_frames, warm_stats = len(backend.graph_reports), frames(), str(backend.cudagraph_stats)
    print(f"warm-up: {len(warm)} requests (0-{args.max_images} images, 0-{args.max_clips} clips) in "
          f"{time.perf_counter() - begin:.0f} s: "
          f"{warm_graphs} graphs compiled; Dynamo frames {warm_frames}\n  {warm_stats}", flush=True)

    passes, errors, same = [], [], 0
    with alone_on_the_host():  # what follows is timed
        for turn in range(2):
            times, graphs_before, replays_before = [], len(backend.graph_reports), backend.cudagraph_stats.replays
            for index, (input_ids, inputs, picked, clips) in enumerate(mix):
                compiled_before = len(backend.graph_reports)
                synchronize()
                begin = time.perf_counter()
                logits = prefill(compiled, input_ids, inputs)
                synchronize()
                times.append((time.perf_counter() - begin) * 1e3)
                if len(backend.graph_reports) > compiled_before:  # after the warm-up: say which request compiled
                    print(f"  request {index} compiled {len(backend.graph_reports) - compiled_before} graph(s): "
                          f"{input_ids.shape[1]} prompt tokens, images {picked}, clips {clips} s", flush=True)
                if turn == 0:
                    expected = prefill(model, input_ids, inputs)
                    errors.append(((logits - expected).abs().max() / expected.abs().max()).item())
                    same += bool(torch.equal(logits.argmax(-1), expected.argmax(-1)))
            stats = backend.cudagraph_stats
            passes.append(dict(compiled=len(backend.graph_reports) - graphs_before, replays=stats.replays - replays_before,
                               median_ms=statistics.median(times), max_ms=max(times)))
            print(f"pass {turn + 1}: {len(mix)} requests, {passes[-1]['compiled']} graphs compiled, "
                  f"{passes[-1]['replays']} piece replays, median {passes[-1]['median_ms']:.1f} ms, "
                  f"slowest {passes[-1]['max_ms']:.0f} ms", flush=True)

    shapes = collections.Counter((ids.shape[1], len(picked), tuple(inputs.get("input_features", torch.empty(0)).shape))
                                 for ids, inputs, picked, _ in mix)
    counts = collections.Counter(len(picked) for _, _, picked, _ in mix)
    buckets = collections.Counter(tuple(inputs["input_features"].shape[:2]) for _, inputs, _, clips in mix if clips)
    report, stats = backend.report, backend.cudagraph_stats
    print(f"\nrequest mix: images per request {dict(sorted(counts.items()))}; audio features (clips, frames) "
          f"{dict(sorted(buckets.items()))}; {len(shapes)} distinct (prompt length, images, clips) of {len(mix)} "
          f"requests, {sum(1 for n in shapes.values() if n > 1)} of them seen more than once")
    print(f"compiled graphs: {len(backend.graph_reports)} ({warm_graphs} in the warm-up, "
          f"{passes[0]['compiled']} in pass 1, {passes[1]['compiled']} in pass 2); Dynamo frames now {frames()}")
    print(f"Dynamo's recompile limit: {torch._dynamo.config.recompile_limit} per code object (a request past it "
          "would run eagerly, without a compile counted here)")
    print(f"{stats}\nYOCO: {report.counts.get('yoco', 0)} attentions truncated; fallbacks: {len(report.fallbacks)}; "
          f"uncaptured: {len(report.uncaptured)}")
    for line in report.fallbacks + report.uncaptured + stats.failures:
        print(f"  {line}")
    for reason in sorted({skip.reason for skip in report.skipped if skip.pattern == "yoco"}):
        print(f"  YOCO left a graph alone: {reason}")
    for reason, count in torch._dynamo.utils.counters["graph_break"].items():  # a break can cost YOCO its cut
        print(f"  graph break ({count}x): {reason[:300]}")
    print("\n" + tally.table())
    print(f"\nlast-token logits against eager ({len(errors)} requests, {args.dtype}): greedy token the same in "
          f"{same}/{len(errors)}, max |diff| / max |eager| median {statistics.median(errors):.2e}, "
          f"worst {max(errors):.2e}")

    checked = [request for request in mix if request[2] or request[3]][:args.check]
    if checked:
        # Dynamo's compiled-code cache is per code object, shared with the compiled model above (the same forward):
        # the decode steps' compiles must not meet its default limit of 8 and fall back to eager.
        torch._dynamo.config.recompile_limit = 64
        generator = gemma4_fx.Gemma4Backend(cudagraphs=args.cudagraphs)
        eager_forward = model.forward
        for input_ids, inputs, picked, clips in checked:
            kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            with torch.no_grad():
                model.forward = eager_forward
                expected = model.generate(input_ids, **inputs, **kwargs)
                model.forward = torch.compile(eager_forward, backend=generator)
                with capture_data_dependent_ops():
                    tokens = model.generate(input_ids, **inputs, **kwargs)
            new = input_ids.shape[1]
            print(f"generate, {len(picked)} images {picked}, clips {clips} s, {new} prompt tokens: compiled "
                  f"{tokens[0, new:].tolist()}, eager {expected[0, new:].tolist()}: "
                  f"{'same' if torch.equal(tokens, expected) else 'DIFFERENT'}", flush=True)
        model.forward = eager_forward
        print(f"generate backend: {len(generator.graph_reports)} graphs compiled; {generator.cudagraph_stats}")
        for line in generator.report.fallbacks + generator.report.uncaptured:
            print(f"  {line[:300]}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
