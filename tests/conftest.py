import os

import torch

# Triton picks interpreter or compiler when @triton.jit decorates, so this must run before any kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` (the marker is declared in pyproject.toml) where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_make_parametrize_id(config, val, argname):
    """Name dtype parameters by their dtype ("bfloat16", not "dtype1"), so `-k bfloat16` selects them."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo: no cached frames, guards or recompile counts from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True, scope="session")
def _interpreter_rounds_bf16_to_nearest_even():
    """The Triton interpreter truncates fp32 -> bf16 casts; the GPU (and PyTorch) round to nearest even."""
    if not triton.knobs.runtime.interpret:
        yield
        return
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.tensor(src.data).to(torch.bfloat16).view(torch.uint16).numpy()
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return truncating(self, src, dst_type)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
        yield
