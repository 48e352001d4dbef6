"""What holds for every pattern: a fixed run order, distinct float stand-ins, one rule per op in YOCO's registry, and
each form a pattern matches equal to HF's math where it is rewritten."""

import pytest
import torch

import engine_gemma4
import gemma4_fx
from gemma4_fx.passes import row_local
from gemma4_fx.patterns import matcher_utils, router
from gemma4_fx.patterns.matcher_utils import STAND_INS
from gemma4_fx.replacements.rows import rms_norm
from helpers import DTYPES, seeded


def test_stand_ins_are_distinct():
    """A stand-in equal to another pattern's, or to a literal of the math, would let a pattern match a constant."""
    values = [value for table in STAND_INS.values() for value in table.values()]
    assert len(set(values)) == len(values)
    literals = {0.5, -0.5, 1.0, 2.0, 3.0, 0.044715, 0.7978845608028654, 1e-6}
    assert not literals & set(values)
    assert set(STAND_INS) <= set(gemma4_fx.PATTERNS)


def test_patterns_run_in_registry_order():
    for names in (["post_attn_norm", "router"], ["ple_tail", "router", "skinny_linear", "post_attn_norm"]):
        assert gemma4_fx.Gemma4Passes(names).patterns == tuple(name for name in gemma4_fx.PATTERNS if name in names)


def test_any_order_of_names_gives_the_same_rewrites():
    """post_attn_norm's MoE variant consumes the router rewrite's op: named first, it must still run second."""
    model = gemma4_fx.build_model("tiny-26b-a4b", num_hidden_layers=1)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    found = []
    for names in (["router", "post_attn_norm"], ["post_attn_norm", "router"]):
        torch._dynamo.reset()
        backend = gemma4_fx.Gemma4Backend(names)
        with torch.no_grad():
            torch.compile(model, backend=backend)(ids, use_cache=False)
        found.append(sorted((m.pattern, m.location) for m in backend.report.matches))
    assert found[0] == found[1] == [("post_attn_norm", "model.layers.0"), ("router", "model.layers.0.router")]


def test_rows_rules_are_one_per_op():
    with pytest.raises(ValueError, match="'linear' already has a rule"):
        row_local.rows_rule("linear")(lambda node, dim: None)


def _rows(dtype, seed, hidden=96):
    g = seeded("norm forms", dtype, seed)
    x = (torch.randn(64, hidden, generator=g) * torch.logspace(-3, 3, 64)[:, None]).to(dtype)
    return x, (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_forms_equal_hfs_where_they_are_matched(dtype):
    """Engines write RMSNorm with rsqrt (and vLLM casts before the weight): on fresh random rows each form the
    patterns rewrite is HF's `Gemma4RMSNorm` bit for bit; the cast-first form is only where it is fp32, and left
    alone elsewhere."""
    forms = matcher_utils.NORM_FORMS
    for seed in range(3):
        x, w = _rows(dtype, seed)
        for weight in (w, None):
            hf = rms_norm(x, weight, 1e-6)
            assert torch.equal(forms["hf"].fn(x, weight, 1e-6), hf)
            assert torch.equal(forms["rsqrt"].fn(x, weight, 1e-6), hf)
            cast_first = forms["rsqrt_cast"].fn(x, weight, 1e-6)
            assert torch.equal(cast_first, hf) or dtype != torch.float32 and weight is not None
            assert torch.equal(engine_gemma4.rms_norm_op(x, weight, 1e-6), cast_first)
    forms = matcher_utils.NORM_FORMS
    assert forms["rsqrt"].reason(dtype) is None
    assert (forms["rsqrt_cast"].reason(dtype) is None) == (dtype == torch.float32)
    assert (matcher_utils.op_norm_form(engine_gemma4.RMS_NORM_OP).reason(dtype) is None) == (dtype == torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_first_router_selects_hfs_experts(dtype):
    """Top-k of the raw logits, then a softmax of the k (engines), against HF's softmax, top-k, renormalise: the
    same experts in the same order, the weights equal to fp32 rounding."""
    x, scale = _rows(dtype, 7)
    g = seeded("router forms", dtype)
    proj, per_expert = (torch.randn(20, 96, generator=g) * 96**-0.5).to(dtype), (1 + torch.rand(20, generator=g))
    args = (x, scale, proj, per_expert.to(dtype), 1e-6, 96**-0.5, 4)
    weights, ids = router.router_pattern_topk_first(*args)
    expected_weights, expected_ids = router.router_pattern(*args)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=2e-6, atol=0)


def test_op_options_name_the_argument():
    for cls in (gemma4_fx.Gemma4Passes, gemma4_fx.Gemma4Backend):
        with pytest.raises(ValueError, match="rms_norm_ops"):
            cls(rms_norm_ops="vllm_ir::rms_norm")
        with pytest.raises(ValueError, match="linear_ops"):
            cls(linear_ops=["mm"])
    options = [gemma4_fx.Gemma4Passes(rms_norm_ops=ops).uuid() for ops in ((), ("vllm_ir::rms_norm",))]
    assert options[0] != options[1], "the ops matched are part of the pass's identity (Inductor's cache key)"


def _gelu_of_view(x, w):
    return torch.nn.functional.gelu((x @ w).view(1, 4, 16), approximate="tanh")


def _gelu_erf(x, w):
    return torch.nn.functional.gelu(x @ w)


def _gelu_plus_mask(x, w):
    return torch.nn.functional.gelu(x @ w, approximate="tanh") + (torch.arange(16) > 3)


@pytest.mark.parametrize("fn, reason", [(_gelu_of_view, None), (_gelu_erf, "no tanh"),
                                        (_gelu_plus_mask, "not its input alone")])
def test_gelu_tanh_is_told_by_the_ops_between(fn, reason):
    """`not_gelu_tanh` runs the ops from a GEMM to an activation on probe values: a view among them passes the probe
    through, and ops that read more than the GEMM's values (a mask made from `arange`) are not gelu_tanh of it."""
    graph = torch.fx.experimental.proxy_tensor.make_fx(fn)(torch.randn(4, 8), torch.randn(8, 16)).graph
    [mm] = graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)
    act = graph.output_node().args[0]
    found = matcher_utils.not_gelu_tanh(mm, act, "here")
    assert found is None if reason is None else reason in found, found
