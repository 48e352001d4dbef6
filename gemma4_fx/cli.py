"""`gemma4-fx`: the demo and the inspector from the command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .presets import PRESETS


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def demo(preset: str | None = None, tokens: int = 16, layers: int | None = None) -> float:
    """Compile a Gemma-4 with the backend, print the report and the error against eager; returns the max error.

    CPU: the tiny MoE model in bf16. GPU: 26B-A4B widths at 4 layers in bf16 (real widths, reduced depth).
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
    backend = Gemma4Backend(verify=True)
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
        logits = torch.compile(model, backend=backend)(input_ids, use_cache=False).logits
    error = (logits.float() - expected.float()).abs().max().item()
    print(f"gemma4_fx demo: preset {preset}, {model.config.num_hidden_layers} layers, bf16, {tokens} tokens, {device}")
    print(backend.report)
    print(f"\nmax |logits - eager logits| = {error:.4g} (logits up to {expected.float().abs().max().item():.3g})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return error


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
