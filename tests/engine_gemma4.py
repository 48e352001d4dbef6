"""A Gemma-4 text decoder written the way inference engines write it, without any engine installed.

What engines do differently from HF's `Gemma4ForCausalLM`, and the patterns must therefore match too:
- the tokens of all requests in one flat [tokens, hidden] batch (no batch dim), a linear on it is a bare `mm`;
- fused qkv and gate_up weights, split after the projection;
- their own attention call over a block-diagonal causal mask (and a sliding one), KV-shared layers reading the keys
  and values another layer computed;
- each request's last token picked by an `index_select` before the final norm and the LM head;
- RMSNorm written `x * rsqrt(mean(x²) + eps)`, cast to the weight's dtype, times the weight (`norm="rsqrt"`, vLLM's
  form), or as one opaque op (`norm="op"`: `engine_gemma4::rms_norm`, as an engine that registers its norm);
  `norm="hf"` is HF's `pow(·, -0.5)` form, weighed in fp32;
- the router's top-k of the raw logits first, then a softmax of the k kept (`router="topk_first"`); `router="hf"`
  is HF's softmax over all experts, top-k, renormalise;
- the linears as one opaque op (`linear="op"`: `engine_gemma4::linear`), as an engine that dispatches its GEMMs.

Built from `gemma4_fx.text_config(preset)` with seeded random weights. The experts of MoE layers are computed for
every token and weighed by a dense [tokens, experts] routing matrix: no data-dependent shapes, the same math.
"""

from __future__ import annotations

import torch
from torch import Tensor

import gemma4_fx
from gemma4_fx.replacements.rows import rms_norm  # HF's Gemma4RMSNorm

NORMS = ("hf", "rsqrt", "op")
ROUTERS = ("hf", "topk_first")
LINEARS = ("aten", "op")
RMS_NORM_OP = "engine_gemma4::rms_norm"
LINEAR_OP = "engine_gemma4::linear"


def rsqrt_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """vLLM's RMSNorm (`vllm.ir.ops.rms_norm`): fp32 rsqrt, cast to the weight's dtype, times the weight."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out.to(weight.dtype) * weight
    return out.to(x.dtype)


@torch.library.custom_op(RMS_NORM_OP, mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """An engine's registered norm op: opaque to Inductor, `rsqrt_norm` inside."""
    return rsqrt_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op(LINEAR_OP, mutates_args=())
def linear_op(x: Tensor, weight: Tensor) -> Tensor:
    """An engine's registered GEMM: opaque to Inductor, x @ weight.T inside."""
    return torch.nn.functional.linear(x, weight)


@linear_op.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Forms:
    """How the model writes its norms, router and linears (see the module docstring)."""

    def __init__(self, config, norm: str, router: str, linear: str):
        for name, value, allowed in (("norm", norm, NORMS), ("router", router, ROUTERS),
                                     ("linear", linear, LINEARS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        self.eps, self.router = config.rms_norm_eps, router
        self._norm = {"hf": rms_norm, "rsqrt": rsqrt_norm, "op": rms_norm_op}[norm]
        self._linear = linear_op if linear == "op" else torch.nn.functional.linear

    def norm(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return self._norm(x, weight, self.eps)

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._linear(x, weight)


class _Weights:
    """Seeded random weights: matrices scaled by fan-in, norm and router scales around one."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def matrix(self, *shape) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape, generator=self.generator) * shape[-1] ** -0.5)

    def scale(self, size: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(1.0 + 0.1 * torch.randn(size, generator=self.generator))


class Layer(torch.nn.Module):
    """One decoder layer; `kv_source` is the layer whose keys and values a KV-shared layer reads (else None)."""

    def __init__(self, config, i: int, forms: Forms, weights: _Weights, kv_source: int | None):
        super().__init__()
        self.config, self.forms, self.i, self.kv_source = config, forms, i, kv_source
        self.kind, hidden = config.layer_types[i], config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.per_layer_config[i].head_dim
        self.kv_heads = config.per_layer_config[i].num_key_value_heads
        self.k_eq_v = config.attention_k_eq_v and self.kind == "full_attention"
        kv_projections = 0 if kv_source is not None else 1 if self.k_eq_v else 2
        self.qkv = weights.matrix((self.heads + kv_projections * self.kv_heads) * self.head_dim, hidden)
        self.q_norm, self.k_norm = weights.scale(self.head_dim), weights.scale(self.head_dim)
        self.o = weights.matrix(hidden, self.heads * self.head_dim)
        wide = 2 if config.use_double_wide_mlp and kv_source is not None else 1
        self.gate_up = weights.matrix(2 * wide * config.intermediate_size, hidden)
        self.down = weights.matrix(hidden, wide * config.intermediate_size)
        for name in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            setattr(self, f"{name}_norm", weights.scale(hidden))
        if config.enable_moe_block:
            experts, moe = config.num_experts, config.moe_intermediate_size
            self.router_scale, self.router = weights.scale(hidden), weights.matrix(experts, hidden)
            self.per_expert_scale = weights.scale(experts)
            self.experts_gate_up, self.experts_down = weights.matrix(experts, 2 * moe, hidden), \
                weights.matrix(experts, hidden, moe)
            for name in ("post_feedforward_1", "pre_feedforward_2", "post_feedforward_2"):
                setattr(self, f"{name}_norm", weights.scale(hidden))
        if config.hidden_size_per_layer_input:
            ple = config.hidden_size_per_layer_input
            self.ple_gate, self.ple_projection = weights.matrix(ple, hidden), weights.matrix(hidden, ple)
            self.ple_norm = weights.scale(hidden)
        self.register_buffer("layer_scalar", weights.scale(1).detach())

    def attention(self, x: Tensor, rope, mask: Tensor, kv: dict) -> Tensor:
        forms, tokens, q_size = self.forms, x.shape[0], self.heads * self.head_dim
        qkv = forms.linear(x, self.qkv)
        q, kv_proj = qkv.split([q_size, qkv.shape[-1] - q_size], dim=-1)
        q = _rope(forms.norm(q.unflatten(-1, (self.heads, self.head_dim)), self.q_norm), *rope)
        if self.kv_source is not None:
            k, v = kv[self.kv_source]
        else:
            k = kv_proj[:, :self.kv_heads * self.head_dim].unflatten(-1, (self.kv_heads, self.head_dim))
            v = k if self.k_eq_v else kv_proj[:, self.kv_heads * self.head_dim:].unflatten(-1, (self.kv_heads,
                                                                                                self.head_dim))
            k, v = _rope(forms.norm(k, self.k_norm), *rope), forms.norm(v, None)
            kv[self.i] = k, v
        groups = self.heads // k.shape[1]
        k, v = (t.repeat_interleave(groups, dim=1).transpose(0, 1)[None] for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask,
                                                               scale=1.0)
        return forms.linear(out[0].transpose(0, 1).reshape(tokens, q_size), self.o)

    def route(self, x: Tensor) -> Tensor:
        """The routing weights as a dense [tokens, experts] matrix (zero where an expert is not chosen)."""
        config, forms, k = self.config, self.forms, self.config.top_k_experts
        logits = forms.linear(forms.norm(x, None) * self.router_scale * config.hidden_size ** -0.5, self.router)
        if forms.router == "hf":
            weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            top, ids = torch.topk(logits, k, dim=-1)
            weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        weights = weights * self.per_expert_scale[ids]
        return torch.zeros(x.shape[0], config.num_experts, dtype=weights.dtype).scatter(1, ids, weights)

    def experts(self, x: Tensor, routing: Tensor) -> Tensor:
        """Every expert on every token, weighed by the routing matrix: the math of a fused MoE, no dispatch."""
        gate, up = torch.einsum("th,eih->eti", x, self.experts_gate_up).chunk(2, dim=-1)
        out = torch.einsum("eti,ehi->eth", torch.nn.functional.gelu(gate, approximate="tanh") * up, self.experts_down)
        return torch.einsum("eth,te->th", out, routing.to(out.dtype))

    def forward(self, x: Tensor, per_layer_input: Tensor | None, rope, mask: Tensor, kv: dict) -> Tensor:
        forms = self.forms
        residual = x
        x = forms.norm(self.attention(forms.norm(x, self.input_norm), rope, mask, kv), self.post_attention_norm)
        x = residual = residual + x
        gate, up = forms.linear(forms.norm(x, self.pre_feedforward_norm), self.gate_up).chunk(2, dim=-1)
        x = forms.linear(torch.nn.functional.gelu(gate, approximate="tanh") * up, self.down)
        if self.config.enable_moe_block:
            moe = self.experts(forms.norm(residual, self.pre_feedforward_2_norm), self.route(residual))
            x = forms.norm(x, self.post_feedforward_1_norm) + forms.norm(moe, self.post_feedforward_2_norm)
        x = residual + forms.norm(x, self.post_feedforward_norm)
        if per_layer_input is not None:
            gate = torch.nn.functional.gelu(forms.linear(x, self.ple_gate), approximate="tanh") * per_layer_input
            x = x + forms.norm(forms.linear(gate, self.ple_projection), self.ple_norm)
        return x * self.layer_scalar


class EngineGemma4(torch.nn.Module):
    """forward(ids [T], positions [T], masks {layer type: bool [T, T]}, last [requests]) -> logits [requests, V]."""

    def __init__(self, preset: str, *, norm: str = "rsqrt", router: str = "topk_first", linear: str = "aten",
                 seed: int = 0, **overrides):
        super().__init__()
        config = self.config = gemma4_fx.text_config(preset, **overrides)
        self.forms, weights = Forms(config, norm, router, linear), _Weights(seed)
        hidden, ple, depth = config.hidden_size, config.hidden_size_per_layer_input, config.num_hidden_layers
        self.embed, self.final_norm = weights.matrix(config.vocab_size, hidden), weights.scale(hidden)
        if ple:
            self.embed_per_layer = weights.matrix(config.vocab_size_per_layer_input, depth * ple)
            self.per_layer_projection, self.per_layer_norm = weights.matrix(depth * ple, hidden), weights.scale(ple)
        # transformers' KV sharing: the last num_kv_shared_layers reuse the cache of the last earlier layer of their
        # attention type
        first_shared = depth - (config.num_kv_shared_layers or 0)
        stored, layers = {}, []
        for i, kind in enumerate(config.layer_types):
            layers.append(Layer(config, i, self.forms, weights, stored[kind] if i >= first_shared else None))
            if i < first_shared:
                stored[kind] = i
        self.layers = torch.nn.ModuleList(layers)
        self.eval()

    def rope(self, positions: Tensor) -> dict:
        """(cos, sin) [tokens, 1, head_dim] per layer type; full layers rotate a quarter of their dims."""
        tables = {}
        for kind, head_dim in {layer.kind: layer.head_dim for layer in self.layers}.items():
            params = self.config.rope_parameters[kind]
            rotated = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
            inv_freq = params["rope_theta"] ** (-torch.arange(rotated, dtype=torch.float32) * 2 / head_dim)
            angles = positions[:, None].float() * torch.cat((inv_freq, torch.zeros(head_dim // 2 - rotated)))
            angles = torch.cat((angles, angles), dim=-1)[:, None]
            tables[kind] = angles.cos().to(self.embed.dtype), angles.sin().to(self.embed.dtype)
        return tables

    def forward(self, ids: Tensor, positions: Tensor, masks: dict, last: Tensor) -> Tensor:
        config, forms = self.config, self.forms
        x = torch.nn.functional.embedding(ids, self.embed) * config.hidden_size ** 0.5
        per_layer_inputs = None
        if config.hidden_size_per_layer_input:
            shape = (ids.shape[0], config.num_hidden_layers, config.hidden_size_per_layer_input)
            token = torch.nn.functional.embedding(ids, self.embed_per_layer).reshape(shape) * shape[-1] ** 0.5
            context = forms.linear(x, self.per_layer_projection) * config.hidden_size ** -0.5
            per_layer_inputs = (forms.norm(context.reshape(shape), self.per_layer_norm) + token) * 2 ** -0.5
        rope, kv = self.rope(positions), {}
        for i, layer in enumerate(self.layers):
            x = layer(x, per_layer_inputs[:, i] if per_layer_inputs is not None else None, rope[layer.kind],
                      masks[layer.kind], kv)
        x = forms.norm(x.index_select(0, last), self.final_norm)
        cap = config.final_logit_softcapping
        return torch.tanh(forms.linear(x, self.embed) / cap) * cap

def batch(model: EngineGemma4, lengths, seed: int):
    """(ids, positions, masks per layer type, index of each request's last token) for requests of `lengths`,
    all tokens in one flat batch: the attention metadata an engine computes before the forward."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (sum(lengths),), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])
    request = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    causal = (request[:, None] == request[None, :]) & (positions[:, None] >= positions[None, :])
    window = positions[:, None] - positions[None, :] < config.sliding_window
    masks = {"full_attention": causal, "sliding_attention": causal & window}
    return ids, positions, masks, torch.tensor(lengths).cumsum(0) - 1
