"""CUDA graph runtime on CUDA: replays equal eager, held outputs survive, memory stays bounded, `generate` keeps
its tokens (run on the GPU machine: `python -m pytest tests/test_gpu_runtime.py -q`)."""

import collections
import random
import unittest.mock
import warnings

import pytest
import torch
from transformers import CompileConfig, StaticCache

import gemma4_fx
from gemma4_fx.presets import cache_kwargs
from gemma4_fx.runtime.cudagraphs import CapturedPiece, PieceGraph

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    return gemma4_fx.build_model("tiny-e2b", dtype=torch.float32, device="cuda")  # 7 layers


def token_ids(model, batch, length, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), device="cuda", generator=generator)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_prefill_replays_equal_eager_and_held_outputs_survive(model, mode):
    backend = gemma4_fx.Gemma4Backend(cudagraphs=mode)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    held, expected = [], []
    with torch.no_grad():
        for call, length in enumerate([5, 9, 5, 9, 5, 9, 5, 5]):
            ids = token_ids(model, 2, length, seed=call)
            held.append(compiled(ids, use_cache=False).logits)
            expected.append(model(ids, use_cache=False).logits)
    for actual, reference in zip(held, expected):  # calls 3.. replayed the same graphs: nothing overwritten
        assert_close(actual, reference)
    stats = backend.cudagraph_stats
    pieces = 8 if mode == "piecewise" else 1
    assert (stats.graphs, stats.captures, stats.replays) == (2 * pieces, 2 * pieces, 6 * pieces)
    assert stats.pool_bytes > 0 and not stats.failures
    assert list(backend.graph_reports) == ["graph_0"]  # one dynamic graph serves every length: no recompiles


def test_a_piece_of_views_alone_is_captured_without_torchs_empty_graph_warning():
    def attend_twice(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(out.view(q.shape), k, v)  # between: a view alone

    backend = gemma4_fx.Gemma4Backend(cudagraphs="piecewise")
    compiled = torch.compile(attend_twice, backend=backend)
    q, k, v = (torch.randn(1, 2, 8, 16, device="cuda") for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [compiled(q, k, v) for _ in range(3)]  # run, capture, replay
    assert not [w for w in caught if "CUDA Graph is empty" in str(w.message)]
    with warnings.catch_warnings(record=True) as control:  # torch's wording, as the runtime's filter has it
        warnings.simplefilter("always")
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    assert [w for w in control if "CUDA Graph is empty" in str(w.message)]
    assert backend.cudagraph_stats.captures > 0 and not backend.cudagraph_stats.failures
    for out in outputs:
        assert_close(out, attend_twice(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_with_a_dynamic_cache_replays_what_it_ran(dtype):
    """As HF's prefill calls it: DynamicCache, logits_to_keep=1, lengths left dynamic (Dynamo passes float
    attributes as CPU tensors then, baked in as guarded constants; the cache's window size, which it makes on the CPU
    and copies over, is made on the GPU inside a graph)."""
    model = gemma4_fx.build_model("tiny-e2b", dtype=dtype, device="cuda")
    backend = gemma4_fx.Gemma4Backend()  # "auto": piecewise for prefill
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in (6, 11):
            ids = token_ids(model, 1, length, seed=length)
            runs = [compiled(ids, logits_to_keep=1, use_cache=True).logits for _ in range(4)]  # run, capture, replay
            for replayed in runs[1:]:
                torch.testing.assert_close(replayed, runs[0], rtol=0, atol=0)
            expected = model(ids, logits_to_keep=1, use_cache=True).logits
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(runs[0], expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
        torch.cuda.set_sync_debug_mode("error")  # the window size made on the device: the host never waits
        try:
            compiled(ids, logits_to_keep=1, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    stats = backend.cudagraph_stats
    assert stats.replays > 0 and not stats.failures
    assert not [w for w in caught if "CUDA Graph is empty" in str(w.message)]  # no piece that launches nothing
    # YOCO leaves the KV-shared layers and the layer before them one query row: that attention runs inside the
    # graphs, so only the layers that see the whole prompt cut them, per length (test_runtime.py checks it on CPU)
    config = model.config
    whole = config.num_hidden_layers - config.num_kv_shared_layers - 1
    assert stats.graphs == 2 * (whole + 1)


def test_a_multimodal_prefill_syncs_before_its_layers_run():
    """tiny-e4b with two images through the default runtime: the host reads the pooler's valid patches, the images'
    soft-token counts and the image placeholders (`runtime.split._hoist_host_syncs`) before any graph but the one
    that computes those masks has run, and the replays give eager's logits."""
    from test_multimodal import model_inputs

    model = gemma4_fx.build_model("tiny-e4b", multimodal=True, device="cuda")
    input_ids, inputs = model_inputs(model, images=[(48, 72), (36, 24)], device="cuda")
    compiled = torch.compile(model, backend=gemma4_fx.Gemma4Backend())
    events, replay = [], PieceGraph.replay  # CUDAGraph.replay is bound at capture: record the piece's replay

    def recorded_replay(piece, args):
        events.append("replay")
        return replay(piece, args)

    with torch.no_grad(), gemma4_fx.capture_data_dependent_ops():
        expected = model(input_ids, **inputs, logits_to_keep=1).logits
        for _ in range(3):  # run, capture, replay
            logits = compiled(input_ids, **inputs, logits_to_keep=1).logits
        assert_close(logits, expected)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(), unittest.mock.patch.object(PieceGraph, "replay", recorded_replay):
                warnings.simplefilter("always")
                warnings.showwarning = lambda message, *args, **kwargs: events.append(
                    "sync" if "synchroniz" in str(message) else "other")
                logits = compiled(input_ids, **inputs, logits_to_keep=1).logits  # compared below: comparing syncs
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert_close(logits, expected)
    syncs = [index for index, event in enumerate(events) if event == "sync"]
    assert len(syncs) >= 4 and events.count("replay") > 2, events
    assert events[:syncs[-1]].count("replay") <= 1, events


@pytest.mark.parametrize("tower", ["vision_tower", "audio_tower"])
def test_encoder_graphs_replay_for_prompts_of_any_length(monkeypatch, tower):
    """The CPU test of the same name with Inductor's pieces and real CUDA graphs: images padded to a patch budget and
    clips to a length bucket size the encoder alone, so its graphs are captured on a size's second request and
    replayed for every later one, whatever the prompt's length; every request gives eager's logits."""
    from test_multimodal import ENCODER_REQUESTS, encoder_graphs, holds, model_inputs, run

    preset, requests = ENCODER_REQUESTS[tower]
    encoder_pieces, split_graph, call = set(), gemma4_fx.backend.split_graph, CapturedPiece.__call__

    def recorded_split(gm, *args, **kwargs):
        split = split_graph(gm, *args, **kwargs)
        encoder_pieces.update((id(split.module), piece.name) for piece in split.captured
                              if holds(piece.module, tower))
        return split

    graphs = collections.Counter()  # (encoder piece?, "captures" / "replays")

    def recorded_call(piece, *args):
        stats = piece.runner.stats
        captures, replays = stats.captures, stats.replays
        out = call(piece, *args)
        encoder = (id(piece.runner.module), piece.name) in encoder_pieces
        graphs[encoder, "captures"] += stats.captures - captures
        graphs[encoder, "replays"] += stats.replays - replays
        return out

    monkeypatch.setattr(gemma4_fx.backend, "split_graph", recorded_split)
    monkeypatch.setattr(CapturedPiece, "__call__", recorded_call)
    model = gemma4_fx.build_model(preset, multimodal=True, device="cuda")
    compiled = torch.compile(model, backend=gemma4_fx.Gemma4Backend())
    sizes, counts = [], []
    for seed, request in enumerate(requests):
        input_ids, inputs = model_inputs(model, seed=seed, device="cuda", **request)
        # one graph for all: the prompt's length and the clips' frames sized symbolically from the first request
        torch._dynamo.mark_dynamic(input_ids, 1)
        for name in ("input_features", "input_features_mask"):
            if name in inputs:
                torch._dynamo.mark_dynamic(inputs[name], 1)
        logits, expected = run(model, None, input_ids, inputs, compiled)
        assert_close(logits, expected)
        sizes.append(tuple(inputs["pixel_values" if tower == "vision_tower" else "input_features"].shape))
        counts.append((graphs[True, "captures"], graphs[True, "replays"]))
    assert graphs[False, "replays"] == 0, graphs  # the language model's pieces: every prompt's length was new
    assert counts == encoder_graphs(sizes, pieces=counts[1][0]), (sizes, counts)


def test_float_inputs_are_captured_as_guarded_constants():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 16, device="cuda")

        def forward(self, x, scale: float):  # under dynamic=True Dynamo passes it as a 0-d CPU tensor
            return torch.relu(self.linear(x) * scale)

    module = Scaled()
    backend = gemma4_fx.Gemma4Backend(cudagraphs="piecewise")
    compiled = torch.compile(module, backend=backend, dynamic=True)
    x = torch.randn(4, 16, device="cuda")
    with torch.no_grad():
        for scale in (0.5, 0.5, 0.5, 2.0, 2.0, 2.0):
            torch.testing.assert_close(compiled(x, scale), module(x, scale))
    stats = backend.cudagraph_stats
    assert (stats.captures, stats.replays) == (2, 4) and not stats.failures  # per value: run, capture, replay
    assert list(backend.graph_reports) == ["graph_0", "graph_1"]  # a new value recompiles, as Dynamo guards it


@pytest.mark.parametrize("mode", ["auto", "piecewise"])
def test_decode_replays_equal_eager_and_write_the_cache(model, mode):
    ids = token_ids(model, 3, 7, seed=0)
    backend = gemma4_fx.Gemma4Backend(cudagraphs=mode)
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # fresh caches, as HF generate makes per call: the graphs that read the old ones go
        caches = [StaticCache(config=model.config, max_cache_len=32) for _ in range(2)]
        with torch.no_grad():
            for cache in caches:
                model(ids, **cache_kwargs(model, cache), use_cache=True)
            token = ids[:, -1:]
            for position in range(7, 13):
                kwargs = dict(use_cache=True, cache_position=torch.tensor([position], device="cuda"))
                expected = model(token, **cache_kwargs(model, caches[0]), **kwargs).logits
                logits = compiled(token, **cache_kwargs(model, caches[1]), **kwargs).logits
                assert_close(logits, expected)
                token = expected.argmax(-1)
        for layer, expected in zip(caches[1].layers, caches[0].layers):  # the graphs wrote the real cache
            assert_close(layer.keys, expected.keys)
            assert_close(layer.values, expected.values)
    stats = backend.cudagraph_stats  # HF's sliding cache moves an int input every step: still captured, once
    assert 0 < stats.graphs < stats.captures and stats.replays > 0 and not stats.failures


def test_prefill_lengths_share_the_pool():
    """Captured pieces hold their outputs unowned (`cudagraphs.PieceGraph`): a length's pool is its peak of live
    tensors, and shorter lengths reuse the longest one's memory instead of adding their own."""
    model = gemma4_fx.build_model("e2b", num_hidden_layers=4, dtype=torch.bfloat16, device="cuda")
    backend = gemma4_fx.Gemma4Backend(cudagraphs="piecewise")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    first, pools = {}, []
    with torch.no_grad():
        for length in (2048, 512, 1024, 2048, 512):  # run, capture, replay; then again after the others
            ids = token_ids(model, 1, length, seed=length)
            for _ in range(3):
                logits = compiled(ids, logits_to_keep=1, use_cache=False).logits
                torch.testing.assert_close(logits, first.setdefault(length, logits), rtol=0, atol=0)
            pools.append(backend.cudagraph_runtime.pool_bytes())
    assert pools[0] > 0 and max(pools) <= 1.25 * pools[0], [p / 2**20 for p in pools]
    assert not backend.cudagraph_stats.failures


def test_memory_is_bounded_across_random_shapes(model):
    backend = gemma4_fx.Gemma4Backend(cudagraphs="piecewise", max_captured_shapes=4)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    inputs = [token_ids(model, 2, length, seed=length) for length in (3, 6, 10, 17)]
    rng = random.Random(0)
    memory = []
    with torch.no_grad():
        for call in range(1000):
            compiled(rng.choice(inputs), use_cache=False)
            if call in (199, 999):
                torch.cuda.synchronize()
                memory.append((torch.cuda.memory_allocated(), backend.cudagraph_stats.pool_bytes))
    (allocated_200, pool_200), (allocated_1000, pool_1000) = memory
    assert allocated_1000 <= allocated_200 + (1 << 20)
    assert pool_1000 == pool_200
    stats = backend.cudagraph_stats
    assert stats.evicted_shapes == 0 and stats.graphs == stats.captures == 4 * 8  # 8 captured pieces per shape


def test_generate_gives_eagers_tokens(model):
    ids = token_ids(model, 2, 9, seed=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, disable_compile=True, **kwargs)
    backend = gemma4_fx.Gemma4Backend(cudagraphs="auto")
    out = model.generate(ids, compile_config=CompileConfig(backend=backend), **kwargs)  # mode="reduce-overhead"
    assert torch.equal(out, expected)
    stats = backend.cudagraph_stats
    assert stats.replays > 0 and not stats.failures


def test_generate_survives_batch_size_and_backend_changes():
    """HF generate through the backend at batch 1, under `mode="reduce-overhead"`, then through the backend at
    batch 16 and 3, in one process with fresh static caches and a Dynamo reset between: every capture succeeds and
    the tokens are eager's. (The graphs of the first run die with the reset while memory of their pool lives on;
    capturing into that pool again failed an allocator assert.)"""
    model = gemma4_fx.build_model("tiny-26b-a4b", dtype=torch.float32, device="cuda")
    backend = gemma4_fx.Gemma4Backend()
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    for batch, config in [(1, CompileConfig(backend=backend)), (1, CompileConfig()),
                          (16, CompileConfig(backend=backend)), (3, CompileConfig(backend=backend))]:
        torch._dynamo.reset()
        model.__dict__.pop("_compiled_call", None)
        ids = token_ids(model, batch, 12, seed=batch)
        expected = model.generate(ids, disable_compile=True, **kwargs)
        assert torch.equal(model.generate(ids, compile_config=config, **kwargs), expected), (batch, config.backend)
    stats = backend.cudagraph_stats
    assert stats.captures > 0 and stats.replays > 0 and not stats.failures, str(stats)
