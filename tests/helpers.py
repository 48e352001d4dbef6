"""What several test modules share: kernel-test parameters, seeded inputs, ulp distances, a lone router module, a
backend that runs only YOCO, CUDA-graph capture simulated on CPU, kernels compiled for sm_90 without a GPU."""

import os
import subprocess
import sys
import zlib

import pytest
import torch
import triton

import gemma4_fx.runtime.cudagraphs as cudagraphs
from gemma4_fx.passes import yoco
from gemma4_fx.report import Report
from gemma4_fx.runtime.cudagraphs import GraphRunner, shape_inputs
from gemma4_fx.runtime.split import split_graph

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRET = triton.knobs.runtime.interpret
DEVICES = [  # where kernel tests run their Triton kernels
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs the interpreter")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def seeded(*key) -> torch.Generator:
    """A generator seeded by the test's parameters: fresh inputs per case, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their (common) dtype; +0 and -0 are 0 apart."""
    int_dtype = {2: torch.int16, 4: torch.int32}[a.element_size()]
    mask = torch.iinfo(int_dtype).max

    def ordered(t):
        bits = t.contiguous().view(int_dtype).long()
        return torch.where(bits < 0, -(bits & mask), bits)

    return (ordered(a) - ordered(b)).abs()


class TopK(torch.nn.Module):
    """A Gemma-4 router used as the MoE block uses it: the probabilities are dropped, (weights, ids) go on."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, hidden_states):
        _, weights, ids = self.router(hidden_states)
        return weights, ids


class YocoOnly:
    """A backend that applies the pass to Dynamo's graph and runs the result eagerly; keeps what it compiled."""

    def __init__(self):
        self.report, self.graphs = Report((yoco.NAME,)), []

    def __call__(self, gm, example_inputs):
        self.graphs.append(yoco.apply(gm, example_inputs, report=self.report, graph_name=f"graph_{len(self.graphs)}"))
        return self.graphs[-1]


def attention_query_rows(gm):
    """Query rows of each attention op of a graph (from Dynamo's example values)."""
    return [node.meta["example_value"].shape[-2] for node in gm.graph.nodes
            if node.op == "call_function" and node.target is torch.nn.functional.scaled_dot_product_attention]


def hopper_ptx(kernel, signature: dict, constexprs: dict, **options) -> str:
    """`kernel` compiled for sm_90 without a GPU (Triton's own ptxas): the PTX of a Hopper-only path, which the
    interpreter cannot run. Compiled in a process of its own, where Triton is not in interpreter mode."""
    function = getattr(kernel, "fn", kernel)  # the Python function a JIT or interpreted kernel wraps
    script = f"""
import importlib, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
kernel = getattr(importlib.import_module({function.__module__!r}), {function.__name__!r})
constexprs = {constexprs!r}
source = ASTSource(kernel, {{**{signature!r}, **dict.fromkeys(constexprs, "constexpr")}}, constexprs=constexprs)
sys.stdout.write(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={options!r}).asm["ptx"])
"""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def dynamo_graph(fn, *args, dynamic=None, **kwargs) -> tuple[torch.fx.GraphModule, list]:
    """Dynamo's graph of `fn(*args, **kwargs)`, traced afresh as one graph (what the graph passes rewrite and the
    runtime splits), and the inputs Dynamo calls it with."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return lambda *inputs: (graphs.append(inputs), gm(*inputs))[1]

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=record, fullgraph=True, dynamic=dynamic)(*args, **kwargs)
    gm, inputs = graphs
    return gm, list(inputs)


def decode_steps(model, forwards, ids, positions, max_cache_len):
    """Each of `forwards` (eager's first) decoding one token per sequence over an HF static cache of its own, each
    cache prefilled with `ids` by eager: per position, (position, each forward's logits, the caches); the token fed
    next is eager's greedy one."""
    from transformers import StaticCache

    from gemma4_fx.presets import cache_kwargs

    caches = [StaticCache(config=model.config, max_cache_len=max_cache_len) for _ in forwards]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache_kwargs(model, cache), use_cache=True)
        token = ids[:, -1:]
        for position in positions:
            kwargs = dict(use_cache=True, cache_position=torch.tensor([position], device=ids.device))
            logits = [forward(token, **cache_kwargs(model, cache), **kwargs).logits
                      for forward, cache in zip(forwards, caches)]
            yield position, logits, caches
            token = logits[0].argmax(-1)


def fake_capture(fn, args, pool):
    """A CUDA graph on CPU: replays recompute into the memory of the capture's outputs, from the captured inputs'
    memory. Like a graph and its pool, it keeps that memory alive but none of the tensors."""
    inputs = [arg.clone() if isinstance(arg, torch.Tensor) else None for arg in args]
    outputs = fn(*args)
    for arg, before in zip(args, inputs):  # capturing runs nothing: undo what the run wrote (the caches)
        if before is not None and torch._debug_has_internal_overlap(arg) != 1:
            arg.copy_(before)
    memory = [t.untyped_storage() for t in [*args, *outputs] if isinstance(t, torch.Tensor)]
    static_args, static_outputs = ([cudagraphs._unowned(t) if isinstance(t, torch.Tensor) else t for t in tensors]
                                   for tensors in (args, outputs))

    def replay():
        assert memory
        for static, new in zip(static_outputs, fn(*static_args)):
            if isinstance(static, torch.Tensor):
                cudagraphs._written(static).copy_(cudagraphs._written(new))

    return replay, outputs


def runner_backend(runtime, *, split_attention=True, extra_ops=(), report=None):
    """A backend that runs the split graph's pieces uncompiled under the runtime, capturing even on CPU."""

    def backend(gm, example_inputs):
        split = split_graph(gm, split_attention=split_attention, extra_ops=extra_ops)
        return GraphRunner(split, [piece.module for piece in split.captured], shape_inputs(gm), runtime,
                           capture=True, report=report)

    return backend


EVERY_OP_OUTPUTS = ("h", "ff", "moe", "router", "router_in", "weights", "ids", "normed", "gated")


def every_op(attn, residual, weight, scale, logits, expert_scale, top_k: int, exact_router: bool = False):
    """Each gemma4_fx op that Inductor can launch, chained as a layer chains them (outputs: `EVERY_OP_OUTPUTS`)."""
    ops, root_size = torch.ops.gemma4_fx, 0.0625  # a constant: a size-derived one is symbolic under dynamic shapes
    h, ff, moe, router = ops.post_attn_norm(attn, residual, weight, weight, [1e-6] * 4, weight, weight, root_size)
    router_in = ops.router_input(ff, weight, 1e-6, root_size, exact_router)
    weights, ids = ops.router_select(logits, expert_scale, top_k)
    normed = ops.ple_norm_add(h, router_in, weight, scale, 1e-6)
    return h, ff, moe, router, router_in, weights, ids, normed, ops.ple_gate(normed, moe)


def dying_chain(attn, residual, weight, scale):
    """A dense layer's epilogue ops chained so that each op's inputs die at it: an output can be stored over one of
    its op's inputs where the kernel allows it (`launch.may_overwrite`)."""
    ops = torch.ops.gemma4_fx
    h, ff = ops.post_attn_norm(attn * 2, residual * 2, weight, weight, [1e-6] * 2, None, None, 1.0)
    return (ops.ple_gate(ops.ple_norm_add(ff, h, weight, scale, 1e-6), residual),)
