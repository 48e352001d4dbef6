"""End-to-end checks on CUDA (run on the GPU machine: `python -m pytest tests -q -m gpu`)."""

import pytest
import torch
from transformers import CompileConfig, Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

import gemma4_fx
from test_backend import TopK

pytestmark = pytest.mark.gpu


def make_router(hidden, experts, k, dtype, seed=0):
    config = Gemma4TextConfig(hidden_size=hidden, num_experts=experts, top_k_experts=k, moe_intermediate_size=64)
    torch.manual_seed(seed)
    router = Gemma4TextRouter(config)
    with torch.no_grad():
        router.proj.weight.normal_(0, hidden**-0.5)
        router.scale.copy_(1 + 0.1 * torch.randn(hidden))
        router.per_expert_scale.copy_(1 + 0.1 * torch.randn(experts))
    return TopK(router).to("cuda", dtype).eval()


def tokens(n, hidden, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = torch.randn(n, hidden, device="cuda", generator=g)
    return (rows * torch.exp(torch.randn(n, 1, device="cuda", generator=g))).to(dtype)


@pytest.mark.parametrize("router_exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_router_picks_eagers_experts_at_26b_widths(dtype, router_exact):
    module = make_router(2816, 128, 8, dtype)
    backend = gemma4_fx.Gemma4Backend(router_exact=router_exact)
    compiled = torch.compile(module, backend=backend, dynamic=True)
    differing_sets = differing_order = 0
    with torch.no_grad():
        for seed in range(3):
            x = tokens(4096, 2816, dtype, seed)
            weights_ref, ids_ref = module(x)
            weights, ids = compiled(x)
            differing_sets += int((ids.sort(-1).values != ids_ref.sort(-1).values).any(-1).sum())
            differing_order += int((ids != ids_ref).any(-1).sum())
            same = (ids == ids_ref).all(-1)
            torch.testing.assert_close(weights[same], weights_ref[same], rtol=2e-2 if not router_exact else 1e-5,
                                       atol=1e-6)
    assert backend.report.counts["router"] >= 1
    assert differing_sets == 0
    if router_exact or dtype == torch.float32:
        assert differing_order == 0


def test_moe_model_bf16_matches_eager():
    model = gemma4_fx.build_model("tiny-26b-a4b", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 33), device="cuda")
    backend = gemma4_fx.Gemma4Backend(verify=True, verify_action="raise")
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    assert backend.report.counts["router"] == model.config.num_hidden_layers
    assert all(v.ok for v in backend.report.verify)
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=0.05 * expected.abs().max().item())


def test_generate_matches_eager_tokens():
    model = gemma4_fx.build_model("tiny-26b-a4b", dtype=torch.float32, device="cuda")
    ids = torch.randint(3, model.config.vocab_size, (1, 9), device="cuda")
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    backend = gemma4_fx.Gemma4Backend()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                         compile_config=CompileConfig(backend=backend))
    assert torch.equal(out, expected)
    # HF compiles the decode step (and on some versions the prefill): every compiled graph has every router rewritten
    assert backend.report.graphs
    assert backend.report.counts["router"] == len(backend.report.graphs) * model.config.num_hidden_layers
