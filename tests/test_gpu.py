"""End-to-end checks on CUDA (run on the GPU machine: `python -m pytest tests -q -m gpu`)."""

import pytest
import torch
from transformers import CompileConfig, Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

import gemma4_fx
from helpers import EVERY_OP_OUTPUTS, TopK, dying_chain, every_op

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
    ids = torch.randint(0, model.config.vocab_size, (2, 33), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
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
    # and the experts, in whichever form (HF switches decode to batched_mm on CUDA; 5.17 clamps its ids)
    assert backend.report.counts["moe_experts"] == len(backend.report.graphs) * model.config.num_hidden_layers


# Real widths, shallow: E2B keeps KV sharing at 7 layers (the last sliding and full layer shared), the 26B-A4B MoE
# and 31B dense layers at 2.
EPILOGUE_MODELS = {"e2b": dict(num_hidden_layers=7, num_kv_shared_layers=2), "26b-a4b": dict(num_hidden_layers=2),
                   "31b": dict(num_hidden_layers=2, intermediate_size=4096)}


@pytest.mark.parametrize("preset", EPILOGUE_MODELS)
def test_epilogues_no_further_from_float64_than_eager(preset):
    """bf16 logits with every rewrite against a float64 run of the same weights: no further off than eager or
    Inductor (whose errors are printed beside ours)."""
    overrides = dict(EPILOGUE_MODELS[preset], vocab_size=4096, vocab_size_per_layer_input=4096)
    model = gemma4_fx.build_model(preset, dtype=torch.bfloat16, device="cuda", **overrides)
    exact_model = gemma4_fx.build_model(preset, dtype=torch.float64, device="cuda", **overrides)
    exact_model.config._experts_implementation = "eager"  # grouped_mm has no float64
    # 512 tokens: the PLE tail is rewritten from ple_tail.CUDA_MIN_TOKENS on
    ids = torch.randint(0, 4096, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    backend = gemma4_fx.Gemma4Backend()
    with torch.no_grad():
        exact = exact_model(ids, use_cache=False).logits
        errors = {}
        for name, fn in (("eager", model), ("inductor", torch.compile(model)),
                         ("gemma4_fx", torch.compile(model, backend=backend))):
            errors[name] = (fn(ids, use_cache=False).logits.double() - exact).abs().max().item()
            torch._dynamo.reset()
    print(preset, {k: f"{v:.4g}" for k, v in errors.items()}, backend.report.counts)
    layers = model.config.num_hidden_layers
    assert backend.report.counts["post_attn_norm"] == layers
    assert backend.report.counts["ple_tail"] == (layers if model.config.hidden_size_per_layer_input else 0)
    assert errors["gemma4_fx"] <= 1.25 * max(errors["eager"], errors["inductor"])


def test_ple_tail_left_to_inductor_below_its_token_threshold():
    model = gemma4_fx.build_model("e2b", dtype=torch.bfloat16, device="cuda", vocab_size=4096,
                                  vocab_size_per_layer_input=4096, **EPILOGUE_MODELS["e2b"])
    backend = gemma4_fx.Gemma4Backend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 4096, (1, 16), device="cuda"), use_cache=False)
    report = backend.report
    assert report.counts["ple_tail"] == 0 and report.counts["post_attn_norm"] == model.config.num_hidden_layers
    reasons = {skip.reason for skip in report.skipped if skip.pattern == "ple_tail"}
    assert reasons == {"16 tokens: below 512 Inductor's own fusion of the PLE tail is as fast"}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_launches_the_ops_kernels_bit_for_bit(dynamic):
    """Compiled through the backend, each op's kernels are launched from Inductor's code (no extern call) and give
    the bits of the op's own launches, at 1, 64 and 4096 rows."""
    from torch._inductor.utils import run_and_get_code

    backend = gemma4_fx.Gemma4Backend(cudagraphs=None)

    def layer(*inputs):
        return every_op(*inputs, top_k=8)

    compiled = torch.compile(layer, backend=backend, dynamic=dynamic)
    g = torch.Generator(device="cuda").manual_seed(0)
    codes = []
    for rows in (1, 64, 4096):
        args = [torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
                for shape in ((rows, 2816), (rows, 2816), (2816,), (1,), (rows, 128), (128,))]
        with torch.no_grad():
            expected = layer(*args)
            got, code = run_and_get_code(compiled, *args)
        codes += code
        for name, a, b in zip(EVERY_OP_OUTPUTS, got, expected):
            assert torch.equal(a, b), (rows, name)
    code = "\n".join(codes)
    assert "torch.ops.gemma4_fx" not in code
    for kernel in ("_post_attn_norm_kernel", "_router_input_kernel", "_router_select_kernel", "_norm_add_kernel",
                   "_gate_kernel"):
        assert f"def {kernel}(" in code, kernel
    assert not [s for s in backend.report.skipped if s.pattern == "inductor_launch"]


@pytest.mark.parametrize("rows", [(64,), (8, 1)], ids=["prefill", "decode"])
def test_outputs_stored_over_dying_inputs_keep_the_bits(rows):
    """The ops of a chain whose inputs die at them store over those inputs' buffers where their kernels allow it
    (Inductor allocates its own kernel's two outputs and the norm chain's h and ff, nothing for the PLE ops), with
    the bits of the ops' own launches, at prefill's rows and decode's [B, 1, H] alike."""
    from torch._inductor.utils import run_and_get_code

    backend = gemma4_fx.Gemma4Backend(cudagraphs=None)
    compiled = torch.compile(dying_chain, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    args = [torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
            for shape in ((*rows, 1536), (*rows, 1536), (1536,), (1,))]
    with torch.no_grad():
        expected = dying_chain(*args)
        got, [code] = run_and_get_code(compiled, *args)
    assert not backend.report.fallbacks, backend.report
    assert torch.equal(got[0], expected[0])
    assert code.count("empty_strided_cuda(") == 4, code


@pytest.mark.parametrize("shape", [(8, 1), (1, 1), (1, 1024), (2, 300)], ids=str)
def test_e2b_graphs_compile_with_every_rewrite(shape):
    """E2B at real widths (6 layers, bf16), decode- and prefill-shaped calls: every graph compiles with the passes
    (stored over a pointwise residual, decode at batch 8 and prefill failed Inductor's scheduler and fell back) and
    gives eager's greedy tokens."""
    model = gemma4_fx.build_model("e2b", dtype=torch.bfloat16, device="cuda", num_hidden_layers=6)
    backend = gemma4_fx.Gemma4Backend(cudagraphs=None)
    ids = torch.randint(0, 1000, shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        expected = model(ids, use_cache=False).logits
    assert not backend.report.fallbacks, backend.report
    assert backend.report.counts["post_attn_norm"] == 6, backend.report
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
