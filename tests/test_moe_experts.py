"""The MoE experts pattern on tiny Gemma-4 MoE models: both of transformers' implementations that compile to one
graph are rewritten into `gemma4_fx::moe_experts` in every layer, other activations and dtypes are left alone with
the reason. (The kernels themselves: test_moe_experts_kernels.py.)"""

import pytest
import torch

import gemma4_fx
from gemma4_fx.patterns import moe_experts

MOE = "tiny-26b-a4b"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-6}  # of max |logits|: Inductor reorders sums


def compile_moe(dtype, implementation="grouped_mm", layers=2, keep=0, batch=2, **overrides):
    """(backend report, compiled logits, eager logits, model) of a tiny MoE model's forward over `batch` sequences of
    7 tokens (`keep`: logits_to_keep, 0 for all rows)."""
    model = gemma4_fx.build_model(MOE, dtype=dtype, num_hidden_layers=layers, **overrides)
    model.config._experts_implementation = implementation
    ids = torch.randint(3, model.config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(0))
    backend = gemma4_fx.Gemma4Backend()
    with torch.no_grad():
        expected = model(ids, use_cache=False, logits_to_keep=keep).logits
        logits = torch.compile(model, backend=backend)(ids, use_cache=False, logits_to_keep=keep).logits
    return backend.report, logits, expected, model


def assert_close(logits, expected):
    error = (logits.double() - expected.double()).abs().max().item()
    assert error <= TOLERANCE[expected.dtype] * expected.double().abs().max().item(), error


@pytest.mark.compat  # the forms each transformers version writes
@pytest.mark.parametrize("implementation,dtype", [("grouped_mm", torch.float32), ("grouped_mm", torch.bfloat16),
                                                  ("batched_mm", torch.bfloat16), ("eager", torch.float32),
                                                  ("eager", torch.bfloat16)])
def test_experts_rewritten_in_every_layer(implementation, dtype):
    """Each implementation's experts, in one graph ("eager": its loop traced as one op, no break at each expert)."""
    report, logits, expected, model = compile_moe(dtype, implementation)
    layers = model.config.num_hidden_layers
    assert len(report.graphs) == 1 and report.counts["moe_experts"] == layers
    assert sorted(m.location for m in report.matches if m.pattern == "moe_experts") == [
        f"model.layers.{i}.experts" for i in range(layers)]
    # nothing left alone: batched_mm's `gate_up_proj[expert_ids]` is a weight lookup, not rows for YOCO to report
    assert not report.skipped and not report.fallbacks
    assert_close(logits, expected)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_kept_rows_run_the_experts_on_those_rows_only(implementation, monkeypatch):
    """A prefill of one sequence that keeps its last row: YOCO's selection stops at the experts' sum over k (their
    sort makes rows interact; the eager loop traced as one op is row-local, and the selection goes through it); the
    rewrite takes the kept row's token, ids and weights, so the last layer's experts run on that row alone, with
    eager's logits. (With more sequences the selection stops below the experts, where the tokens are unflattened
    into [batch, length]: they run on every row, as before.)"""
    from gemma4_fx.replacements import moe_experts as ops

    rows = []
    for name in ("moe_experts_reference", "moe_experts_loop_reference"):
        monkeypatch.setattr(ops, name, lambda x, *rest, reference=getattr(ops, name): rows.append(x.shape[0])
                            or reference(x, *rest))
    report, logits, expected, model = compile_moe(torch.float32, implementation, keep=1, batch=1)
    layers = model.config.num_hidden_layers
    assert report.counts["moe_experts"] == layers and report.counts["yoco"] >= 1, report
    assert not [skip for skip in report.skipped if skip.pattern == "moe_experts"], report
    assert rows == [7] * (layers - 1) + [1], rows  # the last layer: the kept row
    assert_close(logits, expected)


def test_other_activation_is_left_alone():
    """gelu with erf is not the kernels' gelu_tanh, though in bf16 their values can hardly be told apart."""
    report, logits, expected, _ = compile_moe(torch.bfloat16, hidden_activation="gelu", layers=1)
    assert report.counts["moe_experts"] == 0
    assert {skip.reason for skip in report.skipped if skip.pattern == "moe_experts"} == {
        "activation between the grouped GEMMs has no tanh: not gelu_tanh"}
    assert_close(logits, expected)


def test_float64_is_left_alone_with_the_reason():
    report, logits, expected, _ = compile_moe(torch.float64, "batched_mm", layers=1)  # grouped_mm has no float64
    assert report.counts["moe_experts"] == 0
    reasons = {skip.reason for skip in report.skipped if skip.pattern == "moe_experts"}
    assert len(reasons) == 1 and "outside the kernels' range" in reasons.pop()
    assert_close(logits, expected)


def test_eager_loop_outside_the_kernels_breaks_and_says_why():
    """float64 is outside the kernels: the eager loop is traced as transformers wrote it, and breaks the graph at its
    data-dependent `nonzero`. Nothing to match, nothing broken, and the report says so at each layer's router, whose
    ids leave its graph for the experts'. The layers' graphs are Dynamo frames of the layers resumed after the
    break; the report locates them from the model all the same."""
    report, logits, expected, _ = compile_moe(torch.float64, "eager", layers=2)
    assert len(report.graphs) > 1 and report.counts["moe_experts"] == 0 and not report.fallbacks
    skips = [skip for skip in report.skipped if skip.pattern == "moe_experts"]
    assert [skip.reason for skip in skips] == [moe_experts.EAGER_LOOP] * 2, report
    layers = [f"model.layers.{i}" for i in range(2)]
    assert sorted(skip.location for skip in skips) == [f"{layer}.router" for layer in layers], report
    assert_close(logits, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_loop_traced_whole_only_for_gemma4_backends(dtype):
    """Once a Gemma4Backend has installed the eager loop's polyfill, other backends (and a Gemma4Backend without
    the moe_experts rewrite) still trace the loop as transformers wrote it: the same graph breaks, eager's bits."""
    report, logits, expected, model = compile_moe(dtype, "eager", layers=2)
    assert len(report.graphs) == 1 and report.counts["moe_experts"] == 2
    assert_close(logits, expected)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    graphs = []

    def graphs_as_they_are(gm, example_inputs):
        graphs.append(gm)
        return gm

    without = gemma4_fx.Gemma4Backend([name for name in gemma4_fx.PATTERNS if name != "moe_experts"])
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, backend=graphs_as_they_are)(ids, use_cache=False).logits, expected)
        torch._dynamo.reset()
        assert_close(torch.compile(model, backend=without)(ids, use_cache=False).logits, expected)
    assert len(graphs) > 2  # broken at each layer's experts
    assert len(without.report.graphs) > 2 and without.report.counts["router"] == 2


def test_a_polyfill_already_there_is_a_warning_not_a_failure(monkeypatch, caplog):
    """Should the eager forward have a Dynamo polyfill already (here: ours, installed by `import gemma4_fx`), the
    loop stays a loop, with a warning; nothing fails."""
    monkeypatch.setattr(moe_experts, "_traced_eager_experts", [])
    with caplog.at_level("WARNING", logger="gemma4_fx"):
        moe_experts.trace_eager_experts()
    assert "eager Gemma-4 experts stay a loop for Dynamo" in caplog.text


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_a_symbolic_token_count(implementation):
    """Under dynamic shapes the token count is symbolic (the experts' sizes stay static): the kernels take any
    count, so the rewrite does too."""
    model = gemma4_fx.build_model(MOE, num_hidden_layers=2, experts_implementation=implementation)
    backend = gemma4_fx.Gemma4Backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for length in (5, 9):
            generator = torch.Generator().manual_seed(length)
            ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)
            assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert len(backend.report.graphs) == 1 and backend.report.counts["moe_experts"] == 2, backend.report


@pytest.mark.gpu
def test_eager_loop_on_cuda_in_cuda_graphs():
    """On CUDA (bf16): the eager loop traced whole, rewritten, and run from the backend's CUDA graphs (the loop's
    host syncs gone), against eager's logits. (The kernels at 26B-A4B's widths against the loop:
    test_moe_experts_kernels.py; a whole model at those widths with random weights flips near-tied experts between
    any two builds, eager's and a compiled one, beyond a logits tolerance.)"""
    model = gemma4_fx.build_model(MOE, dtype=torch.bfloat16, device="cuda", num_hidden_layers=2,
                                  experts_implementation="eager")
    ids = torch.randint(3, model.config.vocab_size, (2, 64), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    backend = gemma4_fx.Gemma4Backend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        for _ in range(3):  # the first call runs, the second captures, the third replays
            assert_close(compiled(ids, use_cache=False).logits, expected)
    assert len(backend.report.graphs) == 1 and backend.report.counts["moe_experts"] == 2, backend.report
    assert backend.cudagraph_stats.replays > 0 and not backend.cudagraph_stats.failures


class SentinelGuardedExperts(torch.nn.Module):
    """The experts as transformers 5.17 writes them, guarding expert-parallel sentinels (ids >= E): "grouped_mm"
    zeroes their rows around each grouped GEMM, "batched_mm" clamps the ids. The routing is a top-k over
    `scores` inside the module (ids provably < E), or `ids` given."""

    def __init__(self, experts, implementation):
        super().__init__()
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        self.num_experts, self.implementation = experts.num_experts, implementation

    def forward(self, x, weights, scores=None, ids=None):
        if ids is None:
            ids = torch.topk(scores, weights.shape[-1], dim=-1).indices
        return getattr(self, self.implementation)(x, ids, weights)

    def grouped_mm(self, x, ids, weights):
        num_experts, top_k = self.num_experts, ids.shape[-1]
        sorted_ids, perm = torch.sort(ids.reshape(-1))
        sentinel = (sorted_ids >= num_experts).unsqueeze(-1)
        offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=num_experts, min=0, max=num_experts - 1), dim=0,
                               dtype=torch.int32)
        rows = x[perm // top_k].masked_fill(sentinel, 0.0)
        gate, up = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offsets).masked_fill(
            sentinel, 0.0).chunk(2, dim=-1)
        y = torch._grouped_mm(torch.nn.functional.gelu(gate, approximate="tanh") * up, self.down_proj.transpose(1, 2),
                              offs=offsets).masked_fill(sentinel, 0.0)
        weighted = y * weights.reshape(-1)[perm].unsqueeze(-1)
        unsorted = weighted[torch.empty_like(perm).index_put_((perm,), torch.arange(perm.numel()))]
        return unsorted.view(*ids.shape, -1).sum(dim=1).to(x.dtype)

    def batched_mm(self, x, ids, weights):
        flat_ids = ids.reshape(-1).clamp(0, self.num_experts - 1)
        rows = x.repeat_interleave(ids.shape[-1], dim=0)
        gate, up = torch.bmm(self.gate_up_proj[flat_ids], rows.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        act = torch.nn.functional.gelu(gate, approximate="tanh") * up
        y = torch.bmm(self.down_proj[flat_ids], act.unsqueeze(-1)).squeeze(-1)
        return (y * weights.reshape(-1).unsqueeze(-1)).view(*ids.shape, -1).sum(dim=1).to(x.dtype)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("routing", ["top-k inside", "ids given"])
def test_sentinel_guards(implementation, routing):
    """Zeroing sentinel rows is a no-op, and is dropped, only where the ids are a top-k over the E experts' scores
    (else: left alone, with the reason); a clamp of the ids is kept, so a sentinel given as an id (weight 0) gives
    eager's output too."""
    model = gemma4_fx.build_model(MOE, dtype=torch.bfloat16, num_hidden_layers=1)
    module = SentinelGuardedExperts(model.model.layers[0].experts, implementation)
    generator = torch.Generator().manual_seed(0)
    tokens, experts, top_k = 6, module.num_experts, model.config.top_k_experts
    x = torch.randn(tokens, model.config.hidden_size, generator=generator).bfloat16()
    weights = torch.rand(tokens, top_k, generator=generator)
    scores = torch.randn(tokens, experts, generator=generator)
    ids = torch.topk(scores, top_k, dim=-1).indices
    if implementation == "batched_mm" and routing == "ids given":
        ids[0, -1], weights[0, -1] = experts, 0.0  # a sentinel, its weight zero as expert parallelism sends it
    inputs = dict(scores=scores) if routing == "top-k inside" else dict(ids=ids)
    backend = gemma4_fx.Gemma4Backend()
    with torch.no_grad():
        expected = module(x, weights, **inputs)
        out = torch.compile(module, backend=backend)(x, weights, **inputs)
    rewritten = not (implementation == "grouped_mm" and routing == "ids given")
    assert backend.report.counts["moe_experts"] == rewritten
    if not rewritten:
        assert [skip.reason for skip in backend.report.skipped if skip.pattern == "moe_experts"] == [
            "expert ids may be expert-parallel sentinels (>= E), which the kernels do not take: they do not come "
            "from a top-k over the E experts' scores"]
    assert_close(out, expected)
