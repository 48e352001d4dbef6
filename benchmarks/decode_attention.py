"""One-query-row attention over a KV cache at Gemma-4 widths: gemma4_fx's split-KV `decode_attention` against SDPA
as transformers calls it (the cache repeated per query head, a bool mask) and against SDPA compiled by Inductor.

    python benchmarks/decode_attention.py            # the table (a minute on an H200)
    python benchmarks/decode_attention.py --smoke    # tiny widths on CPU under the Triton interpreter: does it run?

Shapes: the sliding (head dim 256, 512-key window) and global (head dim 512) layers of E2B (8 query heads, 1 kv
head) and E4B (8 and 2), batch 1 / 8 / 32, a cache of 1024 and 4096 keys for the global layers, each sequence seeing
all but its last few. bf16. Each variant is one call captured in a CUDA graph, median replay (`do_bench` clears L2
before each, as the rest of a decode step does). The floor is the cache bytes read (k and v once) plus q and the
output over the measured copy bandwidth. "max err" is |out - float64| over max |float64| for ours and for SDPA.
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

from benchmarks.common import copy_bandwidth, graph_replay_us, markdown  # noqa: E402
from gemma4_fx.replacements import decode_attention as ops  # noqa: E402

# (name, query heads, kv heads, head dim, keys)
LAYERS = [("E2B sliding", 8, 1, 256, 512), ("E2B global", 8, 1, 512, 1024), ("E2B global", 8, 1, 512, 4096),
          ("E4B sliding", 8, 2, 256, 512), ("E4B global", 8, 2, 512, 1024), ("E4B global", 8, 2, 512, 4096)]
SMOKE_LAYERS = [("tiny", 4, 2, 32, 48)]


def hf_sdpa(q, k, v, mask, scale):
    """transformers' sdpa_attention_forward with a mask: the cache repeated per query head, then SDPA."""
    group = q.shape[1] // k.shape[1]
    k, v = (t[:, :, None].expand(t.shape[0], t.shape[1], group, *t.shape[2:]).reshape(
        t.shape[0], -1, *t.shape[2:]) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def case(batch, heads, kv_heads, dim, keys, device, dtype):
    g = torch.Generator(device=device).manual_seed(batch * keys + dim)
    q = torch.randn((batch, heads, 1, dim), generator=g, device=device).to(dtype)
    k, v = (torch.randn((batch, kv_heads, keys, dim), generator=g, device=device).to(dtype) for _ in range(2))
    seen = keys - torch.randint(0, 8, (batch,), generator=g, device=device)  # each sequence's visible keys
    mask = (torch.arange(keys, device=device)[None, :] < seen[:, None]).view(batch, 1, 1, keys)
    return q, k, v, mask, dim ** -0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, one call each, no timing")
    args = parser.parse_args()
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    bandwidth = None if args.smoke else copy_bandwidth()
    if bandwidth:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    compiled = torch.compile(hf_sdpa)
    rows = []
    for (name, heads, kv_heads, dim, keys), batch in ((layer, b) for layer in (SMOKE_LAYERS if args.smoke else LAYERS)
                                                        for b in args.batch):
        q, k, v, mask, scale = case(batch, heads, kv_heads, dim, keys, device, dtype)
        exact = ops.decode_attention_reference(q.double(), k.double(), v.double(), mask, scale)
        scale_of = exact.abs().max().item()
        ours = ops.decode_attention_triton(q, k, v, mask, scale)
        row = {"layer": name, "batch": batch, "keys": keys,
               "ours max err": (ours.double() - exact).abs().max().item() / scale_of,
               "SDPA max err": (hf_sdpa(q, k, v, mask, scale).double() - exact).abs().max().item() / scale_of}
        if not args.smoke:
            floor = (2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()) / bandwidth * 1e6
            times = {variant: graph_replay_us(fn, q, k, v, mask, scale) for variant, fn in (
                ("ours", ops.decode_attention_triton), ("hf sdpa", hf_sdpa), ("compiled hf sdpa", compiled))}
            row.update({"floor us": floor, **{f"{variant} us": t for variant, t in times.items()},
                        "sdpa / ours": times["hf sdpa"] / times["ours"],
                        "ours / floor": times["ours"] / floor})
        rows.append(row)
    print(markdown(rows))


if __name__ == "__main__":
    main()
