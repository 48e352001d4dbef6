"""The MoE experts pattern on tiny Gemma-4 MoE models: both of transformers' implementations that compile to one
graph are rewritten into `gemma4_fx::moe_experts` in every layer, other activations and dtypes are left alone with
the reason. (The kernels themselves: test_moe_experts_kernels.py.)"""

import pytest
import torch

import gemma4_fx

MOE = "tiny-26b-a4b"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-6}  # of max |logits|: Inductor reorders sums


def compile_moe(dtype, implementation="grouped_mm", layers=2, **overrides):
    """(backend report, compiled logits, eager logits, model) of a tiny MoE model's forward."""
    model = gemma4_fx.build_model(MOE, dtype=dtype, num_hidden_layers=layers, **overrides)
    model.config._experts_implementation = implementation
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    backend = gemma4_fx.Gemma4Backend()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    return backend.report, logits, expected, model


def assert_close(logits, expected):
    error = (logits.double() - expected.double()).abs().max().item()
    assert error <= TOLERANCE[expected.dtype] * expected.double().abs().max().item(), error


@pytest.mark.parametrize("implementation,dtype", [("grouped_mm", torch.float32), ("grouped_mm", torch.bfloat16),
                                                  ("batched_mm", torch.bfloat16)])
def test_experts_rewritten_in_every_layer(implementation, dtype):
    report, logits, expected, model = compile_moe(dtype, implementation)
    layers = model.config.num_hidden_layers
    assert report.counts["moe_experts"] == layers
    assert sorted(m.location for m in report.matches if m.pattern == "moe_experts") == [
        f"model.layers.{i}.experts" for i in range(layers)]
    # nothing left alone: batched_mm's `gate_up_proj[expert_ids]` is a weight lookup, not rows for YOCO to report
    assert not report.skipped and not report.fallbacks
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


def test_eager_loop_compiles_untouched():
    """The per-expert loop breaks the graph at its data-dependent `nonzero`: nothing to match, nothing broken."""
    report, logits, expected, _ = compile_moe(torch.float32, "eager", layers=1)
    assert report.counts["moe_experts"] == 0 and not report.fallbacks
    assert_close(logits, expected)
