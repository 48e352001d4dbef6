"""`gemma4_fx.generate`: HF's greedy tokens over a left-padded batch, seeded sampling from HF's distribution,
options it cannot take.

Every generate configuration compiles a prefill and a decode step (5-40 s on a CI core through Inductor), so one test
goes through the backend and the others through Dynamo alone (`backend="eager"`), which runs the same step.
"""

import pytest
import torch
from transformers import CompileConfig
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from gemma4_fx import Gemma4Backend, build_model, generate
from gemma4_fx.generation import GenerateStats, Sampler, _State, exponential_noise

MOE = "tiny-26b-a4b"


def left_padded(model, lengths, seed=0):
    """Prompts of `lengths`, left-padded with the pad token to the longest, and their attention mask."""
    width = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, model.generation_config.pad_token_id).to(model.device), mask.to(model.device)


def hf_generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, do_sample=False, cache_implementation="static",
                          disable_compile=True, **kwargs)


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.compat
@pytest.mark.parametrize("preset, layers, backend, experts", [("tiny-e2b", None, "eager", None),
                                                              (MOE, 2, "gemma4_fx", None),
                                                              (MOE, 2, "gemma4_fx", "eager")],
                         ids=["tiny-e2b-dynamo", "tiny-26b-a4b-gemma4_fx", "tiny-26b-a4b-eager-experts-gemma4_fx"])
def test_greedy_matches_hf_generate(preset, layers, backend, experts):
    """A left-padded batch whose rows each stop at their own eos (a list): HF's tokens, pad after each row's eos,
    the loop stopped at the first sync after the last; a second call compiles nothing and gives the same tokens.
    (With transformers' "eager" experts too: their loop traced as one op and rewritten, in prefill and decode.)"""
    model = build_model(preset, **({"num_hidden_layers": layers} if layers else {}),
                        **({"experts_implementation": experts} if experts else {}))
    ids, mask = left_padded(model, [8, 6, 7])
    free = hf_generate(model, ids, mask, max_new_tokens=12, eos_token_id=None)
    eos = [int(free[row, 8 + step]) for row, step in enumerate((6, 3, 5))]  # each row ends by its 7th token
    expected = hf_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos)
    finished = expected.shape[1] - 8
    assert (expected[:, 8:] == model.generation_config.pad_token_id).any(), "no row finished before the others"
    backend = Gemma4Backend() if backend == "gemma4_fx" else backend
    kwargs = dict(max_new_tokens=12, eos_token_id=eos, sync_every=4, backend=backend, return_stats=True)

    tokens, stats = generate(model, ids, mask, **kwargs)
    assert torch.equal(tokens, expected)
    steps = -(-finished // 4) * 4  # the first sync after the last eos
    assert stats == GenerateStats(new_tokens=finished, steps=steps, host_syncs=steps // 4 + 1)
    graphs = compiled_graphs()
    assert torch.equal(generate(model, ids, mask, **kwargs)[0], expected)
    assert compiled_graphs() == graphs
    if not isinstance(backend, str):
        report = backend.report
        assert report.counts["router"] == layers * len(report.graphs) and not report.fallbacks, report
        assert report.counts["moe_experts"] == layers * len(report.graphs), report
        # static rows (24 in the prefill, 3 in the decode step): each layer's q/k/v and gate/up in one launch each
        assert report.counts["skinny_linear"] == 2 * layers * len(report.graphs), report


def test_shorter_calls_run_in_the_longer_cache():
    """After a longer call, shorter ones run in its cache as in HF generate: HF's tokens, and nothing compiled or
    (simulated) captured again once each shape has been seen, where a cache per length re-captured at every switch."""
    import gemma4_fx.runtime.cudagraphs as cudagraphs
    from gemma4_fx.runtime.cudagraphs import CUDAGraphRuntime
    from helpers import fake_capture, runner_backend

    model = build_model("tiny-e2b")
    ids, mask = left_padded(model, [8, 6])
    runtime = CUDAGraphRuntime(max_shapes=8)
    backend, new = runner_backend(runtime), []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudagraphs, "_capture", fake_capture)
        for tokens in (6, 20, 6, 6, 20, 6):
            graphs, captures = compiled_graphs(), runtime.stats.captures
            out = generate(model, ids, mask, max_new_tokens=tokens, eos_token_id=None, backend=backend)
            assert torch.equal(out, hf_generate(model, ids, mask, max_new_tokens=tokens, eos_token_id=None))
            new.append((compiled_graphs() - graphs, runtime.stats.captures - captures))
    assert new[3:] == [(0, 0)] * 3 and runtime.stats.replays > 0, new


def test_hf_generate_with_a_kept_cache_captures_once():
    """HF generate makes a new static cache per call, so the graphs that write the old one would be captured again;
    given one `StaticCache` (reset between prompts), as the README says, its calls after the first capture nothing,
    with HF's tokens."""
    from transformers import StaticCache

    import gemma4_fx.runtime.cudagraphs as cudagraphs
    from gemma4_fx.presets import cache_kwargs
    from gemma4_fx.runtime.cudagraphs import CUDAGraphRuntime
    from helpers import fake_capture, runner_backend

    model = build_model("tiny-e2b")
    ids, mask = left_padded(model, [9, 7])
    runtime = CUDAGraphRuntime(max_shapes=8)
    backend = runner_backend(runtime)
    config = CompileConfig(backend=lambda gm, inputs, **_: backend(gm, inputs))
    config._compile_all_devices = True  # HF compiles on CUDA only unless told
    cache, captures = StaticCache(config=model.config, max_cache_len=40), []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudagraphs, "_capture", fake_capture)
        for tokens in (6, 20, 6, 20):
            before = runtime.stats.captures
            cache.reset()
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens, eos_token_id=None,
                                 compile_config=config, **cache_kwargs(model, cache))
            assert torch.equal(out, hf_generate(model, ids, mask, max_new_tokens=tokens, eos_token_id=None))
            captures.append(runtime.stats.captures - before)
    assert captures[0] > 0 and captures[1:] == [0, 0, 0] and runtime.stats.replays > 0, captures


def test_multimodal_class_with_a_text_prompt_and_images_where_the_model_takes_them():
    """`Gemma4ForConditionalGeneration` with a text prompt: HF's greedy tokens (the masks come from the nested text
    config). Images go to a model whose forward takes them, as tensors (prompts with images:
    `test_multimodal.py`); anything else is refused by name."""
    model = build_model("tiny-e2b", multimodal=True)
    ids = torch.randint(3, model.config.boi_token_id, (2, 9), generator=torch.Generator().manual_seed(0))  # words
    mask = torch.ones_like(ids)
    expected = hf_generate(model, ids, mask, max_new_tokens=5)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=5, backend="eager"), expected)
    with pytest.raises(ValueError, match="pixel_values: expected a tensor"):
        generate(model, ids, mask, max_new_tokens=5, backend="eager", pixel_values=[[0.0]])
    with pytest.raises(TypeError, match="pixel_values"):
        generate(build_model("tiny-e2b"), ids, mask, max_new_tokens=5, backend="eager", pixel_values=torch.zeros(1))


def test_sampling_is_seeded_and_its_limits_are_greedy():
    """Sampling inside the compiled step (eager attention: float masks): a seed, or a generator in one state,
    gives the same tokens again, another seed others; top_k=1, and a temperature near 0 (over HF's default
    top_k=50), give the greedy tokens, which are HF's."""
    model = build_model(MOE, num_hidden_layers=2, attn_implementation="eager")
    ids, mask = left_padded(model, [7, 5], seed=1)

    def run(**kwargs):
        return generate(model, ids, mask, max_new_tokens=6, eos_token_id=None, backend="eager", **kwargs)

    greedy = run()
    assert torch.equal(greedy, hf_generate(model, ids, mask, max_new_tokens=6, eos_token_id=None))
    assert torch.equal(run(do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(run(do_sample=True, temperature=1e-4, seed=3), greedy)
    graphs = compiled_graphs()
    sampled = run(do_sample=True, seed=1)
    assert not torch.equal(sampled, greedy)
    assert torch.equal(run(do_sample=True, seed=1), sampled)
    assert not torch.equal(run(do_sample=True, seed=2), sampled)
    assert torch.equal(run(do_sample=True, generator=torch.Generator().manual_seed(5)),
                       run(do_sample=True, generator=torch.Generator().manual_seed(5)))
    assert compiled_graphs() == graphs  # seeds and temperatures are state, not constants of the step


def hf_probabilities(logits, temperature, top_k, top_p):
    """The distribution HF's sampling draws from: its warpers, then softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(torch.zeros((1, 1), dtype=torch.long), logits[None].clone())[0].softmax(-1).double()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 4, 0.9)])
def test_sampler_draws_hfs_distribution(temperature, top_k, top_p):
    """On a 6-token vocabulary, 5 steps of 20,000 rows: tokens HF's warpers exclude never come, the others at
    HF's probabilities (within 5 standard errors)."""
    logits, rows = torch.tensor([2.0, 1.6, 1.0, 0.4, 0.0, -1.0]), 20_000
    expected = hf_probabilities(logits, temperature, top_k, top_p)
    assert 0 < (expected == 0).sum() < 5  # the case excludes some tokens and samples among several
    state = _State.empty(rows, 1, "cpu")
    state.temperature.fill_(temperature)
    state.top_p.fill_(top_p)
    state.seed.fill_(1234)
    sampler = Sampler(do_sample=True, top_k=top_k, top_p=top_p < 1)
    draws = []
    for step in range(5):
        state.step.fill_(step)
        draws.append(sampler(logits.expand(rows, -1), state))
    counts = torch.bincount(torch.cat(draws), minlength=len(logits)).double()
    assert counts[expected == 0].sum() == 0
    frequency, n = counts / counts.sum(), counts.sum()
    assert ((frequency - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt()).all(), (frequency, expected)


def test_noise_and_minimum_length():
    """The noise is a function of (seed, step, row, candidate), positive and finite; eos is masked until
    min_new_tokens tokens came, then chosen where it is the argmax."""
    seed, shape = torch.tensor(2**40 + 7), torch.Size([3, 1000])
    noise = exponential_noise(seed, torch.tensor([4]), shape)
    assert torch.equal(noise, exponential_noise(seed, torch.tensor([4]), shape))
    assert not torch.equal(noise, exponential_noise(seed, torch.tensor([5]), shape))
    assert not torch.equal(noise, exponential_noise(seed + 1, torch.tensor([4]), shape))
    assert noise.isfinite().all() and (noise > 0).all() and abs(noise.mean().item() - 1) < 0.1
    state = _State.empty(2, 1, "cpu")._replace(eos=torch.tensor([5, 9]))
    state.min_new_tokens.fill_(2)
    logits = torch.zeros(2, 12)
    logits[0, 5], logits[0, 7], logits[1, 9], logits[1, 3] = 3, 2, 3, 1
    sampler = Sampler(min_new_tokens=True)
    assert sampler(logits, state).tolist() == [7, 3]
    state.step.fill_(2)
    assert sampler(logits, state).tolist() == [5, 9]


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_beams=2), "num_beams"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(output_scores=True), "output_scores"),
    (dict(foo=1), "unsupported argument.*foo"),
    (dict(cache_implementation="dynamic"), "cache_implementation"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(sync_every=0), "sync_every"),
    (dict(seed=1, generator=torch.Generator()), "seed, generator"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])), "attention_mask: expected left padding"),
    (dict(attention_mask=torch.ones(2, 3)), "attention_mask: expected the shape"),
    (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(2, 4)), "input_ids"),
    (dict(max_length=4), "max_new_tokens"),
])
def test_rejects_what_it_cannot_take(kwargs, error):
    model = build_model(MOE, num_hidden_layers=1)
    kwargs = {"input_ids": torch.full((2, 4), 5), **kwargs}
    with pytest.raises((ValueError, TypeError), match=error):
        generate(model, **kwargs)


def test_rejects_attention_it_builds_no_masks_for():
    model = build_model(MOE, num_hidden_layers=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        generate(model, torch.full((1, 4), 5))


@pytest.mark.gpu
def test_cuda_step_is_one_graph_replay():
    """On CUDA through the backend: HF generate's tokens (through the backend too), and once warm each decode step
    is one replay of one graph, nothing is captured again between calls, and the host reads the device once (the
    output's length: eos cannot come before min_new_tokens, so there is nothing to check before)."""
    model = build_model("tiny-e2b", device="cuda")
    ids, mask = left_padded(model, [9, 7])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, eos_token_id=1,
                              max_cache_len=40, do_sample=False, cache_implementation="static",
                              compile_config=CompileConfig(backend=Gemma4Backend()))
    backend = Gemma4Backend()

    def run(new_tokens):  # one cache length (40) for both lengths: one workspace, one step graph
        captures, replays = backend.cudagraph_stats.captures, backend.cudagraph_stats.replays
        tokens, stats = generate(model, ids, mask, max_new_tokens=new_tokens, max_cache_len=40, eos_token_id=1,
                                 min_new_tokens=new_tokens, backend=backend, return_stats=True)
        return tokens, stats, backend.cudagraph_stats.captures - captures, backend.cudagraph_stats.replays - replays

    for _ in range(3):  # compile, capture the prefill's pieces and the step, replay
        tokens, stats, _, _ = run(16)
    assert torch.equal(tokens, expected)
    _, stats_16, captured_16, replays_16 = run(16)
    _, stats_24, captured_24, replays_24 = run(24)
    assert captured_16 == captured_24 == 0 and replays_24 - replays_16 == 8
    assert (stats_16.host_syncs, stats_24.host_syncs) == (1, 1)
    assert not backend.cudagraph_stats.failures and not backend.report.fallbacks


@pytest.mark.gpu
def test_cuda_sampling_is_seeded():
    """Top-k and top-p sampling (topk, sort, cumsum, the race) replays from the graphs: a seed repeats."""
    model = build_model(MOE, device="cuda")
    ids, mask = left_padded(model, [9, 4, 7])
    backend = Gemma4Backend()
    kwargs = dict(do_sample=True, top_k=40, top_p=0.9, temperature=0.8, max_new_tokens=12, backend=backend)
    runs = [generate(model, ids, mask, seed=seed, **kwargs) for seed in (1, 1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[3])
    stats = backend.cudagraph_stats
    assert stats.replays > 0 and not stats.failures, str(stats)
