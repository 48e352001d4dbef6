"""vLLM smoke test: tiny random-weight Gemma-4 models through `LLM(..., compilation_config=...)` with our pass, fp32
on the CPU. Runs only where vLLM is installed (not in CI: BENCHMARKS.md has how it was run, and the result).

On vLLM's CPU graph the norms are decomposed in the rsqrt form and the linears are vLLM's oneDNN ops, which write
into their output: the norm chain rewrites each layer; the PLE tail's projections and the MoE router (inside
vLLM's fused-MoE op) are not there to match. Each engine start takes about a minute (two per model).
"""

import re

import pytest

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, vocab_size_per_layer_input=512, head_dim=32, global_head_dim=64,
              max_position_embeddings=256, sliding_window=8, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
              final_logit_softcapping=30.0, tie_word_embeddings=True, num_attention_heads=2,
              architectures=["Gemma4ForCausalLM"])
MODELS = {  # vLLM's CPU attention takes head sizes 32, 64, ...; its GEMMs want widths divisible by 32
    "dense-ple": dict(COMMON, hidden_size=128, num_hidden_layers=4,
                      layer_types=["sliding_attention", "full_attention"] * 2, num_key_value_heads=1, intermediate_size=128, hidden_size_per_layer_input=32,
                      num_kv_shared_layers=2),
    "moe": dict(COMMON, hidden_size=128, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                num_key_value_heads=2, num_global_key_value_heads=1, intermediate_size=128,
                hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
                moe_intermediate_size=64, attention_k_eq_v=True),
}
PROMPTS = [[(7 * i + 3 * j) % 500 + 1 for j in range(5 + 3 * i)] for i in range(3)]


def generate(model_dir, compilation_config):
    """Greedy tokens of `PROMPTS` from a fresh engine."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=0,
              max_model_len=128, gpu_memory_utilization=0.1, compilation_config=compilation_config)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=6, temperature=0.0))
    del llm
    gc.collect()
    return [list(output.outputs[0].token_ids) for output in outputs]


def matched_layers(report: str, pattern: str) -> set[str]:
    """Layers a pattern rewrote, from the report's "matched:" lines (one per compiled graph and layer)."""
    return set(re.findall(rf"^  {pattern}\s+\S+\s+(\S+)", report, re.M))


@pytest.mark.parametrize("name", MODELS)
def test_norm_chain_rewritten_per_layer_with_vllms_tokens(name, tmp_path, monkeypatch):
    from gemma4_fx.integrations.vllm import Gemma4VllmPass

    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")  # a cache hit would skip the passes
    config = MODELS[name]
    transformers.Gemma4TextConfig(**config).save_pretrained(tmp_path / name)
    expected = generate(tmp_path / name, {})
    report = tmp_path / "report.txt"
    if name == "moe":  # the pass by name, its report where $GEMMA4_FX_REPORT says
        monkeypatch.setenv("GEMMA4_FX_REPORT", str(report))
        passes = {"inductor_passes": {"post_grad_custom_post_pass": "gemma4_fx.integrations.vllm.vllm_pass"}}
    else:
        passes = {"inductor_compile_config": {"post_grad_custom_post_pass": Gemma4VllmPass(report_path=report)}}
    assert generate(tmp_path / name, passes) == expected
    text = report.read_text()
    assert matched_layers(text, "post_attn_norm") == {f"layers.{i}" for i in range(config["num_hidden_layers"])}, text
    assert "compiled without gemma4_fx passes" not in text, text


def test_unsupported_version_is_named(monkeypatch):
    import importlib
    import sys

    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.1.0")
    monkeypatch.delitem(sys.modules, "gemma4_fx.integrations.vllm", raising=False)
    with pytest.raises(ImportError, match=r"supports vLLM >= 0\.32, < 0\.33; found vLLM 0\.1\.0"):
        importlib.import_module("gemma4_fx.integrations.vllm")
