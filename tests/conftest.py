import os

import torch

# Triton picks interpreter or compiler when @triton.jit decorates, so this must run before any kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` (the marker is declared in pyproject.toml) where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo: no cached frames, guards or recompile counts from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
