"""Prefill attention at Gemma-4 widths: gemma4_fx's block-skipping `prefill_attention` against SDPA as transformers
calls it (sliding layers: the cache repeated per query head and a materialised bool mask; global layers:
`is_causal` with `enable_gqa`), and against that SDPA compiled by Inductor.

    python benchmarks/prefill_attention.py              # the table (a minute on an H200)
    python benchmarks/prefill_attention.py --tiles      # also each candidate tile config of ours
    python benchmarks/prefill_attention.py --tokens 772 4096   # other prompt lengths
    python benchmarks/prefill_attention.py --smoke      # tiny widths on CPU under the Triton interpreter

Shapes: one prompt of 4096 tokens (and 1024) through the sliding (window 512 or 1024, head dim 256) and global
(causal, head dim 512; with an image, a mask) layers of E4B and 26B-A4B, and one layer of E4B's vision encoder over
a 768x768 image (2520 patches, the last 216 padding: a mask over the keys alone), bf16. Each variant is one call
captured in a CUDA graph, median replay. "ours" is the attention over a mask made ready (`prefill_attention_mask`),
as the model runs each layer (the pass makes each mask ready once per prompt: "mask made ready" is that launch
alone, "ours, mask made ready in the call" both). "TFLOP/s" counts the FLOPs of the visible scores only (4 * heads *
dim per visible (row, key) pair), so it reads the same for every variant; "max err" is |out - float64| over max
|float64| for ours and for SDPA. "sdpa, additive mask" is SDPA given the mask as the additive float mask that the
pass makes once for the masked calls it leaves to SDPA (the vision encoder's before 2026-12-04). `--tokens` sets the
prompt lengths (the vision layer keeps its 2520 patches).
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:  # Triton picks the interpreter when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import graph_replay_us, markdown  # noqa: E402
from gemma4_fx.replacements import prefill_attention as ops  # noqa: E402

# (name, query heads, kv heads, head dim, window; None: a causal global layer; "image": a global layer's mask with
# an image in the prompt, causal but for the image's 256 tokens, which see each other; "padding": every row sees
# the keys but the last PADDED; tokens: the prompt lengths, None for --tokens)
LAYERS = [("E4B sliding", 8, 2, 256, 512, None), ("E4B global", 8, 2, 512, None, None),
          ("E4B global, image", 8, 2, 512, "image", None), ("26B-A4B sliding", 16, 8, 256, 1024, None),
          ("26B-A4B global", 16, 2, 512, None, None), ("26B-A4B global, image", 16, 2, 512, "image", None),
          ("E4B vision", 12, 12, 64, "padding", [2520])]
PADDED = 216  # patches of 2520 that a 768x768 image (48 x 48 patches of 16) leaves empty
SMOKE_LAYERS = [("tiny sliding", 4, 2, 32, 6, None), ("tiny global", 4, 1, 48, None, None),
                ("tiny vision", 2, 2, 16, "padding", [240])]
TILES = {64: [dict(BLOCK_DV=64, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              dict(BLOCK_DV=64, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
              dict(BLOCK_DV=64, BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              dict(BLOCK_DV=64, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
              dict(BLOCK_DV=64, BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)],
         256: [dict(BLOCK_DV=256, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
               dict(BLOCK_DV=256, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
               dict(BLOCK_DV=256, BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
               dict(BLOCK_DV=128, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)],
         512: [dict(BLOCK_DV=256, BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
               dict(BLOCK_DV=256, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
               dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
               dict(BLOCK_DV=512, BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1),
               dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
               dict(BLOCK_DV=128, BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)]}


def hf_sdpa(q, k, v, mask, scale, causal):
    """transformers' sdpa_attention_forward: with a mask, the cache repeated per query head; causal with GQA."""
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = (t[:, :, None].expand(t.shape[0], t.shape[1], group, *t.shape[2:]).reshape(
        t.shape[0], -1, *t.shape[2:]) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def case(tokens, heads, kv_heads, dim, window, device, dtype):
    """Inputs laid out as the model has them: [1, tokens, heads, dim] projections seen as [1, heads, tokens, dim]."""
    g = torch.Generator(device=device).manual_seed(tokens + dim)
    q = torch.randn((1, tokens, heads, dim), generator=g, device=device).to(dtype).transpose(1, 2)
    k, v = (torch.randn((1, tokens, kv_heads, dim), generator=g, device=device).to(dtype).transpose(1, 2)
            for _ in range(2))
    mask = None
    i, j = torch.arange(tokens, device=device)[:, None], torch.arange(tokens, device=device)[None, :]
    if window == "padding":
        mask = (j < tokens - PADDED) & (i >= 0)
    elif window == "image":  # the image's tokens start a quarter into the prompt
        start = tokens // 4
        mask = ((j <= i) | ((i >= start) & (i < start + 256) & (j >= start) & (j < start + 256)))
    elif window:  # transformers' sliding-window causal mask: key j visible to row i when i - window < j <= i
        mask = (j <= i) & (j > i - window)
    if mask is not None:
        mask = mask.view(1, 1, tokens, tokens)
        visible = int(mask.sum())
    else:
        visible = tokens * (tokens + 1) // 2
    return (q, k, v, mask, 1.0, window is None), 4 * heads * dim * visible  # Gemma-4 scales q by its norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="prompt lengths")
    parser.add_argument("--tiles", action="store_true", help="time each candidate tile config of ours too")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, one call each, no timing")
    args = parser.parse_args()
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    if not args.smoke:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    compiled = torch.compile(hf_sdpa)
    rows = []
    layers, token_counts = (SMOKE_LAYERS, [20]) if args.smoke else (LAYERS, args.tokens)
    for (name, heads, kv_heads, dim, window, _), tokens in ((layer, t) for layer in layers
                                                            for t in layer[5] or token_counts):
        inputs, flops = case(tokens, heads, kv_heads, dim, window, device, dtype)
        q, k, v, mask, scale, causal = inputs
        exact = ops.prefill_attention_reference(q.double(), k.double(), v.double(), mask, scale, causal)
        scale_of = exact.abs().max().item()
        ready = inputs
        if mask is not None:  # made ready once, as the pass has it for a prompt's layers
            ready_mask, ranges = ops.prefill_attention_mask(mask)
            ready = (q, k, v, ready_mask, scale, causal, ranges)
        ours = ops.prefill_attention_triton(*ready)
        row = {"layer": name, "tokens": tokens,
               "ours max err": (ours.double() - exact).abs().max().item() / scale_of,
               "SDPA max err": (hf_sdpa(*inputs).double() - exact).abs().max().item() / scale_of}
        if not args.smoke:
            variants = [("ours", ops.prefill_attention_triton, ready), ("hf sdpa", hf_sdpa, inputs),
                        ("compiled hf sdpa", compiled, inputs)]
            if mask is not None:
                additive = ops.sdpa_additive_mask(mask, dtype)
                variants.append(("sdpa, additive mask", hf_sdpa, (q, k, v, additive, scale, causal)))
            times = {variant: graph_replay_us(fn, *arguments) for variant, fn, arguments in variants}
            row.update({**{f"{variant} us": t for variant, t in times.items()},
                        "ours TFLOP/s": flops / times["ours"] / 1e6,
                        "sdpa / ours": min(t for variant, t in times.items() if variant != "ours") / times["ours"]})
            if mask is not None:
                row["mask made ready us"] = graph_replay_us(ops.prefill_attention_mask, mask)
                row["ours, mask made ready in the call us"] = graph_replay_us(ops.prefill_attention_triton, *inputs)
            if args.tiles:
                for index, tiles in enumerate(TILES.get(triton_dim(dim), [])):
                    try:
                        row[f"tiles {index} us"] = graph_replay_us(
                            lambda *a, tiles=tiles: ops.prefill_attention_triton(*a, tiles=tiles), *ready)
                    except Exception as error:  # noqa: BLE001 (a config that does not fit: said in the table)
                        row[f"tiles {index} us"] = type(error).__name__
        rows.append(row)
    print(markdown(rows))
    if args.tiles:
        print("tiles:", {dim: list(enumerate(configs)) for dim, configs in TILES.items()})


def triton_dim(dim: int) -> int:
    return 1 << (dim - 1).bit_length()


if __name__ == "__main__":
    main()
