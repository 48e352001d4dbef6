"""skinny_single: a Gemma-4 linear alone on its input at decode rows becomes one skinny_linear launch (CPU: the op is
eager's linear), only where Gemma-4's norms or our epilogue ops take its output, and on CUDA only with a tuned config
(measured faster than cuBLAS); the tuned-config table's lookup."""

import pytest
import torch
import transformers

import gemma4_fx
from gemma4_fx.patterns import skinny_single as P
from gemma4_fx.replacements import skinny_linear as S
from helpers import seeded
from test_skinny_linear import _group

BF16 = torch.bfloat16


def _decode(model, batch=2, patterns=None):
    """(the backend's logits, eager's, the report) of one token per sequence, no cache, fp32."""
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), generator=seeded("single", type(model).__name__))
    backend = gemma4_fx.Gemma4Backend(patterns, cudagraphs=None)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        return got, model(ids, use_cache=False).logits, backend.report


def test_the_lone_linears_of_a_gemma4_decode_step():
    """tiny-e2b (3 of 7 layers KV-shared): each layer's o_proj and down_proj and each KV-shared layer's q_proj, one
    op each; q/k/v and gate/up stay groups; the PLE tail's GEMMs stay as its rewrite made them (on CPU it takes the
    tail at any rows); the logits are eager's."""
    model = gemma4_fx.build_model("tiny-e2b", seed=3)
    got, eager, report = _decode(model)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    layers, shared = model.config.num_hidden_layers, model.config.num_kv_shared_layers
    assert shared > 0 and report.counts["ple_tail"] == layers
    singles = sorted(match.location.removeprefix("model.") for match in report.matches if match.pattern == P.NAME)
    expected = [f"layers.{i}.{name}" for i in range(layers) for name in ("mlp.down_proj", "self_attn.o_proj")]
    expected += [f"layers.{i}.self_attn.q_proj" for i in range(layers - shared, layers)]
    assert singles == sorted(expected)
    assert report.counts["skinny_linear"] == layers + (layers - shared)  # gate/up everywhere, q/k/v where own kv
    assert all(skip.pattern != P.NAME for skip in report.skipped)


def _times_calls(monkeypatch) -> list:
    """Records the `gelu_times` calls of the op (on CPU it runs the reference)."""
    calls, reference = [], S.skinny_linear_reference

    def recording(x, weights, gated=False, gelu_times=None):
        if gelu_times is not None:
            calls.append(gelu_times.shape)
        return reference(x, weights, gated, gelu_times)
    monkeypatch.setattr(S, "skinny_linear_reference", recording)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_the_ple_linears_where_inductor_keeps_the_ple_tail(monkeypatch, dtype):
    """Without the PLE tail's rewrite (CUDA at decode rows leaves it to Inductor), the PLE gate is found by its
    `gelu_tanh(gate) * per_layer_input`, and that product is the op's (`gelu_times`); the projection is found by its
    norm. Logits as eager's (bf16: the same ops, each rounded as eager rounds it)."""
    calls = _times_calls(monkeypatch)
    model = gemma4_fx.build_model("tiny-e2b", seed=4, num_hidden_layers=2, dtype=dtype)
    got, eager, report = _decode(model, patterns=[name for name in gemma4_fx.PATTERNS if name != "ple_tail"])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert calls == [(2, model.config.hidden_size_per_layer_input)] * 2  # batch 2, a gate per layer
    singles = sorted(match.location.removeprefix("model.") for match in report.matches if match.pattern == P.NAME)
    assert singles == [f"layers.{i}.{name}" for i in range(2) for name in (
        "mlp.down_proj", "per_layer_input_gate", "per_layer_projection", "self_attn.o_proj")]


class _GeluGate(torch.nn.Module):
    """`gelu_tanh(linear(x)) * t`, as the PLE gate meets the per-layer input."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x, t, keep_y: bool = False):
        y = self.gate(x)
        out = torch.nn.functional.gelu(y, approximate="tanh") * t
        return (out, y) if keep_y else out


@pytest.mark.parametrize("x_shape, t_shape, keep_y, folded", [
    ((2, 32), (2, 16), False, True), ((1, 2, 32), (1, 2, 16), False, True), ((2, 32), (1, 16), False, False),
    ((2, 32), (2, 16), True, False)], ids=["folded", "3-d", "t-broadcast", "y-read-elsewhere"])
def test_the_gelu_gate_is_folded_only_where_it_can_be(monkeypatch, x_shape, t_shape, keep_y, folded):
    """The product goes into the op only where t has its shape and nothing else reads the linear's output; the lone
    linear is taken either way, and the outputs are eager's. A 3-D input puts a view between the GEMM and gelu."""
    calls = _times_calls(monkeypatch)
    torch.manual_seed(0)
    module, x, t = _GeluGate(), torch.randn(x_shape), torch.randn(t_shape)
    backend = gemma4_fx.Gemma4Backend([P.NAME], cudagraphs=None)
    with torch.no_grad():
        got = torch.compile(module, backend=backend)(x, t, keep_y)
        torch.testing.assert_close(got, module(x, t, keep_y), rtol=1e-6, atol=1e-6)
    assert backend.report.counts[P.NAME] == 1
    assert calls == ([(2, 16)] if folded else [])


def test_the_lone_linears_of_a_moe_layer():
    """tiny-26b-a4b: o_proj and the dense MLP's down_proj alone (the router's projection reads its own input and
    feeds a softmax; the experts' GEMMs are not mms)."""
    model = gemma4_fx.build_model("tiny-26b-a4b", num_hidden_layers=2)
    got, eager, report = _decode(model)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    singles = sorted(match.location.removeprefix("model.") for match in report.matches if match.pattern == P.NAME)
    assert singles == [f"layers.{i}.{name}" for i in range(2) for name in ("mlp.down_proj", "self_attn.o_proj")]


def test_no_lone_linear_of_a_llama_is_taken():
    """Llama's o_proj and down_proj feed the residual and its lm_head nothing normed: no match, no report, eager's
    logits."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    got, eager, report = _decode(transformers.LlamaForCausalLM(config).eval())
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert report.counts[P.NAME] == 0
    assert all(skip.pattern != P.NAME for skip in report.skipped)


def _mm(device, rows, hidden, width, dtype=BF16):
    """An `mm(x, permute(w, [1, 0]))` node over fake tensors on `device`."""
    x, (w,), _ = _group(device, rows, hidden, [width], False)
    x.meta["val"] = x.meta["val"].to(dtype)
    w.meta["val"] = w.meta["val"].to(dtype)
    graph = x.graph
    permute = graph.call_function(torch.ops.aten.permute.default, (w, [1, 0]))
    return graph.call_function(torch.ops.aten.mm.default, (x, permute))


@pytest.mark.parametrize("gpu, case, reason", [
    ("H200", ("cuda", 1, 2048, 1536), None),  # E2B o_proj: tuned, faster than cuBLAS
    ("H100", ("cuda", 8, 6144, 1536), None),  # E2B down_proj: an H100 takes the H200's configs
    ("H200", ("cuda", 1, 1536, 8960), "no config measured faster than cuBLAS for [8960, 1536] torch.bfloat16 on "
                                      "this GPU (skinny_linear_configs.py)"),  # E2B per_layer_model_projection
    ("A100", ("cuda", 1, 2048, 1536), "no config measured faster than cuBLAS for [1536, 2048] torch.bfloat16 on "
                                      "this GPU (skinny_linear_configs.py)"),  # not swept there
    ("H200", ("cuda", 1, 4096, 2816), None),  # 26B-A4B o_proj
    ("H200", ("cuda", 1, 2112, 2816), "no config measured faster than cuBLAS for [2816, 2112] torch.bfloat16 on "
                                      "this GPU (skinny_linear_configs.py)"),  # 26B-A4B dense down_proj: a tie
    ("H200", ("cuda", 17, 2048, 1536), "17 rows: a single linear is tuned up to 16"),
    ("", ("cpu", 1, 1536, 8960), None),  # the CPU op is eager's: no speed to lose
])
def test_cuda_takes_a_lone_linear_only_with_a_tuned_config(monkeypatch, gpu, case, reason):
    monkeypatch.setattr(S, "tuned_gpus", lambda device: {"H100": ("H100", "H200"), "H200": ("H200",)}.get(gpu, ()))
    assert P._untuned(_mm(*case)) == reason


def test_tuned_config_lookup(monkeypatch):
    """The table's entry at up to 16 rows of a 2-byte dtype on a listed GPU, else the rule's default."""
    monkeypatch.setattr(S, "tuned_gpus", lambda device: ("H200",))
    cuda = torch.device("cuda")
    entry = S.Config(64, 256, 1, 4, 4)
    assert S.tuned_config(1, 1536, [2048, 256, 256], BF16, False, cuda) == entry
    assert S.tuned_config(16, 1536, [2048, 256, 256], torch.float16, False, cuda) == entry
    for args in [(17, 1536, [2048, 256, 256], BF16, False), (1, 1536, [2048, 256, 256], torch.float32, False),
                 (1, 1536, [2048, 256], BF16, False), (1, 1536, [2048, 256, 256], BF16, True)]:
        assert S.tuned_config(*args, cuda) is None, args
    monkeypatch.setattr(S, "sm_count", lambda device: 132)
    assert S.config_for(32, 1536, [2048, 256, 256], BF16, False, cuda) == S.default_config(
        32, 1536, [2048, 256, 256], BF16, False, 132)


def test_a_tuned_gated_group_above_the_size_rule(monkeypatch):
    """E4B's gate/up (100 MiB) is taken on an H200, where its tuned config is measured faster."""
    from gemma4_fx.patterns import skinny_linear

    monkeypatch.setattr(S, "tuned_gpus", lambda device: ("H200",))
    assert skinny_linear.unsupported(*_group("cuda", 8, 2560, [10240, 10240], True)) is None
