"""The decoder layer's epilogues on one GPU: the post-attention norm chain and the PLE tail, eager vs Inductor vs
gemma4_fx. (Their share of a whole decode step: `benchmarks/decode.py`, variant "gemma4_fx auto, no epilogues".)

    python benchmarks/layer_epilogues.py [--quick] [--parts blocks accuracy] [--blocks ...]

Blocks are cut from a real `Gemma4TextDecoderLayer` (random weights at the preset's width, bf16) and call its own
submodules in the order `Gemma4TextDecoderLayer.forward` does:

    post_attn dense   h = residual + post_attention_layernorm(attn); ff_in = pre_feedforward_layernorm(h)
    post_attn MoE     the same, then the router (norm·scale, projection, softmax, top-k) and pre_feedforward_layernorm_2
    ple_tail          h = residual + post_feedforward_layernorm(mlp); per-layer gate, gelu·input, projection, norm,
                      residual, * layer_scalar

Each variant runs as the replay of a CUDA graph holding one call (`triton.testing.do_bench` median, L2 cleared
before each), and as plain calls ("plain": what users get with `cudagraphs=None` or with a backward: µs per call of
back-to-back calls, host wall clock, so the host's launch work counts). The floor is the bytes the block must read and write once (activations, weights, outputs)
over the device-to-device copy bandwidth measured here. Kernels are counted with the profiler on one plain call.
Plain calls are host-bound at these sizes and drift by several percent between runs of the same code: a second
Inductor compile of the block ("inductor again") is timed beside the others as the control of that spread.
"""

from __future__ import annotations

import argparse
import os
import sys
import unittest.mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import gemma4_fx  # noqa: E402
from gemma4_fx.replacements.launch import CUDA_KERNELS  # noqa: E402
from benchmarks.common import copy_bandwidth, graph_replay_us, markdown, plain_call_us  # noqa: E402

DTYPE = torch.bfloat16
# gemma4_fx as it was compiled before Inductor launched the ops' kernels (`passes/inductor_launch.py`): each op an
# extern call through the dispatcher and Triton's Python launcher.
EXTERN = "gemma4_fx, ops as extern calls"
CONTROL = "inductor again"
BYTES = 2  # bf16


class PostAttention(torch.nn.Module):
    """`Gemma4TextDecoderLayer.forward` from the attention output to the inputs of the MLP (and MoE) block."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, attn, residual):
        layer = self.layer
        h = residual + layer.post_attention_layernorm(attn)
        ff_in = layer.pre_feedforward_layernorm(h)
        if not layer.enable_moe_block:
            return h, ff_in
        flat = h.reshape(-1, h.shape[-1])
        _, weights, ids = layer.router(flat)
        return h, ff_in, layer.pre_feedforward_layernorm_2(flat), weights, ids


class PLETail(torch.nn.Module):
    """`Gemma4TextDecoderLayer.forward` from the MLP output to the layer's output."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, mlp_out, residual, per_layer_input):
        layer = self.layer
        h = residual + layer.post_feedforward_layernorm(mlp_out)
        g = layer.act_fn(layer.per_layer_input_gate(h)) * per_layer_input
        out = h + layer.post_per_layer_input_norm(layer.per_layer_projection(g))
        return out * layer.layer_scalar


def decoder_layer(preset: str):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

    config = gemma4_fx.text_config(preset)
    with torch.device("cuda"):
        layer = Gemma4TextDecoderLayer(config, layer_idx=0).to(DTYPE)
    gemma4_fx.randomize_(layer, seed=0)
    with torch.no_grad():
        layer.layer_scalar.fill_(0.75)
    return layer.eval(), config


BLOCKS = {  # name: (preset, module)
    "post_attn dense (31B)": ("31b", PostAttention),
    "post_attn dense (E2B)": ("e2b", PostAttention),
    "post_attn MoE (26B-A4B)": ("26b-a4b", PostAttention),
    "ple_tail (E2B)": ("e2b", PLETail),
}


def inputs(block: torch.nn.Module, config, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = config.hidden_size
    spread = torch.logspace(-1, 1, tokens, device="cuda")[:, None]  # per-token scales over two decades

    def act(width, scale=1.0):
        return (torch.randn(1, tokens, width, device="cuda", generator=g) * spread * scale).to(DTYPE)

    if isinstance(block, PLETail):
        return act(hidden), act(hidden, 4.0), act(config.hidden_size_per_layer_input)
    return act(hidden), act(hidden, 4.0)


def floor_bytes(block: torch.nn.Module, config, tokens: int) -> int:
    """Bytes a perfect implementation moves: every activation in and out once, every weight once."""
    hidden, layer = config.hidden_size, block.layer
    if isinstance(block, PLETail):
        weights = sum(t.numel() for t in (layer.per_layer_input_gate.weight, layer.per_layer_projection.weight,
                                          layer.post_feedforward_layernorm.weight,
                                          layer.post_per_layer_input_norm.weight, layer.layer_scalar))
        return (weights + tokens * (3 * hidden + config.hidden_size_per_layer_input)) * BYTES
    if not layer.enable_moe_block:
        return 4 * tokens * hidden * BYTES + 2 * hidden * BYTES
    moe_weights = sum(p.numel() for p in (*layer.router.parameters(), layer.pre_feedforward_layernorm_2.weight))
    return (5 * tokens * hidden + 2 * hidden + moe_weights) * BYTES + tokens * config.top_k_experts * (4 + 8)


def kernels_launched(fn, args) -> int:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def backend(patterns=None) -> gemma4_fx.Gemma4Backend:
    """Our backend without its own CUDA graphs: every variant here runs inside graphs the benchmark holds."""
    return gemma4_fx.Gemma4Backend(patterns, cudagraphs=None)


def relative_error(outs, exact) -> float:
    """Largest ‖out - float64‖ / ‖float64‖ over the activation outputs (the router's fp32 weights follow its ids,
    which are compared on their own)."""
    return max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outs, exact) if o.dtype == DTYPE)


def bench_blocks(names, sizes, bandwidth) -> list[dict]:
    rows = []
    for name in names:
        preset, cls = BLOCKS[name]
        layer, config = decoder_layer(preset)
        block = cls(layer)
        our_backend = backend()
        variants = {"eager": block, "inductor": torch.compile(block, dynamic=False),
                    "gemma4_fx": torch.compile(block, backend=our_backend, dynamic=False),
                    EXTERN: torch.compile(block, backend=backend(), dynamic=False)}
        control = torch.compile(cls(layer), dynamic=False)
        for tokens in sizes:
            torch._dynamo.reset()
            our_backend.reset()
            args = inputs(block, config, tokens, seed=tokens)
            row = {"block": name, "tokens": tokens}
            with torch.no_grad(), unittest.mock.patch.dict(CUDA_KERNELS, clear=True):
                variants[EXTERN](*args)  # compiled now, with no op for inductor_launch to launch
            for variant, fn in variants.items():
                try:
                    row[variant] = graph_replay_us(fn, *args)
                    row[f"{variant} kernels"] = kernels_launched(fn, args)
                except Exception as error:  # a variant that fails to compile or capture is reported, not fatal
                    print(f"{name} {variant} at {tokens} tokens failed: {error!r}")
            plain = plain_call_us({**variants, CONTROL: control}, *args, calls=100, repeats=15)
            row.update({f"{variant} plain": us for variant, us in plain.items()})
            for suffix in ("", " plain"):
                if f"gemma4_fx{suffix}" in row and f"inductor{suffix}" in row:
                    row[f"inductor / gemma4_fx{suffix}"] = row[f"inductor{suffix}"] / row[f"gemma4_fx{suffix}"]
            row["floor"] = floor_bytes(block, config, tokens) / bandwidth * 1e6
            if "gemma4_fx" in row:
                row["gemma4_fx / floor"] = row["gemma4_fx"] / row["floor"]
            if tokens == sizes[-1]:
                row["report"] = dict(our_backend.report.counts)
            rows.append(row)
            print(row, flush=True)
        del block, layer, variants, control
    return rows


def accuracy(names, tokens: int) -> list[dict]:
    """Each block's outputs against a float64 run of the same module: gemma4_fx vs eager vs Inductor."""
    rows = []
    for name in names:
        preset, cls = BLOCKS[name]
        layer, config = decoder_layer(preset)
        block = cls(layer)
        args = inputs(block, config, tokens, seed=123)
        torch._dynamo.reset()
        with torch.no_grad():
            exact = cls(decoder_layer(preset)[0].double())(*(a.double() for a in args))
            eager = block(*args)
            row = {"block": name, "tokens": tokens}
            for variant, fn in (("eager", block), ("inductor", torch.compile(block, dynamic=False)),
                                ("gemma4_fx", torch.compile(block, backend=backend(), dynamic=False))):
                outs = fn(*args)
                row[f"{variant} rel. error"] = relative_error(outs, exact)
                if len(outs) == 5:  # MoE: expert ids against eager's
                    row[f"{variant} ids != eager"] = (outs[4] != eager[4]).any(-1).sum().item()
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tokens 1, 64 and 4096 only")
    parser.add_argument("--parts", nargs="+", default=["blocks", "accuracy"], choices=["blocks", "accuracy"])
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=list(BLOCKS), metavar="BLOCK")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    sizes = [1, 64, 4096] if args.quick else [1, 16, 64, 512, 4096]
    tables = {}
    if "blocks" in args.parts:
        rows = bench_blocks(args.blocks, sizes, bandwidth)
        tables["Blocks: CUDA graph replay (L2 cleared) and plain calls (back to back), µs, median"] = rows
    if "accuracy" in args.parts:
        tables["‖out - float64‖ / ‖float64‖, worst output (512 tokens)"] = accuracy(args.blocks, 512)
    for title, rows in tables.items():
        print(f"\n### {title}\n\n{markdown(rows)}")


if __name__ == "__main__":
    main()
