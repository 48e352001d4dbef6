"""`passes/inductor_launch.py` on a CPU: the ops on (fake) CUDA tensors become Inductor-launched Triton kernels.

Tracing records launches only where Triton compiles (the interpreter runs kernels instead), so the graphs are built
and rewritten in a subprocess without TRITON_INTERPRET, on fake CUDA tensors, with Triton told it targets a Hopper
GPU (Inductor's analysis of which arguments a kernel writes compiles the kernel to Triton IR). The kernels' numerics
under Inductor are checked on the GPU (`test_gpu.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

OPS = ("post_attn_norm", "router_input", "router_select", "ple_norm_add", "ple_gate")


def _rewrite(dynamic: bool, hopper: bool, exact_router: bool = False, layer_kind: str = "every_op") -> dict:
    """Trace a graph of every op (`layer_kind` "chain": of a layer's chain of ops whose inputs die as it goes;
    "view": of an op whose dying input is a view; "mask": `prefill_attention_mask` over a bool mask) over fake CUDA
    tensors, run the pass; what the graph calls before and after."""
    import torch
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from triton.backends.compiler import GPUTarget

    from gemma4_fx.passes import inductor_launch
    from gemma4_fx.passes.context import PassContext
    from gemma4_fx.report import Report
    from helpers import dying_chain, every_op

    if hopper:
        class Hopper:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)
        triton.runtime.driver.set_active(Hopper())

    def layer(*inputs):
        return every_op(*inputs, top_k=4, exact_router=exact_router)

    def layer_chain(*inputs):
        return dying_chain(*inputs[:4])

    def layer_view(attn, residual, weight, scale, *_):
        viewed = (residual * 2).t().t()  # the output's layout, but a view: its memory may be read through another
        return (torch.ops.gemma4_fx.ple_norm_add(attn * 2, viewed, weight, scale, 1e-6),)

    def layer_mask(attn, *_):
        return torch.ops.gemma4_fx.prefill_attention_mask(attn.new_empty(attn.shape[0], 5, dtype=torch.bool))

    mode = FakeTensorMode(shape_env=ShapeEnv())
    shapes = [(5, 64), (5, 64), (64,), (1,), (5, 16), (16,)]
    inputs = [mode.from_tensor(torch.empty(shape, dtype=torch.bfloat16), static_shapes=not dynamic)
              for shape in shapes]
    with mode:
        inputs = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in inputs]
        layers = {"every_op": layer, "chain": layer_chain, "view": layer_view, "mask": layer_mask}
        graph = make_fx(layers[layer_kind], tracing_mode="real")(*inputs).graph
    ctx = PassContext("graph", Report(()), {})
    inductor_launch.apply(graph, ctx)
    graph.lint()
    calls = [n for n in graph.nodes if n.op == "call_function"]
    launches = [n for n in calls if n.target is triton_kernel_wrapper_functional]
    outputs = graph.find_nodes(op="output")[0].args[0]
    return {
        "ops": sorted(str(n.target).split(".")[1] for n in calls if str(n.target).startswith("gemma4_fx.")),
        "kernels": [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in launches],
        "grids": [str(n.kwargs["grid"]) for n in launches],
        # Launch settings are printed into Inductor's code: plain ints, never symbolic expressions.
        "settings_are_ints": all(isinstance(config.num_warps, int) for n in launches
                                 for config in kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).configs),
        "outputs_from_launches": [o.args[0].target is triton_kernel_wrapper_functional for o in outputs],
        # Views of the inputs would cost Inductor's launches host time per call (`rows.rows_of`).
        "views": [str(n.target) for n in calls
                  if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                                  torch.ops.aten._unsafe_view.default)],
        "skipped": sorted({s.reason for s in ctx.report.skipped}),
        # What each kernel stores its outputs into: a buffer allocated for it, or an input that dies there.
        "stored_into": [sorted(getattr(n.kwargs["kwargs"][name].target, "__name__", "") for name in
                               n.kwargs["tensors_to_clone"]) for n in launches],
    }


def _run(*args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_every_op_becomes_its_kernels(dynamic):
    got = _run("dynamic" if dynamic else "static", "hopper")
    assert got["ops"] == []
    assert got["kernels"] == ["_post_attn_norm_kernel", "_router_input_kernel", "_router_select_kernel",
                              "_norm_add_kernel", "_gate_kernel"]
    assert all(got["outputs_from_launches"]) and got["settings_are_ints"]
    assert got["skipped"] == [] and got["views"] == []
    # One program per row: the grid follows the rows, symbolic under dynamic shapes.
    assert ("(5, 1, 1)" in got["grids"][0]) != dynamic


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_mask_made_ready_becomes_its_kernel(dynamic):
    """`prefill_attention_mask`, which runs inside the graphs (the prompt's masks made ready once), is one kernel
    Inductor launches; its grid follows the query rows."""
    got = _run("dynamic" if dynamic else "static", "hopper", "mask")
    assert got["ops"] == [] and got["kernels"] == ["_mask_key_ranges"], got
    assert all(got["outputs_from_launches"]) and got["settings_are_ints"] and got["skipped"] == []
    assert ("(1, 1, 1)" in got["grids"][0]) != dynamic, got["grids"]


def test_exact_router_prologue_stays_eagers_ops():
    """With router_exact the prologue launches no Triton kernel: it stays an op, and nothing is reported."""
    got = _run("static", "hopper", "exact")
    assert got["ops"] == ["router_input"]
    assert "_router_input_kernel" not in got["kernels"] and len(got["kernels"]) == 4
    assert got["skipped"] == []


def test_outputs_are_stored_over_inputs_that_die():
    """An output is stored over an input that a kernel made and nothing reads after the launch (Inductor then
    allocates nothing for it): in the chain, the PLE ops' over the launches' outputs before them, while the norm
    chain's keeps its buffer over a pointwise op's (Inductor lays those out itself); in the every-op graph, whose
    tensors are all graph inputs or outputs, each output keeps its buffer."""
    assert _run("static", "hopper", "chain")["stored_into"] == [["new_empty.default", "new_empty.default"],
                                                                ["getitem"], ["getitem"]]
    got = _run("static", "hopper")
    assert all(name.split(".")[0] in ("empty", "new_empty") for written in got["stored_into"] for name in written), \
        got["stored_into"]
    assert _run("static", "hopper", "view")["stored_into"] == [["empty.memory_format"]]  # a view is never reused


def test_ops_stay_when_the_write_analysis_fails():
    """Without a GPU target Inductor cannot compile the kernels to find what they write: it would take every
    argument as written, inputs included. Every op then stays, with the reason."""
    got = _run("static", "no-target")
    assert got["ops"] == sorted(OPS)
    assert got["kernels"] == []
    assert len(got["skipped"]) == 1 and "could not tell which arguments a kernel writes" in got["skipped"][0]


if __name__ == "__main__":
    kind = next((arg for arg in sys.argv[3:] if arg in ("chain", "view", "mask")), "every_op")
    print(json.dumps(_rewrite(sys.argv[1] == "dynamic", sys.argv[2] == "hopper", "exact" in sys.argv[3:], kind)))
