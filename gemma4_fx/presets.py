"""Gemma-4 configurations: the published widths, and tiny models of the same structure.

The real presets carry the published text configs (random weights: no checkpoint is downloaded), and for the
multimodal class the published vision and audio encoders. The tiny ones keep each family's structure (PLE, KV
sharing, MoE, k=v attention, double-wide MLP, mixed head dims; encoders with the same options) at odd widths that
build and run in seconds on two CPU cores, so kernels meet masked edges.
"""

from __future__ import annotations

import inspect

import torch

_COMMON = dict(
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
    head_dim=256,
    global_head_dim=512,
    vocab_size=262144,
    vocab_size_per_layer_input=262144,
    max_position_embeddings=131072,
)


def _layer_types(num_layers: int, sliding_per_full: int) -> list[str]:
    """`sliding_per_full` sliding layers, then a full one, repeated; the last layer is always full."""
    period = sliding_per_full + 1
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)]
    types[-1] = "full_attention"
    return types


PRESETS: dict[str, dict] = {
    "e2b": dict(
        hidden_size=1536, num_hidden_layers=35, layer_types=_layer_types(35, 4), num_attention_heads=8,
        num_key_value_heads=1, intermediate_size=6144, sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=20, use_double_wide_mlp=True,
    ),
    "e4b": dict(
        hidden_size=2560, num_hidden_layers=42, layer_types=_layer_types(42, 5), num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=10240, sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
    ),
    "26b-a4b": dict(
        hidden_size=2816, num_hidden_layers=30, layer_types=_layer_types(30, 5), num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=2, intermediate_size=2112, sliding_window=1024,
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, attention_k_eq_v=True,
    ),
    "31b": dict(
        hidden_size=5376, num_hidden_layers=60, layer_types=_layer_types(60, 5), num_attention_heads=32,
        num_key_value_heads=16, num_global_key_value_heads=4, intermediate_size=21504, sliding_window=1024,
        hidden_size_per_layer_input=0, attention_k_eq_v=True,
    ),
}

# Tiny models: same structure, odd widths, small vocab. head dims stay multiples of 8 (rope halves, and the
# proportional rope of full layers rotates a quarter of the head).
_TINY = dict(
    head_dim=24, global_head_dim=48, vocab_size=499, vocab_size_per_layer_input=499, max_position_embeddings=512,
    sliding_window=6,
)
PRESETS.update({
    "tiny-e2b": dict(
        _TINY, hidden_size=88, num_hidden_layers=7, layer_types=_layer_types(7, 3), num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=120, hidden_size_per_layer_input=12, num_kv_shared_layers=3,
        use_double_wide_mlp=True,
    ),
    "tiny-e4b": dict(
        _TINY, hidden_size=104, num_hidden_layers=6, layer_types=_layer_types(6, 2), num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=152, hidden_size_per_layer_input=12, num_kv_shared_layers=2,
    ),
    "tiny-26b-a4b": dict(
        _TINY, hidden_size=88, num_hidden_layers=4, layer_types=_layer_types(4, 2), num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, intermediate_size=72, hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=20, top_k_experts=4, moe_intermediate_size=40, attention_k_eq_v=True,
    ),
    "tiny-31b": dict(
        _TINY, hidden_size=120, num_hidden_layers=4, layer_types=_layer_types(4, 2), num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, intermediate_size=200, hidden_size_per_layer_input=0,
        attention_k_eq_v=True,
    ),
})


# The encoders of the published multimodal checkpoints (`vision_config`, `audio_config` of the config.json of
# huggingface.co/google/gemma-4-{E2B,E4B,26B-A4B,31B}-it). E2B and E4B see images and hear audio: their encoders are
# transformers' `Gemma4VisionConfig` and `Gemma4AudioConfig` defaults, with clipped linears (whose bounds come with
# a checkpoint: infinite here). 26B-A4B and 31B see images through a wider encoder (31B's vision_config; 26B-A4B's
# is the same ~550M-parameter encoder) whose soft tokens are standardized. Each tiny preset gets its family's
# encoders at tiny widths. The audio encoder's first conv keeps 128 channels: transformers sizes the projection
# after it from that count as if it were the 128 mel bins.
_SMALL_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                     num_key_value_heads=12, head_dim=64, use_clipped_linears=True)
_LARGE_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=72, standardize=True)
_AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, output_proj_dims=1536,
              use_clipped_linears=True)
_TINY_VISION = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
_TINY_AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=24,
                   subsampling_conv_channels=[128, 4], use_clipped_linears=True)
ENCODERS: dict[str, dict] = {
    "e2b": dict(vision=_SMALL_VISION, audio=_AUDIO),
    "e4b": dict(vision=_SMALL_VISION, audio=_AUDIO),
    "26b-a4b": dict(vision=_LARGE_VISION),
    "31b": dict(vision=_LARGE_VISION),
    "tiny-e2b": dict(vision=dict(_TINY_VISION, use_clipped_linears=True), audio=_TINY_AUDIO),
    "tiny-e4b": dict(vision=dict(_TINY_VISION, use_clipped_linears=True), audio=_TINY_AUDIO),
    "tiny-26b-a4b": dict(vision=dict(_TINY_VISION, standardize=True)),
    "tiny-31b": dict(vision=dict(_TINY_VISION, standardize=True)),
}
# Token ids of the multimodal prompt: the published ones (transformers' `Gemma4Config` defaults), and for the tiny
# vocabulary ids in the same order at its top. `image_token_id` and `audio_token_id` mark each soft token's slot.
_TOKEN_IDS = dict(boi_token_id=255999, boa_token_id=256000, image_token_id=258880, audio_token_id=258881,
                  eoi_token_id=258882, eoa_token_index=258883, video_token_id=258884)
_TINY_TOKEN_IDS = dict(zip(_TOKEN_IDS, range(490, 497)))


def text_config(preset: str, **overrides):
    """A `Gemma4TextConfig` for `preset` (see `PRESETS`), with `overrides` applied (e.g. `num_hidden_layers=8`).

    At another depth the family's sliding:full pattern and its share of KV-shared layers are kept (as near as
    transformers' rules allow), unless `layer_types` or `num_kv_shared_layers` are given too."""
    from transformers import Gemma4TextConfig

    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    kwargs = {**_COMMON, **PRESETS[preset], **overrides}
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        # Keep the family's sliding:full ratio at the new depth; the last layer stays full.
        period = PRESETS[preset]["layer_types"].index("full_attention") + 1
        kwargs["layer_types"] = _layer_types(kwargs["num_hidden_layers"], period - 1)
        if "num_kv_shared_layers" not in overrides and kwargs.get("num_kv_shared_layers"):
            share = PRESETS[preset]["num_kv_shared_layers"] / PRESETS[preset]["num_hidden_layers"]
            kwargs["num_kv_shared_layers"] = _kv_shared_layers(kwargs["layer_types"], share)
    return Gemma4TextConfig(**kwargs)


def _kv_shared_layers(layer_types: list[str], share: float) -> int:
    """The count of trailing KV-shared layers nearest to `share` of the depth for which transformers' rule holds
    (the shared layers use the same attention types as the layers that write the caches); 0 if none does."""
    n = len(layer_types)
    valid = [k for k in range(1, n) if set(layer_types[:n - k]) == set(layer_types[n - k:])]
    return min(valid, key=lambda k: abs(k - share * n), default=0)


def multimodal_config(preset: str, *, encoder_overrides: dict[str, dict] | None = None, **overrides):
    """A `Gemma4Config` for `preset`: the text config of `text_config(preset, **overrides)` and the family's vision
    (and, for E2B/E4B, audio) encoders (`ENCODERS`), with `encoder_overrides` applied to them (by "vision" or
    "audio", e.g. `{"vision": {"num_hidden_layers": 4}}`)."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    text = text_config(preset, **overrides)
    encoders = {name: dict(config) for name, config in ENCODERS[preset].items()}
    for name, changes in (encoder_overrides or {}).items():
        if name not in encoders:
            raise ValueError(f"encoder_overrides: {preset} has encoders {sorted(encoders)}, got {name!r}")
        encoders[name].update(changes)
    return Gemma4Config(
        text_config=text, vision_config=Gemma4VisionConfig(**encoders["vision"]),
        audio_config=Gemma4AudioConfig(**encoders["audio"]) if "audio" in encoders else None,
        **(_TINY_TOKEN_IDS if preset.startswith("tiny-") else _TOKEN_IDS))


def build_model(preset: str, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                attn_implementation: str = "sdpa", multimodal: bool = False,
                encoder_overrides: dict[str, dict] | None = None, **overrides):
    """`Gemma4ForCausalLM` (`multimodal=True`: `Gemma4ForConditionalGeneration`, with the family's encoders) with
    random weights for `preset`, in eval mode, built directly on `device` in `dtype`; `overrides` go to the text
    config, `encoder_overrides` to the encoders' (see `multimodal_config`). Weights are drawn by `randomize_`; the
    same seed gives the same model.

    The language model and the vision encoder use `attn_implementation`; the audio encoder has only its own.
    """
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    if multimodal:
        config = multimodal_config(preset, encoder_overrides=encoder_overrides, **overrides)
        model_class = Gemma4ForConditionalGeneration
        for sub_config in (config.text_config, config.vision_config):
            sub_config._attn_implementation = attn_implementation
    else:
        if encoder_overrides:
            raise ValueError("encoder_overrides: the text-only model has no encoders (pass multimodal=True)")
        config, model_class = text_config(preset, **overrides), Gemma4ForCausalLM
        config._attn_implementation = attn_implementation
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    randomize_(model, seed)
    return model.eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw `module`'s parameters so that activations have a realistic spread (HF's init leaves norm and router
    scales at exactly one, which would hide rounding differences); the same seed gives the same weights."""
    params = list(module.parameters())
    generator = torch.Generator(device=params[0].device).manual_seed(seed) if params else None
    for param in params:
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        with torch.no_grad():
            if param.ndim == 1:  # norm weights and router scales: around one
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)
    return module


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The keyword a model's forward takes its KV cache by: `cache` in transformers >= 5.2x, which deprecates
    `past_key_values` (removal planned for 5.40), `past_key_values` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
