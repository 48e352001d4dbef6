"""`gemma4-fx`: the demo and the inspector from the command line."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from .presets import PRESETS


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def demo(preset: str | None = None, tokens: int = 16, layers: int | None = None) -> dict[str, float]:
    """Compile a Gemma-4 with the backend and with plain Inductor; print the report and both against eager.

    CPU: the tiny MoE model in bf16. GPU: 26B-A4B widths at 4 layers in bf16 (real widths, reduced depth).
    Returns the max |logits - eager logits| of each.
    """
    from .backend import Gemma4Backend
    from .presets import build_model

    torch.manual_seed(0)
    device = _device()
    preset = preset or ("26b-a4b" if device == "cuda" else "tiny-26b-a4b")
    overrides = {"num_hidden_layers": layers or 4} if device == "cuda" or layers else {}
    start = time.perf_counter()
    model = build_model(preset, dtype=torch.bfloat16, device=device, **overrides)
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    backend = Gemma4Backend()
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits.float()
        compiled = {"gemma4_fx": torch.compile(model, backend=backend), "inductor default": torch.compile(model)}
        logits = {}
        for name, fn in compiled.items():
            torch._dynamo.reset()
            logits[name] = fn(input_ids, use_cache=False).logits.float()
    print(f"gemma4_fx demo: preset {preset}, {model.config.num_hidden_layers} layers, bf16, {tokens} tokens, {device}")
    print(backend.report)
    print(f"\nagainst eager (logits up to {expected.abs().max().item():.3g}):")
    errors = {}
    for name, out in logits.items():
        errors[name] = (out - expected).abs().max().item()
        same = (out.argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(f"  {name:<17} max |logits - eager| {errors[name]:<10.4g} greedy token equal {100 * same:.1f}%")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemma4-fx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="compile a Gemma-4, print the report and the error against eager")
    run_demo.add_argument("--preset", choices=sorted(PRESETS))
    run_demo.add_argument("--tokens", type=int, default=16)
    run_demo.add_argument("--layers", type=int, help="reduce depth (default: 4 on GPU, the preset's on CPU)")
    run_inspect = commands.add_parser("inspect", help="compile a preset and dump its graphs before/after the passes")
    run_inspect.add_argument("--preset", required=True, choices=sorted(PRESETS))
    run_inspect.add_argument("--dump-dir", required=True)
    run_inspect.add_argument("--tokens", type=int, default=8)
    run_inspect.add_argument("--layers", type=int)
    run_inspect.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args(argv)
    # transformers' MoE code calls an lru_cache'd helper that Dynamo warns about on every compile: noise here.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")

    if args.command == "demo":
        demo(args.preset, args.tokens, args.layers)
        return 0
    from .inspection import inspect
    from .presets import build_model

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model = build_model(args.preset, dtype=getattr(torch, args.dtype), device=_device(), **overrides)
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=_device())
    report = inspect(model, input_ids, dump_dir=args.dump_dir, use_cache=False)
    print(report)
    print(f"\ngraphs and depyf dump written to {args.dump_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
