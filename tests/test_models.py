"""Whole models through the backend: tiny Gemma-4 presets, other families, dynamic shapes, generate, inspect, CLI.

Each Inductor compile of a tiny model costs 5-20 s on a CI core, so every test here compiles as few models as it can
and the MoE model compiled once per dtype is shared by the tests that read its results.
"""

import collections
import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

import gemma4_fx
from gemma4_fx import Gemma4Backend, Gemma4Passes, build_model
from gemma4_fx.cli import main
from helpers import DEVICES

MOE = "tiny-26b-a4b"
# max |compiled - eager| / max |eager| allowed on logits: fp32 sums may be reordered; bf16 rounds every step.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def random_ids(model, shape=(2, 7), seed=0):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def compile_and_run(model, backend, input_ids):
    """(compiled logits, eager logits) of one forward without a KV cache."""
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
        logits = torch.compile(model, backend=backend)(input_ids, use_cache=False).logits
    return logits, expected


def assert_close_to_eager(logits, expected):
    error = (logits.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= TOLERANCE[expected.dtype] * scale, f"max |logits - eager| = {error:.3g}, max |eager| = {scale:.3g}"


def routers(model):
    """Where the model routes tokens to experts: one `Gemma4TextRouter` per MoE layer."""
    return {name for name, module in model.named_modules() if isinstance(module, Gemma4TextRouter)}


def assert_counts_table(text, report):
    assert re.search(r"^pattern\s+matches$", text, re.M)
    for pattern, count in report.counts.items():
        assert re.search(rf"^{pattern}\s+{count}$", text, re.M), f"no row '{pattern} {count}' in:\n{text}"


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=str)
def moe(request):
    """The tiny MoE model compiled in verify mode, with its compiled and eager logits."""
    model = build_model(MOE, dtype=request.param, num_hidden_layers=2)
    backend = Gemma4Backend(verify=True)
    logits, expected = compile_and_run(model, backend, random_ids(model))
    return SimpleNamespace(model=model, report=backend.report, logits=logits, expected=expected)


@pytest.mark.compat
def test_router_rewritten_in_every_moe_layer(moe):
    assert moe.report.counts["router"] == len(routers(moe.model)) > 0
    assert {match.location for match in moe.report.matches if match.pattern == "router"} == routers(moe.model)
    assert not moe.report.fallbacks


def locations(report, pattern):
    return sorted((match.location for match in report.matches if match.pattern == pattern),
                  key=lambda path: [int(part) if part.isdigit() else part for part in path.split(".")])


@pytest.mark.compat
def test_report_locations_are_module_paths(moe):
    """Users read where each rewrite happened as module paths on every supported transformers (newer ones wrap
    `forward`, and Dynamo then names the model `L['args'][0]`, not `L['self']`)."""
    layers = [f"model.layers.{i}" for i in range(moe.model.config.num_hidden_layers)]
    assert locations(moe.report, "router") == [f"{layer}.router" for layer in layers]
    assert locations(moe.report, "post_attn_norm") == layers


@pytest.mark.compat
def test_moe_logits_match_eager(moe):
    assert_close_to_eager(moe.logits, moe.expected)


def test_verify_mode_checks_every_graph(moe):
    assert moe.report.verify
    assert {result.graph for result in moe.report.verify} == set(moe.report.graphs)
    assert all(result.ok for result in moe.report.verify), moe.report


DENSE = {"tiny-e2b": {}, "tiny-e4b": {}, "tiny-31b": {"num_hidden_layers": 2}}  # KV sharing needs the E models' depth


@pytest.mark.compat
@pytest.mark.parametrize("preset", DENSE)
def test_dense_gemma4_has_no_router_match(preset):
    model, backend = build_model(preset, **DENSE[preset]), Gemma4Backend()
    logits, expected = compile_and_run(model, backend, random_ids(model))
    assert backend.report.counts["router"] == 0
    assert not backend.report.skipped and not backend.report.fallbacks
    assert_close_to_eager(logits, expected)
    layers = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert locations(backend.report, "post_attn_norm") == layers
    assert locations(backend.report, "ple_tail") == (layers if model.config.hidden_size_per_layer_input else [])


@pytest.mark.parametrize("preset", ["e2b", "e4b", "tiny-e2b"])
def test_other_depths_keep_kv_sharing_valid(preset):
    """Every depth builds (transformers rejects shared layers whose attention types differ from the writers'), and
    the share of KV-shared layers stays near the published one where the rule allows any."""
    full = gemma4_fx.text_config(preset)
    share, period = full.num_kv_shared_layers / full.num_hidden_layers, full.layer_types.index("full_attention") + 1
    for layers in range(2, 40):
        config = gemma4_fx.text_config(preset, num_hidden_layers=layers)
        shared = config.num_kv_shared_layers
        writers, readers = config.layer_types[:layers - shared], config.layer_types[layers - shared:]
        assert shared == 0 or set(writers) == set(readers)
        if layers >= 2 * period:  # both attention types on each side is possible: sharing is kept
            assert 0 < shared and abs(shared - share * layers) <= period
    assert gemma4_fx.text_config(preset, num_hidden_layers=full.num_hidden_layers).num_kv_shared_layers == \
        full.num_kv_shared_layers


# The published widths (hidden, per-layer-input width, experts, top-k) at two layers with small everything else.
# KV sharing is off: it needs more depth and does not change the layer's epilogues.
REAL_WIDTHS = {preset: dict(num_hidden_layers=2, num_kv_shared_layers=0, vocab_size=256, vocab_size_per_layer_input=256,
                            intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2,
                            num_key_value_heads=1, num_global_key_value_heads=1, head_dim=32, global_head_dim=64)
               for preset in ("e2b", "e4b", "26b-a4b", "31b")}


@pytest.mark.parametrize("preset", REAL_WIDTHS)
def test_epilogues_rewritten_in_every_layer_at_real_widths(preset):
    model, backend = build_model(preset, dtype=torch.bfloat16, **REAL_WIDTHS[preset]), Gemma4Backend()
    logits, expected = compile_and_run(model, backend, random_ids(model, (1, 5)))
    config, counts = model.config, backend.report.counts
    print(preset, counts)
    assert counts["post_attn_norm"] == config.num_hidden_layers
    assert counts["ple_tail"] == (config.num_hidden_layers if config.hidden_size_per_layer_input else 0)
    assert counts["router"] == (config.num_hidden_layers if config.enable_moe_block else 0)
    assert not backend.report.skipped and not backend.report.fallbacks
    assert_close_to_eager(logits, expected)


_SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attn_implementation="sdpa")
OTHER_MODELS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, {}),
    # Gemma-2's attention softcapping has no SDPA path in transformers
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, dict(attn_implementation="eager")),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, {}),
    # softmax -> top-k -> renormalise, as Gemma-4's router, but without its norm·scale prologue
    "qwen3-moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
}


@pytest.mark.parametrize("name", OTHER_MODELS)
def test_other_models_are_untouched(name, tmp_path):
    model_class, config_class, extra = OTHER_MODELS[name]
    torch.manual_seed(0)
    model = model_class(config_class(**{**_SMALL, **extra})).eval()
    backend = Gemma4Backend(dump_dir=tmp_path)
    logits, expected = compile_and_run(model, backend, random_ids(model))
    # Attention is the same math in any model: the attention passes take every layer's SDPA (and must keep eager's
    # logits, below), and the rotary tables the layers share (cos and sin) are stored once; no Gemma-4 rewrite fires.
    sdpa = model.config._attn_implementation == "sdpa"
    general = {"prefill_attention": model.config.num_hidden_layers} if sdpa else {}
    general["rotary_table"] = 2
    assert {name: count for name, count in backend.report.counts.items() if count} == general, backend.report
    assert not backend.report.fallbacks
    assert_close_to_eager(logits, expected)
    befores = sorted(tmp_path.glob("*.post_grad.before.py"))
    assert len(befores) == len(backend.report.graphs) > 0
    for before in befores:  # the post-grad graph's ops, but for the tables stored (and their strides read)
        after = before.with_name(before.name.replace(".before.", ".after.")).read_text()
        ops = collections.Counter(re.findall(r"torch\.ops\.[\w.]+", after))
        assert ops.pop("torch.ops.prims.inductor_force_stride_order.default") == 2
        ops.pop("torch.ops.aten.sym_stride.int", None)
        assert ops == collections.Counter(re.findall(r"torch\.ops\.[\w.]+", before.read_text()))


def test_dynamic_shapes():
    model, backend = build_model(MOE, num_hidden_layers=2), Gemma4Backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length in (5, 11):
        input_ids = random_ids(model, (1, length), seed=length)
        with torch.no_grad():
            assert_close_to_eager(compiled(input_ids, use_cache=False).logits, model(input_ids, use_cache=False).logits)
    assert not backend.report.fallbacks
    assert len(backend.report.graphs) == 1  # one graph for both lengths
    assert backend.report.counts["router"] == len(routers(model))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset, experts", [
    pytest.param("tiny-e2b", None, marks=pytest.mark.compat, id="tiny-e2b"),
    # transformers 5.17's grouped_mm on CPU is an op of its own whose backward AOT cannot trace (plain Inductor
    # breaks the graph there too): newest transformers only.
    pytest.param(MOE, None, id=MOE),
    pytest.param(MOE, "eager", marks=pytest.mark.compat, id=f"{MOE}-eager-experts"),
])
def test_training_step_matches_eager(preset, experts, device):
    """A training step (grad on, a loss, backward) through the backend: the rewrites whose ops have no backward
    leave the graph alone with the reason (transformers' eager experts are traced as their loop, not as our op),
    nothing falls back, the report says why this graph gets few rewrites, and the loss and every gradient are
    eager's (fp32)."""
    model = build_model(preset, device=device, **({"experts_implementation": experts} if experts else {})).train()
    ids = random_ids(model).to(device)
    results = []
    for forward in (model, torch.compile(model, backend=(backend := Gemma4Backend()))):
        model.zero_grad()
        loss = forward(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss, grads), (expected_loss, expected_grads) = results
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max().item()
        assert (grad - expected_grads[name]).abs().max().item() <= 1e-4 * scale, name
    assert not backend.report.fallbacks, backend.report.fallbacks
    assert backend.report.for_backward and "torch.no_grad()" in str(backend.report)
    assert {skip.reason for skip in backend.report.skipped if skip.pattern.endswith("attention")} == {
        "a backward may follow (an input requires grad): the kernels have none"}, backend.report


def test_passes_as_inductor_custom_pass():
    model, passes = build_model(MOE, num_hidden_layers=2), Gemma4Passes()
    with torch._inductor.config.patch(post_grad_custom_post_pass=passes, fx_graph_cache=False):
        logits, expected = compile_and_run(model, "inductor", random_ids(model))
    assert passes.report.counts["router"] == len(routers(model))
    assert not passes.report.fallbacks
    assert_close_to_eager(logits, expected)


@pytest.mark.compat
def test_generate_matches_eager():
    model, backend = build_model(MOE, num_hidden_layers=2), Gemma4Backend()
    compile_config = transformers.CompileConfig(backend=backend)
    compile_config._compile_all_devices = True  # HF compiles the decoding step on CUDA only, unless told so
    input_ids = random_ids(model, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    expected = model.generate(input_ids, **kwargs)
    assert not backend.graph_reports
    tokens = model.generate(input_ids, compile_config=compile_config, **kwargs)
    assert torch.equal(tokens, expected)
    assert backend.graph_reports
    assert all(report.counts["router"] == len(routers(model)) for report in backend.graph_reports.values())
    # decode steps of one static row: each layer's q/k/v and gate/up in one launch each
    layers = model.config.num_hidden_layers
    assert all(report.counts["skinny_linear"] == 2 * layers for report in backend.graph_reports.values())
    assert not backend.report.fallbacks


def test_inspect_writes_the_dump(tmp_path):
    model = build_model(MOE, num_hidden_layers=2)
    report = gemma4_fx.inspect(model, random_ids(model), dump_dir=tmp_path, use_cache=False)
    assert report.counts["router"] == len(routers(model))
    assert (tmp_path / "graph_0.dynamo.py").is_file()
    before = (tmp_path / "graph_0.post_grad.before.py").read_text()
    after = (tmp_path / "graph_0.post_grad.after.py").read_text()
    assert "aten.topk" in before and "gemma4_fx.router_select" not in before
    assert "gemma4_fx.router_select" in after and "aten.topk" not in after
    assert (tmp_path / "report.txt").read_text() == f"{report}\n"
    assert any((tmp_path / "depyf").iterdir())
    assert_counts_table(str(report), report)


def test_cli_demo(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    layers = gemma4_fx.text_config(MOE).num_hidden_layers  # the demo's depth on CPU; every layer routes
    assert re.search(rf"^router\s+{layers}$", out, re.M), out
    errors = {name: float(error) for name, error in re.findall(r"^  (.+?)\s+max \|logits - eager\| (\S+)", out, re.M)}
    assert set(errors) == {"gemma4_fx", "inductor default"}, out
    # On CPU the rewritten router is eager's own ops and Inductor emulates eager's bf16 rounding.
    assert errors["gemma4_fx"] <= 0.05, out


def test_cli_inspect(tmp_path, capsys):
    layers = 2  # every layer of the MoE preset routes
    assert main(["inspect", "--preset", MOE, "--dump-dir", str(tmp_path), "--layers", str(layers)]) == 0
    report = (tmp_path / "report.txt").read_text()
    assert re.search(rf"^router\s+{layers}$", report, re.M)
    assert report.strip() in capsys.readouterr().out
    assert "gemma4_fx.router_select" in (tmp_path / "graph_0.post_grad.after.py").read_text()
