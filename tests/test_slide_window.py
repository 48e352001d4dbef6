"""The in-place sliding-window update: the kernel under TRITON_INTERPRET=1 (CPU) against eager's roll, write and copy
back, and the pass on Dynamo's graph of HF's StaticSlidingWindowLayer (and of graphs that only look like it)."""

import pytest
import torch

from gemma4_fx.replacements import slide_window as ops
from helpers import DEVICES, decode_steps, dynamo_graph, seeded


def hf_update(cache, new):
    """What transformers' StaticSlidingWindowLayer.update does once the window is full, as it writes it."""
    rolled = cache.roll(-1, dims=-2)
    rolled[:, :, torch.tensor([-1], device=cache.device)] = new
    cache.copy_(rolled)


def cache_tensors(caches):
    """(eager's, ours) for the keys and the values of each cache layer (KV-shared layers hold none)."""
    return [(getattr(a, name), getattr(b, name)) for a, b in zip(caches[0].layers, caches[1].layers)
            for name in ("keys", "values") if getattr(a, name, None) is not None]


CASES = {  # (batch, heads, window, dim, chunk): None for the launcher's default
    "default": (2, 3, 70, 24, None),
    "ragged-chunks": (2, 3, 70, 32, 16),  # the last chunk 6 rows
    "one-chunk": (1, 2, 16, 16, 16),  # no edge rows
    "row-per-program": (2, 2, 9, 8, 1),  # every row an edge
    "one-row": (3, 1, 1, 8, None),  # the window is the new token
    "e2b-sliding": (4, 1, 512, 256, None),
    "26b-sliding": (2, 8, 1024, 256, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_equals_eager(case, dtype, device):
    """Bitwise transformers' update (a copy moves bits), with `new` laid out as transformers makes it ([B, 1, H, D]
    transposed: not contiguous)."""
    batch, heads, window, dim, chunk = CASES[case]
    g = seeded(case, dtype)
    cache = torch.randn(batch, heads, window, dim, generator=g).to(dtype).to(device)
    new = torch.randn(batch, 1, heads, dim, generator=g).to(dtype).to(device).transpose(1, 2)
    expected = cache.clone()
    hf_update(expected, new)
    ops.slide_window_triton(cache, new, chunk=chunk)
    assert torch.equal(cache, expected)


def test_op_mutates_and_checks_its_inputs():
    cache = torch.randn(2, 2, 5, 4)
    new = torch.randn(2, 2, 1, 4)
    expected = cache.clone()
    hf_update(expected, new)
    assert torch.ops.gemma4_fx.slide_window(cache, new) is None and torch.equal(cache, expected)
    with pytest.raises(ValueError, match="cache must be a contiguous"):
        ops.check_inputs(cache.transpose(1, 2), new)
    with pytest.raises(ValueError, match=r"new must be a \[2, 2, 1, 4\] torch.float32"):
        ops.check_inputs(cache, new.expand(2, 2, 3, 4))
    with pytest.raises(ValueError, match="new must be"):
        ops.check_inputs(cache, new.double())


@pytest.mark.compat  # the update as each transformers version writes it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_steps_past_the_window_through_the_backend(dtype):
    """Tiny E2B (a 6-token window) over HF's static cache filled past it, three decode steps: every full sliding
    window updated in place (K and V of each sliding layer with a cache of its own); the logits and the cache
    bitwise those of the backend without the pass, and in fp32 eager's (in bf16 the backend's own roundings, with
    the pass or without, move this tiny model's logits by a few percent over three steps)."""
    import gemma4_fx

    model = gemma4_fx.build_model("tiny-e2b", dtype=dtype)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    backends = [gemma4_fx.Gemma4Backend(cudagraphs=None, patterns=patterns)
                for patterns in (None, [p for p in gemma4_fx.GRAPH_PASSES if p != "slide_window"]
                                 + list(gemma4_fx.PATTERNS))]
    forwards = [model] + [torch.compile(model, backend=backend) for backend in backends]
    for position, (eager, ours, without), caches in decode_steps(model, forwards, ids, range(12, 15), 40):
        assert torch.equal(ours, without), position
        if dtype == torch.float32:
            assert (ours - eager).abs().max().item() <= 1e-4 * eager.abs().max().item(), position
        assert all(torch.equal(a, b) for a, b in cache_tensors(caches[1:])), position
    sliding = [layer for layer in caches[1].layers if getattr(layer, "is_sliding", False)]
    report = backends[0].report
    assert sliding and report.counts["slide_window"] == 2 * len(sliding) * len(report.graphs), report
    assert "slide_window" not in backends[1].report.counts


def test_decode_steps_from_captured_pieces():
    """The update inside pieces of the split graph, captured (simulated on CPU) and replayed: the cache is a mutated
    input the pieces write where it is, so six steps past the window give eager's logits."""
    import gemma4_fx
    import gemma4_fx.runtime.cudagraphs as cudagraphs
    from gemma4_fx.passes import slide_window
    from gemma4_fx.report import Report
    from gemma4_fx.runtime.cudagraphs import CUDAGraphRuntime
    from helpers import fake_capture, runner_backend

    model = gemma4_fx.build_model("tiny-e2b")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    runtime, report = CUDAGraphRuntime(max_shapes=8), Report((slide_window.NAME,))
    pieces = runner_backend(runtime)
    forwards = [model, torch.compile(model, backend=lambda gm, inputs: pieces(slide_window.apply(gm, report=report),
                                                                                  inputs))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudagraphs, "_capture", fake_capture)
        for position, (eager, ours), _ in decode_steps(model, forwards, ids, range(12, 18), 40):
            assert (ours - eager).abs().max().item() <= 1e-4 * eager.abs().max().item(), position
    assert report.counts[slide_window.NAME] and runtime.stats.captures and runtime.stats.replays, runtime.stats


class Update(torch.nn.Module):
    """HF's update (`how="hf"`), or graphs that look like it: another shift, the new row written elsewhere, no copy
    back, the cache read between the roll and the copy back, a new row broadcast over the batch."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, cache, new):
        shift = 1 if self.how == "shift+1" else -1
        rolled = cache.roll(shift, dims=-2)
        row = torch.tensor([0 if self.how == "first-row" else -1])
        read = cache.sum() if self.how == "read-between" else 0
        rolled[:, :, row] = new[:1] if self.how == "broadcast" else new
        if self.how == "no-copy":
            return rolled * 2
        cache.copy_(rolled)
        return cache * 2 + read


@pytest.mark.parametrize("how, reason", [
    ("hf", None),
    ("shift+1", "not a candidate"),
    ("first-row", "not a candidate"),
    ("no-copy", "not a candidate"),
    ("read-between", "the cache is read between the roll and the copy back"),
    ("broadcast", "(broadcast)"),
])
def test_pass_rewrites_what_it_takes_and_says_why_not(how, reason):
    """The update is rewritten, a look-alike left as it was (its reason in the report where it is one); the output
    and the cache stay eager's."""
    from gemma4_fx.passes import slide_window
    from gemma4_fx.report import Report

    g = seeded(how)
    cache, new = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
    module = Update(how)
    report = Report((slide_window.NAME,))
    gm = slide_window.apply(dynamo_graph(module, cache.clone(), new)[0], report=report)
    ours, eager = cache.clone(), cache.clone()
    named = {"L_cache_": ours, "L_new_": new}
    got = gm(*(named[p.target] for p in gm.graph.find_nodes(op="placeholder")))[0]
    torch.testing.assert_close(got, module(eager, new), rtol=0, atol=0)
    assert torch.equal(ours, eager)
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.gemma4_fx.slide_window.default]
    if reason is None:
        assert report.counts[slide_window.NAME] == 1 and len(fused) == 1, report
        assert not any(n.op == "call_method" and n.target in ("roll", "copy_") for n in gm.graph.nodes), gm.code
    elif reason == "not a candidate":
        assert not fused and not report.skipped, report
    else:
        assert not fused and reason in report.skipped[0].reason, report


def test_update_a_backward_needs_is_left_alone():
    """With grad on and the new row requiring grad, the kernel (which has no backward) is not installed: the pass
    says why, and the compile gives eager's output, cache and gradient."""
    import gemma4_fx

    g = seeded("grad")
    cache, new = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
    module, backend = Update("hf"), gemma4_fx.Gemma4Backend(patterns=["slide_window"])
    results = []
    for forward in (module, torch.compile(module, backend=backend)):
        row, window = new.clone().requires_grad_(), cache.clone()
        out = forward(window, row)
        out.square().sum().backward()
        results.append((out.detach(), window.detach(), row.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not backend.report.matches and not backend.report.fallbacks, backend.report
    assert [skip.reason for skip in backend.report.skipped] == [
        "a backward may follow (the new row requires grad): the kernel has none"], backend.report


@pytest.mark.parametrize("batch, taken", [(1, False), (8, True)])
def test_cuda_windows_below_the_size_that_gains_are_left_alone(batch, taken):
    """On CUDA, 26B-A4B's window at bs 1 (4 MiB, below MIN_WINDOW_BYTES) is left alone with the reason, at bs 8
    (32 MiB) taken: HF's update traced on CPU, its cache and new row then made fake CUDA tensors of those sizes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gemma4_fx.passes import slide_window
    from gemma4_fx.report import Report

    gm, _ = dynamo_graph(Update("hf"), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 1, 4))
    with FakeTensorMode():
        fakes = {"L_cache_": torch.empty(batch, 8, 1024, 256, dtype=torch.bfloat16, device="cuda"),
                 "L_new_": torch.empty(batch, 8, 1, 256, dtype=torch.bfloat16, device="cuda")}
    for placeholder in gm.graph.find_nodes(op="placeholder"):
        placeholder.meta["example_value"] = fakes[placeholder.target]
    report = Report((slide_window.NAME,))
    slide_window.apply(gm, report=report)
    assert report.counts[slide_window.NAME] == int(taken), report
    assert taken or "4.0 MiB: below 16 MiB" in report.skipped[0].reason, report


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_26b_sliding_layers_past_the_window_on_cuda(batch):
    """26B-A4B at real widths (2 layers: a sliding one and the last, global; bf16, random weights) over a static
    cache past its 1024-token window, decode steps replayed from the backend's CUDA graphs: at bs 8 every window
    updated in place, at bs 1 none (too small); eager's cache and greedy token after each step."""
    import gemma4_fx

    model = gemma4_fx.build_model("26b-a4b", dtype=torch.bfloat16, device="cuda", num_hidden_layers=2)
    ids = torch.randint(3, 1000, (batch, 1030), device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    backend = gemma4_fx.Gemma4Backend()
    forwards = [model, torch.compile(model, backend=backend)]
    for position, (expected, got), caches in decode_steps(model, forwards, ids, range(1030, 1034), 1040):
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), position
        for a, b in cache_tensors(caches):
            assert (a - b).abs().max().item() <= 2e-2 * a.abs().max().item(), position
    sliding = sum(getattr(layer, "is_sliding", False) for layer in caches[1].layers)
    report = backend.report
    if batch == 1:  # 4 MiB windows: left alone, with the reason
        assert sliding and not report.counts["slide_window"], report
        assert any(s.pattern == "slide_window" and "MiB" in s.reason for s in report.skipped), report
    else:  # 32 MiB
        assert sliding and report.counts["slide_window"] == 2 * sliding * len(report.graphs), report
    stats = backend.cudagraph_stats
    assert stats.replays > 0 and not stats.failures and not backend.report.fallbacks
