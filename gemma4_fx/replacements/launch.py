"""How the custom ops launch their Triton kernels: straight from Python, or recorded for Inductor to launch.

An op's CUDA implementation is registered with `cuda_kernel(op)` and launches through `launcher(kernel)`. Called
normally, that is Triton's own launch. While `passes/inductor_launch.py` traces the implementation
(`tracing_launches()`), each launch is recorded instead (`torch.library.wrap_triton`), so that the traced kernels
replace the op in Inductor's graph and Inductor launches them from its generated code. wrap_triton is not used
outside tracing: its dispatch costs more per call than the launch it wraps.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
from torch.library import wrap_triton

CUDA_KERNELS: dict = {}  # op overload -> its CUDA implementation (what `inductor_launch` traces)
BETWEEN_GRAPHS: dict = {}  # op overload -> its Python function, for the runtime's pieces between graphs
OVERWRITABLE: dict = {}  # Triton kernel -> {output argument: the input arguments it may be stored over}

_tracing = contextvars.ContextVar("gemma4_fx_tracing_launches", default=False)
SMS = 132  # an H100's or H200's SMs: what grids aim to fill where the device has none (the interpreter)


@functools.cache
def sm_count(device: torch.device) -> int:
    """`device`'s SMs: the programs a kernel split over the GPU (split-K, split-KV) aims to fill."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SMS


@functools.cache
def tuned_gpus(device: torch.device) -> tuple[str, ...]:
    """The names of GPUs in the tuned-config tables (`*_configs.py`) that fit `device`, best first: an H100 takes
    the H200's configs (the same SMs); none off CUDA."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else ""
    return ("H100", "H200") if "H100" in name else ("H200",) if "H200" in name else ()


def cuda_kernel(op):
    """Register the decorated function as `op`'s CUDA implementation (it takes the op's arguments)."""
    def register(fn):
        op.register_kernel("cuda")(fn)
        CUDA_KERNELS[op._opoverload] = fn
        return fn
    return register


def between_graphs_op(name: str):
    """`torch.library.custom_op(name, mutates_args=())` for an op the runtime runs between CUDA graphs (attention):
    there it calls the decorated function itself (`runtime.split.call_ops_directly`), since torch.library's
    custom-op layers (autograd, device dispatch, Dynamo's disable) cost as much host time per call as the launches
    of the op's kernels, and the pieces between graphs run without autograd."""
    def define(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        BETWEEN_GRAPHS[op._opoverload] = fn
        return op
    return define


def may_overwrite(kernel, **outputs: tuple[str, ...]) -> None:
    """Declare that `kernel` may store each output over one of the inputs listed for it: each program loads all it
    reads of them before its first store, and no program reads what another stores (row and tile kernels). Inductor
    then writes such an output into an input's buffer that a kernel made and nothing reads after the launch
    (`passes/inductor_launch.py`), as it reuses buffers for its own kernels."""
    OVERWRITABLE[kernel] = outputs


def launcher(kernel):
    """`kernel`, or while tracing its wrap_triton wrapper: index it with the grid and call it as the kernel."""
    return wrap_triton(kernel) if _tracing.get() else kernel


@contextlib.contextmanager
def tracing_launches():
    """Record the launches of the ops' CUDA implementations inside this block (see `launcher`)."""
    token = _tracing.set(True)
    try:
        yield
    finally:
        _tracing.reset(token)

