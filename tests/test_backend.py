"""The backend and the passes on a lone Gemma-4 router (and a lone attention, for the graph passes): rewrite, skips
with reasons, failures, verify mode, arguments.

A router compiles in about a second, so these tests compile one each; whole models are in test_models.py.
"""

import pytest
import torch

import gemma4_fx
import gemma4_fx.backend
import gemma4_fx.patterns.router
import gemma4_fx.replacements.prefill_attention
import gemma4_fx.replacements.router
from gemma4_fx import Gemma4Backend, Gemma4Passes
from gemma4_fx.runtime.verify import VerificationError
from helpers import TopK

MOE = "tiny-26b-a4b"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def moe_router(dtype=torch.float32):
    """`Gemma4TextRouter` of the tiny MoE preset (random weights, scales around one)."""
    return gemma4_fx.build_model(MOE, dtype=dtype, num_hidden_layers=1).model.layers[0].router


def hidden_states(router, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, router.hidden_size, generator=generator).to(router.scale.dtype)


def run(module, backend, *inputs):
    """(compiled outputs, eager outputs) of `module` on `inputs`."""
    with torch.no_grad():
        return torch.compile(module, backend=backend)(*inputs), module(*inputs)


def assert_same_routing(outputs, expected):
    """Expert ids bit for bit; routing weights (fp32) up to fp32 rounding."""
    (weights, ids), (expected_weights, expected_ids) = outputs, expected
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1.3e-6, atol=1e-5)


def router_skips(report):
    return [skip for skip in report.skipped if skip.pattern == "router"]


@pytest.mark.compat
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_rewrite_matches_eager(dtype):
    module, backend = TopK(moe_router(dtype)), Gemma4Backend()
    compiled = torch.compile(module, backend=backend)
    for seed in range(3):
        x = hidden_states(module.router, 37, seed)
        with torch.no_grad():
            assert_same_routing(compiled(x), module(x))
    assert backend.report.counts["router"] == 1 and not backend.report.for_backward
    assert [match.location for match in backend.report.matches] == ["router"]
    assert not backend.report.fallbacks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_rewrite_breaks_ties_as_eager(dtype):
    router = moe_router(dtype)
    experts = router.proj.out_features
    with torch.no_grad():
        router.proj.weight[experts // 2:] = router.proj.weight[:experts // 2]  # expert e ties with e + experts / 2
        router.per_expert_scale.copy_(torch.linspace(0.5, 1.5, experts))  # so the weights tell tied experts apart
    x = hidden_states(router, 37, seed=0)
    with torch.no_grad():
        probabilities = router(x)[0]
    assert torch.equal(probabilities[:, :experts // 2], probabilities[:, experts // 2:])
    backend = Gemma4Backend()
    assert_same_routing(*run(TopK(router), backend, x))
    assert backend.report.counts["router"] == 1


def test_router_returning_probabilities_is_left_alone():
    router, backend = moe_router(), Gemma4Backend()
    x = hidden_states(router, 9, seed=0)
    (probabilities, *routing), (expected_probabilities, *expected_routing) = run(router, backend, x)
    assert backend.report.counts["router"] == 0
    [skip] = router_skips(backend.report)
    assert "other users" in skip.reason
    torch.testing.assert_close(probabilities, expected_probabilities)
    assert_same_routing(routing, expected_routing)


def test_float64_router_is_left_alone():
    module, backend = TopK(moe_router().double()), Gemma4Backend()
    x = hidden_states(module.router, 9, seed=0)
    outputs, expected = run(module, backend, x)
    assert backend.report.counts["router"] == 0
    [skip] = router_skips(backend.report)
    assert "float64" in skip.reason
    assert_same_routing(outputs, expected)  # the softmax runs in fp32: fp32 rounding, even in a float64 router


def test_router_rewrite_with_dynamic_shapes():
    module, backend = TopK(moe_router()), Gemma4Backend()
    compiled = torch.compile(module, backend=backend, dynamic=True)
    for tokens in (5, 11):
        x = hidden_states(module.router, tokens, seed=tokens)
        with torch.no_grad():
            assert_same_routing(compiled(x), module(x))
    assert not backend.report.fallbacks
    assert backend.report.counts["router"] == 1


def test_verify_raises_on_a_wrong_rewrite(monkeypatch):
    select = gemma4_fx.replacements.router.router_select_reference

    def doubled_weights(logits, per_expert_scale, k):
        weights, ids = select(logits, per_expert_scale, k)
        return 2 * weights, ids

    # What router_select computes on CPU tensors, looked up when the compiled graph runs.
    monkeypatch.setattr(gemma4_fx.replacements.router, "router_select_reference", doubled_weights)
    module, backend = TopK(moe_router()), Gemma4Backend(verify=True, verify_action="raise")
    with pytest.raises(VerificationError, match="differ from eager"):
        run(module, backend, hidden_states(module.router, 9, seed=0))
    assert backend.report.counts["router"] == 1
    weights, ids = backend.report.verify
    assert not weights.ok and weights.max_rel == pytest.approx(1.0)  # |2w - w| / max |w|
    assert ids.ok


def test_failing_pattern_does_not_fail_the_compile(monkeypatch):
    def broken(graph, ctx):
        raise RuntimeError("broken pattern")

    monkeypatch.setattr(gemma4_fx.patterns.router, "apply", broken)
    module, backend = TopK(moe_router()), Gemma4Backend()
    with pytest.warns(UserWarning, match="pattern 'router' failed"):
        outputs, expected = run(module, backend, hidden_states(module.router, 9, seed=0))
    assert backend.report.fallbacks
    assert backend.report.counts["router"] == 0
    assert_same_routing(outputs, expected)


def test_pattern_failing_mid_rewrite_reports_no_match(monkeypatch):
    def unavailable(*args):
        raise RuntimeError("router_select unavailable")

    # The replacement is traced when a match is found: the pattern fails after its check accepted the match.
    monkeypatch.setattr(torch.ops.gemma4_fx, "router_select", unavailable)
    module, backend = TopK(moe_router()), Gemma4Backend()
    with pytest.warns(UserWarning, match="router_select unavailable"):
        outputs, expected = run(module, backend, hidden_states(module.router, 9, seed=0))
    assert backend.report.fallbacks
    assert_same_routing(outputs, expected)
    assert backend.report.counts["router"] == 0, "a rewrite that never happened is reported as a match"


def test_failure_after_the_passes_falls_back_to_inductor(monkeypatch):
    run_passes = Gemma4Passes.__call__

    def corrupting(self, graph):
        run_passes(self, graph)
        output = graph.output_node()
        x = next(iter(graph.find_nodes(op="placeholder")))
        with graph.inserting_before(output):
            bad = graph.call_function(torch.ops.aten.mm.default, (x, x))  # no operand here is square: lowering fails
        output.args = ((bad, *output.args[0][1:]),)

    monkeypatch.setattr(Gemma4Passes, "__call__", corrupting)
    module, backend = TopK(moe_router()), Gemma4Backend()
    with pytest.warns(UserWarning, match="compiled with plain Inductor instead"):
        outputs, expected = run(module, backend, hidden_states(module.router, 9, seed=0))
    assert backend.report.fallbacks
    assert backend.report.counts["router"] == 0
    assert_same_routing(outputs, expected)


def test_failure_outside_inductor_compiles_dynamos_graph(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("runtime unavailable")

    monkeypatch.setattr(Gemma4Backend, "_compile", broken)
    module, backend = TopK(moe_router()), Gemma4Backend()
    with pytest.warns(UserWarning, match="runtime unavailable.*Dynamo's graph compiled with plain Inductor"):
        outputs, expected = run(module, backend, hidden_states(module.router, 9, seed=0))
    assert backend.report.fallbacks and not backend.report.matches
    assert_same_routing(outputs, expected)


def test_failure_plain_inductor_shares_is_left_to_dynamo(monkeypatch):
    """Where plain Inductor fails on Dynamo's graph too, the error is not ours: it reaches Dynamo as under
    `backend="inductor"`, and the report says that the fallback failed rather than that it compiled."""
    def broken(*args, **kwargs):
        raise RuntimeError("runtime unavailable")

    def inductor_down(*args, **kwargs):
        raise RuntimeError("plain inductor down")

    monkeypatch.setattr(Gemma4Backend, "_compile", broken)
    monkeypatch.setattr(gemma4_fx.backend, "compile_fx", inductor_down)
    module, backend = TopK(moe_router()), Gemma4Backend()
    with pytest.warns(UserWarning, match="runtime unavailable"), \
            pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="plain inductor down"):
        run(module, backend, hidden_states(module.router, 9, seed=0))
    assert "plain Inductor failed too (RuntimeError: plain inductor down)" in backend.report.fallbacks[-1]


class Attention(torch.nn.Module):
    """SDPA over a bool mask at several query rows: what the `prefill_attention` graph pass rewrites."""

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2


def attention_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    return q, k, v, torch.ones(8, 8, dtype=torch.bool).tril().view(1, 1, 8, 8)


def test_verify_checks_the_graph_passes_against_dynamos_graph(monkeypatch):
    """The graph passes rewrite a copy of Dynamo's graph: verify runs Dynamo's own, so a wrong graph-pass rewrite
    is caught (it would compare the rewrite with itself if the pass had rewritten the graph verify runs)."""
    sdpa = gemma4_fx.replacements.prefill_attention._sdpa
    # What prefill_attention computes on CPU tensors, looked up when the compiled graph runs.
    monkeypatch.setattr(gemma4_fx.replacements.prefill_attention, "_sdpa", lambda *args: 2 * sdpa(*args))
    backend = Gemma4Backend(verify=True, verify_action="raise")
    with pytest.raises(VerificationError, match="differ from eager"):
        run(Attention(), backend, *attention_inputs())
    assert backend.report.counts["prefill_attention"] == 1


def test_graph_pass_failing_midway_leaves_the_graph_as_it_was(monkeypatch):
    """A graph pass that fails after rewriting some nodes (here: its attentions rewritten, then its mask step
    fails) is skipped whole: none of its rewrites reach the compiled graph, as the report says."""
    import gemma4_fx.passes.prefill_attention as prefill_pass

    def failing(graph):
        raise RuntimeError("mask step failed")

    compiled_graphs, compile_fx = [], gemma4_fx.backend.compile_fx

    def recording(gm, *args, **kwargs):
        compiled_graphs.append([str(node.target) for node in gm.graph.nodes])
        return compile_fx(gm, *args, **kwargs)

    monkeypatch.setattr(prefill_pass, "_ready_masks_once", failing)
    monkeypatch.setattr(gemma4_fx.backend, "compile_fx", recording)
    backend = Gemma4Backend()
    with pytest.warns(UserWarning, match="graph pass 'prefill_attention' failed.*graph left as it was"):
        outputs, expected = run(Attention(), backend, *attention_inputs())
    torch.testing.assert_close(outputs, expected, rtol=0, atol=0)
    assert backend.report.counts["prefill_attention"] == 0
    assert compiled_graphs and not [t for g in compiled_graphs for t in g if "prefill_attention" in t], compiled_graphs


def test_fallback_compiles_dynamos_graph_not_the_rewritten_one(monkeypatch):
    """When the compile after the graph passes fails, plain Inductor gets the graph as Dynamo traced it: none of our
    ops, which are what may have failed."""
    compiled_graphs, compile_fx = [], gemma4_fx.backend.compile_fx

    def recording(gm, *args, **kwargs):
        compiled_graphs.append([str(node.target) for node in gm.graph.nodes])
        return compile_fx(gm, *args, **kwargs)

    def broken(*args, **kwargs):
        raise RuntimeError("runtime unavailable")

    monkeypatch.setattr(gemma4_fx.backend, "compile_fx", recording)
    monkeypatch.setattr(Gemma4Backend, "_compile", broken)
    backend = Gemma4Backend()
    with pytest.warns(UserWarning, match="runtime unavailable.*Dynamo's graph compiled with plain Inductor"):
        outputs, expected = run(Attention(), backend, *attention_inputs())
    torch.testing.assert_close(outputs, expected, rtol=0, atol=0)
    assert len(compiled_graphs) == 1 and not [t for t in compiled_graphs[0] if "gemma4_fx" in t], compiled_graphs


@pytest.mark.parametrize("make, argument", [
    pytest.param(lambda: Gemma4Backend(verify_action="nope"), "verify_action", id="verify_action"),
    pytest.param(lambda: Gemma4Backend(verify_tolerance=-1), "verify_tolerance", id="verify_tolerance"),
    pytest.param(lambda: Gemma4Passes(patterns=["nope"]), "patterns", id="unknown-pattern"),
    pytest.param(lambda: Gemma4Passes(patterns="router"), "patterns", id="patterns-string"),
    pytest.param(lambda: Gemma4Passes(router_exact="yes"), "router_exact", id="router_exact"),
    pytest.param(lambda: gemma4_fx.build_model("nope"), "preset", id="preset"),
])
def test_bad_argument_is_named(make, argument):
    with pytest.raises((TypeError, ValueError), match=argument):
        make()


def test_inspect_rejects_a_non_callable(tmp_path):
    with pytest.raises(TypeError, match="model"):
        gemma4_fx.inspect(42, dump_dir=tmp_path)


def test_uuid_follows_the_options(tmp_path):
    default = Gemma4Passes().uuid()
    assert Gemma4Passes().uuid() == default
    assert Gemma4Passes(list(gemma4_fx.PATTERNS), dump_dir=tmp_path).uuid() == default
    assert Gemma4Passes(router_exact=True).uuid() != default
    assert Gemma4Passes([]).uuid() != default


def test_fx_graph_cache_hits_are_reported():
    """With `fx_graph_cache=True` a second compile of the same graph takes Inductor's cached code, rewrites
    included, and no pass runs: the report says so rather than showing a graph with no matches."""
    module = TopK(moe_router(torch.float32))
    x = hidden_states(module.router, 5, 0)
    reports = []
    for _ in range(2):
        torch._dynamo.reset()
        backend = Gemma4Backend(fx_graph_cache=True)
        with torch.no_grad():
            assert_same_routing(torch.compile(module, backend=backend)(x), module(x))
        reports.append(backend.report)
    assert reports[1].cached == ["graph_0"] and not reports[1].matches
    assert "from Inductor's FX graph cache" in str(reports[1])
    assert reports[0].counts["router"] == 1 or reports[0].cached == ["graph_0"]  # a cache from an earlier run


def test_module_guards_can_be_dropped():
    """torch.compile's `guard_filter_fn` (the README's remedy for HF generate's per-step guard cost) is Dynamo's:
    the backend, handed what is left of the options, compiles and rewrites as usual."""
    model = gemma4_fx.build_model("tiny-26b-a4b", num_hidden_layers=1)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    backend = Gemma4Backend()
    compiled = torch.compile(model, backend=backend,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)
    assert backend.report.counts["router"] == 1 and not backend.report.fallbacks
