"""The contract engines rely on: a Gemma-4 written the way engines write it (`engine_gemma4.py`: flat tokens, fused
projections, its own attention, rsqrt or opaque norms, top-k before softmax) through the backend.

Each case compiles once with the token count dynamic (as engines mark it), runs two batches of requests through
that one graph, and checks every rewrite per layer (counts, locations), YOCO's truncations, and the logits against
the model's own eager run in fp32. Compiles are the cost (10-20 s each on a CI core): one per case.
"""

import re

import pytest
import torch

import gemma4_fx
from engine_gemma4 import LINEAR_OP, RMS_NORM_OP, EngineGemma4, batch

TOLERANCE = 2e-5  # of max |logits|: fp32, sums reordered
DENSE = ("tiny-e2b", dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                          num_kv_shared_layers=2))  # PLE, double-wide MLP in the 2 KV-shared layers
MOE = ("tiny-26b-a4b", dict(num_hidden_layers=2))  # MoE beside the MLP, k = v attention in the full layer
CASES = {  # name: (model, forms)
    "dense-rsqrt": (DENSE, dict(norm="rsqrt")),
    "dense-ops": (DENSE, dict(norm="op", linear="op")),
    "moe-hf": (MOE, dict(norm="hf", router="hf")),
    "moe-rsqrt-topk_first": (MOE, dict(norm="rsqrt", router="topk_first")),
}


def compile_and_run(name, tmp_path):
    """(model, backend, [(logits, eager logits)] for two batches, the post-grad code after the passes)."""
    (preset, overrides), forms = CASES[name]
    model = EngineGemma4(preset, **forms, **overrides)
    backend = gemma4_fx.Gemma4Backend(rms_norm_ops=[RMS_NORM_OP], linear_ops=[LINEAR_OP], dump_dir=tmp_path)
    compiled, results = torch.compile(model, backend=backend), []
    for seed, lengths in enumerate([(5, 3), (4, 7, 2)]):
        ids, positions, masks, last = batch(model, lengths, seed)
        for tensor in (ids, positions, last, *masks.values()):
            torch._dynamo.mark_dynamic(tensor, list(range(tensor.dim())))
        with torch.no_grad():
            results.append((compiled(ids, positions, masks, last), model(ids, positions, masks, last)))
    return model, backend, results, (tmp_path / "graph_0.post_grad.after.py").read_text()


def assert_close(logits, expected):
    error = (logits.double() - expected.double()).abs().max().item()
    assert error <= TOLERANCE * expected.abs().max().item(), f"max |logits - eager| = {error:.3g}"


def locations(report, pattern):
    return sorted(match.location for match in report.matches if match.pattern == pattern)


@pytest.mark.parametrize("name", CASES)
def test_engine_gemma4_rewritten_per_layer(name, tmp_path):
    model, backend, results, code = compile_and_run(name, tmp_path)
    config, report = model.config, backend.report
    layers = [f"layers.{i}" for i in range(config.num_hidden_layers)]
    assert len(backend.graph_reports) == 1, "one graph for every batch"
    assert not report.fallbacks, report
    for logits, expected in results:
        assert_close(logits, expected)

    moe = config.enable_moe_block
    assert locations(report, "post_attn_norm") == layers, report
    assert locations(report, "router") == (layers if moe else []), report
    assert locations(report, "ple_tail") == ([] if moe else layers), report
    if moe:  # one launch per layer writes the router's input too, but in the last: YOCO runs its MLP on the kept rows
        assert code.count("gemma4_fx.post_attn_norm.default") == len(layers)  # (the experts mix rows: all rows)
        assert code.count("gemma4_fx.router_input.default") == 1

    if name == "dense-ops":  # an engine's own norm op is opaque to YOCO: it stops there, and says so
        assert report.counts["yoco"] == 0
        assert [skip.reason for skip in report.skipped if skip.pattern == "yoco"] == \
            [f"{RMS_NORM_OP} mixes rows or is not known to be row-local (`row_local.rows_rule`)"]
    else:  # KV-shared layers and the one before; without KV sharing, the last layer's attention onward
        shared = config.num_kv_shared_layers
        truncated = layers[-shared - 1:] if shared else layers[-1:]
        assert locations(report, "yoco") == truncated, report
    assert not [skip for skip in report.skipped if skip.pattern != "yoco"], report


def test_topk_first_router_left_alone_under_router_exact():
    """Rewritten into HF's order, a top-k-first router's weights differ from the graph's by rounding: under
    `router_exact` it is left alone, with the reason."""
    (preset, overrides), forms = CASES["moe-rsqrt-topk_first"]
    model = EngineGemma4(preset, **forms, **dict(overrides, num_hidden_layers=1))
    backend = gemma4_fx.Gemma4Backend(["router"], router_exact=True)
    ids, positions, masks, last = batch(model, (6,), seed=0)
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(ids, positions, masks, last)
        assert_close(logits, model(ids, positions, masks, last))
    assert backend.report.counts["router"] == 0
    assert [(s.location, re.sub(r" \(.*", "", s.reason)) for s in backend.report.skipped] == [
        ("layers.0", "top-k before softmax: the rewrite computes HF's softmax → top-k → renormalise, whose "
                     "weights differ from this graph's by fp32 rounding")]
