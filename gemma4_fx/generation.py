"""`generate`: greedy or sampled decoding in which each token costs the host one queued call.

HF `generate` runs Python per token (its loop, logits processors, stopping criteria, cache bookkeeping) that no
backend can take away. Here a decode step is one function of the state on the device (the last tokens, their
positions and cache slot, the padding of the prompts, the static cache, the sampling seed and step) that runs the
model, builds the attention masks, samples, writes the token into an output buffer and advances its counters, all
in place. It is compiled with the backend (per cache length and sampling structure, once more when HF's sliding
cache fills, and once more with a symbolic batch when a second batch size comes: Dynamo's automatic dynamic), so on
CUDA the backend's graphs replay the whole step and the host only queues it.
The host reads one flag every `sync_every` steps: whether every sequence has finished.

Sampling is an exponential race: argmax(p / E) over the candidates with E ~ Exp(1) each, which picks token i with
probability p_i (as `torch.multinomial` would, not the same draws). E comes from a counter-based hash of (seed,
step, row, candidate) computed in the step: no generator state to carry into a compiled graph or a CUDA graph, and
a seed gives the same tokens on every run and device.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import torch

from .backend import gemma4_backend
from .multimodal import capture_data_dependent_ops
from .presets import cache_kwargs

if TYPE_CHECKING:
    from transformers import GenerationConfig, StaticCache

# GenerationConfig fields that apply here; every other field must be unset or at its default (which is off).
_SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "max_length", "max_new_tokens", "min_length",
              "min_new_tokens", "eos_token_id", "pad_token_id", "max_cache_len", "cache_implementation"}
# Fields that change nothing here: other models' special tokens, settings of beam search, assisted decoding and
# scores, the cache switch (a static cache is always used).
_IGNORED = {"bos_token_id", "decoder_start_token_id", "use_cache", "length_penalty", "early_stopping",
            "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
            "assistant_lookbehind", "target_lookbehind", "renormalize_logits", "transformers_version",
            "_from_model_config"}
_ATTENTION = ("sdpa", "eager")  # the mask formats the step builds
# The multimodal class's encoder inputs (and the vision tokens' type ids, for its bidirectional image masks): the
# prefill takes them, as HF generate's first step does; the decode steps see text tokens only.
PROMPT_INPUTS = ("pixel_values", "image_position_ids", "input_features", "input_features_mask", "mm_token_type_ids")


@dataclass(frozen=True)
class GenerateStats:
    """What a `generate` call did: `new_tokens` per sequence (the output's length past the prompt), `steps` run
    (prefill included; up to `sync_every - 1` more than `new_tokens` when every sequence stopped between two
    syncs), and `host_syncs` (reads of a device value, the final length included)."""

    new_tokens: int
    steps: int
    host_syncs: int


@dataclass(frozen=True)
class Sampler:
    """What the step does with the logits, as device ops in the order of HF's processors: the minimum length (eos
    masked before it), then, sampling, temperature, top-k (exactly k candidates, where HF keeps ties with the k-th),
    top-p (the shortest prefix of the sorted candidates whose probability reaches top_p) and the exponential race.
    A change compiles another step; the values (temperature, top_p, the minimum length) are read from the state, so
    changing them compiles nothing."""

    do_sample: bool = False
    top_k: int = 0  # 0: off
    top_p: bool = False  # the state's top_p applies
    min_new_tokens: bool = False  # eos is masked while the state's step is below its min_new_tokens

    def __call__(self, logits: torch.Tensor, state: _State) -> torch.Tensor:
        """The next token of each row of `logits` (rows, vocab)."""
        logits = logits.float()
        if self.min_new_tokens:
            vocab = torch.arange(logits.shape[-1], device=logits.device)
            banned = (vocab[:, None] == state.eos).any(-1) & (state.step < state.min_new_tokens)
            logits = logits.masked_fill(banned, -float("inf"))
        if not self.do_sample:
            return logits.argmax(-1)
        scores, ids = logits / state.temperature, None
        if 0 < self.top_k < scores.shape[-1]:
            scores, ids = scores.topk(self.top_k)
        elif self.top_p:
            scores, ids = scores.sort(descending=True)
        if self.top_p:  # HF drops a token once the probabilities sorted before it reach top_p
            probs = scores.softmax(-1)
            scores = scores.masked_fill(probs.cumsum(-1) - probs >= state.top_p, -float("inf"))
        choice = (scores.softmax(-1) / exponential_noise(state.seed, state.step, scores.shape)).argmax(-1)
        return choice if ids is None else ids.gather(-1, choice[:, None])[:, 0]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in int64 without overflow."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 0x10000) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijection of [0, 2**32) whose output bits each depend on every input bit."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, step: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Exp(1) draws of `shape` (rows, candidates), a pure function of (seed, step, row, candidate): 24-bit uniforms
    in (0, 1) from hashing, so every draw is finite and positive."""
    key = _mix32(_mix32(_mix32(seed & 0xFFFFFFFF) ^ (seed >> 32)) ^ step)
    counter = torch.arange(shape[0] * shape[1], device=seed.device).view(shape)
    bits = _mix32(_mix32(counter ^ key)) >> 8
    return -torch.log((bits.float() + 0.5) / 2**24)


class _State(NamedTuple):
    """The device state a step reads and advances in place: kept between calls (`_Workspace`), static addresses."""

    tokens: torch.Tensor  # (B, 1) the last token of each sequence: the step's input
    positions: torch.Tensor  # (B, 1) its rope position (left padding makes them differ)
    index: torch.Tensor  # (1,) its cache slot
    step: torch.Tensor  # (1,) tokens generated so far
    key_mask: torch.Tensor  # (B, cache length) False on the prompts' padding
    done: torch.Tensor  # (B,) the sequence has emitted eos: it emits pad from now on
    out: torch.Tensor  # (B, cache length) the generated tokens, from column 0
    length: torch.Tensor  # (1,) steps that emitted a token for some unfinished sequence: the output's length
    eos: torch.Tensor  # (E,) eos token ids
    pad: torch.Tensor  # () pad token id
    seed: torch.Tensor  # () sampling seed
    temperature: torch.Tensor  # () float32
    top_p: torch.Tensor  # () float32
    min_new_tokens: torch.Tensor  # ()

    @classmethod
    def empty(cls, batch: int, cache_len: int, device) -> _State:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(tokens=zeros(batch, 1), positions=zeros(batch, 1), index=zeros(1), step=zeros(1),
                   key_mask=zeros(batch, cache_len, dtype=torch.bool), done=zeros(batch, dtype=torch.bool),
                   out=zeros(batch, cache_len), length=zeros(1), eos=zeros(0), pad=zeros(), seed=zeros(),
                   temperature=zeros(dtype=torch.float32), top_p=zeros(dtype=torch.float32), min_new_tokens=zeros())


def _attention_masks(model, cache: StaticCache, state: _State) -> dict[str, torch.Tensor]:
    """The step's 4-D mask per attention type, as HF's mask functions make it, from device counters only: a full
    layer holds cache index j in slot j; a sliding one (`StaticSlidingWindowLayer`) holds `size` slots, and once
    full the last `size` indices, oldest first."""
    config, index, masks = model.config.get_text_config(), state.index, {}
    for kind in dict.fromkeys(config.layer_types):
        size = cache.layers[config.layer_types.index(kind)].max_cache_len
        kv = torch.arange(size, device=index.device)
        if kind == "sliding_attention":
            kv = kv + (index - size + 1).clamp(min=0)
            allowed = state.key_mask.gather(1, kv.expand(state.key_mask.shape[0], size))
            allowed = allowed & (kv > index - config.sliding_window)
        else:
            allowed = state.key_mask
        allowed = (allowed & (kv <= index))[:, None, None]
        if config._attn_implementation == "eager":  # additive, as HF's `eager_mask`
            allowed = torch.where(allowed, torch.zeros((), dtype=model.dtype, device=index.device),
                                  torch.finfo(model.dtype).min)
        masks[kind] = allowed
    return masks


def _emit(logits: torch.Tensor, sampler: Sampler, state: _State) -> None:
    """Sample the next tokens and advance the state: finished sequences emit pad, eos finishes a sequence."""
    token = torch.where(state.done, state.pad, sampler(logits[:, -1], state))
    state.out.index_copy_(1, state.step, token[:, None])
    state.tokens.copy_(token[:, None])
    state.length.add_((~state.done).any().long())
    state.done.logical_or_((token[:, None] == state.eos).any(-1))
    state.step.add_(1)


def _prefill(model, cache, cache_kw: str, sampler: Sampler, state: _State, input_ids, attention_mask, position_ids,
             prompt_inputs: dict):
    """The prompt (and its images or audio) through the model (the model makes the masks, as in HF generate), then
    the first token."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   logits_to_keep=1, **prompt_inputs, **{cache_kw: cache}).logits
    _emit(logits, sampler, state)


def _decode_step(model, cache, cache_kw: str, sampler: Sampler, state: _State) -> None:
    """One token per sequence: (token ids, positions and cache slot, cache, sampling state) -> next token ids,
    written into `state` in place."""
    logits = model(input_ids=state.tokens, position_ids=state.positions,
                   attention_mask=_attention_masks(model, cache, state), use_cache=True, logits_to_keep=1,
                   **{cache_kw: cache}).logits
    _emit(logits, sampler, state)
    state.positions.add_(1)
    state.index.add_(1)


class _Workspace:
    """A static cache and the step's state for one (batch, cache length, device, dtype), kept for the model's next
    call: the CUDA graphs read them in place, and would be captured again if they moved."""

    def __init__(self, model, batch: int, cache_len: int):
        from transformers import StaticCache

        self.key = (batch, cache_len, model.device, model.dtype)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        # one eager token allocates the layers' tensors, outside any compiled graph and with static addresses
        model(torch.zeros((batch, 1), dtype=torch.long, device=model.device), **cache_kwargs(model, self.cache),
              use_cache=True, logits_to_keep=1)
        self.state = _State.empty(batch, cache_len, model.device)

    def fits(self, batch: int, cache_len: int, model) -> bool:
        """Whether a call of `batch` sequences needing `cache_len` slots can run here: a cache at least as long
        is kept, as HF generate keeps its static cache, so that calls of different lengths share one cache, their
        compiled steps and their CUDA graphs (a new cache moves the tensors the graphs read: captured again)."""
        return self.key[0] == batch and self.key[1] >= cache_len and self.key[2:] == (model.device, model.dtype)

    def reset(self, attention_mask: torch.Tensor, positions: torch.Tensor, *, eos: list[int], pad: int, seed: int,
              temperature: float, top_p: float, min_new_tokens: int) -> _State:
        """The state for new prompts (`attention_mask`: 0 on padding; `positions`: the first new token's), with the
        cache emptied."""
        self.cache.reset()
        state, prompt = self.state, attention_mask.shape[1]
        for tensor in (state.step, state.length, state.done, state.out):
            tensor.zero_()
        state.index.fill_(prompt)
        state.key_mask.fill_(True)
        state.key_mask[:, :prompt] = attention_mask.bool()
        state.positions.copy_(positions)
        for tensor, value in ((state.pad, pad), (state.seed, seed), (state.temperature, temperature),
                              (state.top_p, top_p), (state.min_new_tokens, min_new_tokens)):
            tensor.fill_(value)
        if state.eos.tolist() != eos:
            self.state = state = state._replace(eos=torch.tensor(eos, dtype=torch.long, device=state.eos.device))
        for tensor in state:
            torch._dynamo.mark_static_address(tensor)
        return state


_workspaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its last call's _Workspace


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             generation_config: GenerationConfig | None = None, backend=None, sync_every: int = 8,
             seed: int | None = None, generator: torch.Generator | None = None, return_stats: bool = False,
             **kwargs):
    """HF `generate`'s greedy search or sampling over a static cache, each decode step one compiled call.

    Args:
        model: a Gemma-4 causal LM (a forward that takes a dict of 4-D masks per attention type), sdpa or eager
            attention.
        input_ids: (batch, prompt) token ids.
        attention_mask: (batch, prompt), 0 on left padding; absent, inferred from `pad_token_id` as HF does.
        generation_config, **kwargs: HF's, merged over `model.generation_config` as HF merges them; the model's
            `PROMPT_INPUTS` (images, audio, as its processor makes them) go to the prefill. Applied:
            `do_sample`, `temperature`, `top_k`, `top_p`, `max_new_tokens` / `max_length`, `min_new_tokens` /
            `min_length`, `eos_token_id` (int or list), `pad_token_id`, `max_cache_len` (a floor on the static
            cache's length: calls of one length share their compiled steps and CUDA graphs). Any other option set
            to something other than off raises, naming it.
        backend: torch.compile backend for the prefill and the step (default `gemma4_fx.gemma4_backend`).
        sync_every: decode steps between the host's checks whether every sequence has finished.
        seed, generator: the sampling seed, or a generator to draw it from (default: torch's global generator).
        return_stats: also return a `GenerateStats`.

    Returns:
        (batch, prompt + new tokens) ids, as HF returns them: a sequence that finished early is padded with
        `pad_token_id`, and the output ends where the last one finished.

    The model keeps one static cache (and the step's state) between calls, for the next call of the same batch
    size that needs no longer a cache (a shorter call runs in it as in HF generate, sharing its compiled step and
    CUDA graphs); a call of another batch size or a longer one replaces it.
    """
    if generation_config is None:  # HF warns of a `max_cache_len` without a static cache
        kwargs.setdefault("cache_implementation", "static")
    config, unused = model._prepare_generation_config(generation_config, **kwargs)
    prompt_inputs = _prompt_inputs(model, unused)
    if unused:
        raise TypeError(f"generate: unsupported argument(s) {', '.join(sorted(unused))}")
    for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):  # None is off, as in HF's processors
        if getattr(config, name) is None:
            setattr(config, name, off)
    _check_options(model, config, sync_every, seed, generator)
    input_ids = _check_ids(input_ids).to(model.device)
    batch, prompt = input_ids.shape
    eos = _token_list(config.eos_token_id, "eos_token_id")
    pad = config.pad_token_id if config.pad_token_id is not None else eos[0] if eos else 0
    attention_mask = _check_mask(attention_mask, input_ids, pad, eos)
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    if new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected at least 1 new token, got {new_tokens} "
                         f"(max_length {config.max_length}, prompt {prompt})")
    min_new_tokens = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt, 0)
    sampler = Sampler(min_new_tokens=min_new_tokens > 0)  # greedy: HF ignores the sampling options
    if config.do_sample:
        sampler = replace(sampler, do_sample=True, top_k=config.top_k, top_p=config.top_p < 1)
    if seed is None:
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device if generator else "cpu"))
    cache_len = max(prompt + new_tokens - 1, config.max_cache_len or 0)
    backend = gemma4_backend if backend is None else backend
    prefill, decode_step = (torch.compile(fn, backend=backend, fullgraph=True) for fn in (_prefill, _decode_step))
    cache_kw = next(iter(cache_kwargs(model, None)))

    with torch.no_grad():
        workspace = _workspaces.get(model)
        if workspace is None or not workspace.fits(batch, cache_len, model):
            _workspaces.pop(model, None)  # free the old cache before allocating the new one
            workspace = _workspaces[model] = _Workspace(model, batch, cache_len)
        cache = workspace.cache
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as HF makes them
        state = workspace.reset(attention_mask, position_ids[:, -1:] + 1, eos=eos, pad=pad, seed=seed % 2**63,
                                temperature=float(config.temperature), top_p=float(config.top_p),
                                min_new_tokens=min_new_tokens)
        padded = not attention_mask.all()  # HF drops an all-ones mask: the model then makes plain causal masks
        with capture_data_dependent_ops() if prompt_inputs else contextlib.nullcontext():  # as the class needs
            prefill(model, cache, cache_kw, sampler, state, input_ids, attention_mask if padded else None,
                    position_ids, prompt_inputs)
        steps, syncs = 1, 0
        with torch.compiler.config.patch(dynamic_sources=_dynamic_sources()):
            while steps < new_tokens:
                if eos and steps > min_new_tokens and steps % sync_every == 0:
                    syncs += 1
                    if state.done.all():
                        break
                decode_step(model, cache, cache_kw, sampler, state)
                steps += 1
        length = int(state.length) if eos else steps
    tokens = torch.cat([input_ids, state.out[:, :length]], dim=1)
    return (tokens, GenerateStats(length, steps, syncs + bool(eos))) if return_stats else tokens


def _prompt_inputs(model, unused: dict) -> dict:
    """The `PROMPT_INPUTS` among the call's arguments that the model's forward takes, moved to its device (popped
    from `unused`; None ones dropped)."""
    taken = inspect.signature(model.forward).parameters
    inputs = {name: unused.pop(name) for name in PROMPT_INPUTS if name in unused and name in taken}
    for name, value in inputs.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, as the model's processor makes it, got {_describe(value)}")
    return {name: value.to(model.device) for name, value in inputs.items() if value is not None}


def _dynamic_sources() -> str:
    """Dynamo's dynamic sources plus HF's sliding-layer fill level (`StaticSlidingWindowLayer.cumulative_length_int`,
    a Python int that moves every step): symbolic from the first decode compile, rather than specialised to the
    first step's value and compiled again at the second."""
    return ",".join(filter(None, [torch.compiler.config.dynamic_sources, r".*\.cumulative_length_int"]))


def _check_options(model, config: GenerationConfig, sync_every, seed, generator) -> None:
    """Raise, naming the option, on what this loop does not implement or cannot take."""
    from transformers import GenerationConfig

    defaults = config._get_default_generation_params()
    for name in GenerationConfig().to_dict():
        value = getattr(config, name, None)
        if name not in _SUPPORTED | _IGNORED and value not in (None, False, defaults.get(name)):
            raise ValueError(f"{name}: not supported by gemma4_fx.generate (got {value!r}); use HF generate")
    if config.cache_implementation not in (None, "static"):
        raise ValueError(f"cache_implementation: generate uses a static cache, got {config.cache_implementation!r}")
    if config.do_sample and not config.temperature > 0:
        raise ValueError(f"temperature: expected a positive float, got {config.temperature!r}")
    if config.do_sample and not 0 < config.top_p <= 1:
        raise ValueError(f"top_p: expected a float in (0, 1], got {config.top_p!r}")
    if config.top_k is not None and (isinstance(config.top_k, bool) or not isinstance(config.top_k, int)
                                     or config.top_k < 0):
        raise ValueError(f"top_k: expected a non-negative int, got {config.top_k!r}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every: expected a positive int, got {sync_every!r}")
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: pass one or the other")
    text_config = model.config.get_text_config()  # the language model's (the multimodal class nests it)
    if text_config._attn_implementation not in _ATTENTION:
        raise ValueError(f"attn_implementation: generate builds masks for {_ATTENTION}, the model uses "
                         f"{text_config._attn_implementation!r}")
    kinds = set(getattr(text_config, "layer_types", None) or ())
    if not kinds or not kinds <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"layer_types: generate builds masks for full and sliding attention layers, the model has "
                         f"{sorted(kinds) or 'none named'}")


def _token_list(ids, name: str) -> list[int]:
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) else list(ids)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{name}: expected token ids (non-negative ints), got {ids!r}")
    return ids


def _describe(value) -> str:
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or 0 in input_ids.shape \
            or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids: expected a non-empty (batch, prompt) integer tensor, got {_describe(input_ids)}")
    return input_ids.long()


def _check_mask(attention_mask, input_ids: torch.Tensor, pad: int, eos: list[int]) -> torch.Tensor:
    """The prompts' mask as longs, left padding only; absent, HF's: 0 on `pad` unless pad is an eos."""
    if attention_mask is None:
        return torch.ones_like(input_ids) if pad in eos else input_ids.ne(pad).long()
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{_describe(attention_mask)}")
    mask = attention_mask.to(input_ids.device).long()
    if not (((mask == 0) | (mask == 1)).all() and (mask[:, 1:] >= mask[:, :-1]).all() and mask[:, -1].all()):
        raise ValueError("attention_mask: expected left padding (each row 0s, then 1s through its last token)")
    return mask
