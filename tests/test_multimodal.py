"""Multimodal Gemma-4 (`Gemma4ForConditionalGeneration`, images and audio) through the backend.

The whole model compiles into one Dynamo graph under `capture_data_dependent_ops`, so the language model's
rewrites fire as in the text-only model, layer for layer, and YOCO still runs the KV-shared layers on the kept
rows. Each test compares logits (fp32) or greedy tokens against eager on the same model.

transformers' image processor needs torchvision or PIL, which the tests do without: `multimodal.image_inputs` lays
images out as it does. Audio goes through transformers' own `Gemma4AudioFeatureExtractor` (numpy only).
"""

import pytest
import torch
from transformers.utils.import_utils import torch_compilable_check

import gemma4_fx
from gemma4_fx import Gemma4Backend, build_model
import gemma4_fx.runtime.cudagraphs as cudagraphs
from gemma4_fx.multimodal import AUDIO_BUCKET_SAMPLES, audio_inputs, image_inputs, prompt
from gemma4_fx.runtime.cudagraphs import CUDAGraphRuntime
from helpers import YocoOnly, attention_query_rows, fake_capture, runner_backend

TOLERANCE = 2e-5  # of max |logits|, fp32


def assert_close(out, expected):
    error = (out.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= TOLERANCE * scale, f"max |out - expected| = {error:.3g}, max |expected| = {scale:.3g}"


def language_model_matches(report):
    """{(pattern, layer): count} of the language model's layers; locations as in `Gemma4ForCausalLM`."""
    counts = {}
    for match in report.matches:
        location = match.location.replace("model.language_model.", "model.")
        if location.startswith("model.layers."):
            key = (match.pattern, ".".join(location.split(".")[:3]))
            counts[key] = counts.get(key, 0) + 1
    return counts


def model_inputs(model, images=(), audio=(), seed=0, words=6, device="cpu"):
    """(input_ids, the encoders' inputs) of a prompt with `images` (sizes) and `audio` clips (seconds) between
    `words` random words, on `device`."""
    inputs, image_tokens, audio_tokens = {}, [], []
    generator = torch.Generator().manual_seed(seed)
    if images:
        pixel_values, positions, image_tokens = image_inputs(model.config.vision_config, images, generator=generator,
                                                             device=device)
        inputs.update(pixel_values=pixel_values, image_position_ids=positions)
    if audio:
        features, mask, audio_tokens = audio_inputs(model, audio, seed=seed, device=device)
        inputs.update(input_features=features, input_features_mask=mask)
    return prompt(model.config, words, image_tokens, audio_tokens, generator=generator).to(device), inputs


def holds(piece: torch.fx.GraphModule, module: str) -> bool:
    """Whether any node of `piece` comes from a module whose path contains `module` (e.g. "audio_tower")."""
    return any(module in str(node.meta.get("nn_module_stack")) for node in piece.graph.nodes)


def as_text(model, input_ids):
    """A text-only prompt as long as `input_ids`: the special ids (at the top of the tiny vocabulary) made words."""
    return input_ids.clamp(max=model.config.boi_token_id - 1)


def run(model, backend, input_ids, inputs, compiled=None):
    """(compiled logits, eager logits) of a prefill that keeps the last row, as generate's does."""
    compiled = torch.compile(model, backend=backend) if compiled is None else compiled
    with torch.no_grad(), gemma4_fx.capture_data_dependent_ops():
        logits = compiled(input_ids, **inputs, logits_to_keep=1, use_cache=False).logits
        expected = model(input_ids, **inputs, logits_to_keep=1, use_cache=False).logits
    return logits, expected


def test_whole_model_is_one_graph_with_the_text_models_rewrites():
    """Two images of different sizes and a clip through Inductor with every rewrite: one graph, the language model's
    matches layer for layer those of the text-only model on a prompt as long, YOCO included."""
    model, backend = build_model("tiny-e2b", multimodal=True), Gemma4Backend()
    input_ids, inputs = model_inputs(model, images=[(48, 72), (36, 24)], audio=[0.6])
    assert_close(*run(model, backend, input_ids, inputs))
    report = backend.report
    assert report.graphs == ["graph_0"] and not report.fallbacks, report
    text_model, text_backend = build_model("tiny-e2b"), Gemma4Backend()
    run(text_model, text_backend, as_text(model, input_ids), {})
    assert language_model_matches(report) == language_model_matches(text_backend.report), report
    assert report.counts["yoco"] >= 1, report
    # The encoders' layers are Gemma norm chains too: rewritten, within the logits' tolerance above; the vision
    # encoder's layers share its rotary tables, stored once. Its attention (a padding mask, head dim 16) is ours.
    encoders = {(m.pattern, m.location.split(".layers.")[0]) for m in report.matches
                if ".language_model." not in m.location}
    assert encoders == {("post_attn_norm", "model.vision_tower.encoder"), ("post_attn_norm", "model.audio_tower"),
                        ("rotary_table", "model.vision_tower.encoder.rotary_emb"),
                        ("prefill_attention", "model.vision_tower.encoder")}
    assert not any(s.pattern == "prefill_attention" and "vision_tower" in s.location for s in report.skipped), report


def test_text_only_prompt_runs_no_encoder(monkeypatch):
    """A text prompt to the multimodal class compiles the language model alone: the text model's rewrites, layer for
    layer, and no encoder is traced or run."""
    model, backend = build_model("tiny-e2b", multimodal=True), Gemma4Backend()
    calls = []
    for tower in (model.model.vision_tower, model.model.audio_tower):
        monkeypatch.setattr(tower, "forward", lambda *args, **kwargs: calls.append(args))
    input_ids, _ = model_inputs(model)
    assert_close(*run(model, backend, input_ids, {}))
    assert not calls
    text_backend = Gemma4Backend()
    run(build_model("tiny-e2b"), text_backend, input_ids, {})
    assert language_model_matches(backend.report) == language_model_matches(text_backend.report)
    assert all(".language_model." in m.location for m in backend.report.matches), backend.report


CASES = {
    "one-image": ("tiny-e4b", dict(images=[(36, 60)])),
    "two-images": ("tiny-e2b", dict(images=[(48, 72), (36, 24)])),
    "audio": ("tiny-e2b", dict(audio=[1.0, 0.4])),
    "text-only": ("tiny-e4b", dict()),
    "image-moe": ("tiny-26b-a4b", dict(images=[(24, 48)])),
}


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES)
def test_kv_shared_layers_run_on_the_kept_rows(case):
    """YOCO alone (its graph run eagerly): the multimodal prefill is cut where the text-only model's is, and the
    KV-shared layers' attention sees only the kept row."""
    preset, media = CASES[case]
    model, backend = build_model(preset, multimodal=True), YocoOnly()
    input_ids, inputs = model_inputs(model, **media)
    assert_close(*run(model, backend, input_ids, inputs))
    text_backend = YocoOnly()
    run(build_model(preset), text_backend, as_text(model, input_ids), {})
    assert len(backend.graphs) == 1
    assert [m.location for m in backend.report.matches] == \
        [m.location.replace("model.", "model.language_model.", 1) for m in text_backend.report.matches]
    assert backend.report.counts["yoco"] >= 1, backend.report
    shared = model.config.text_config.num_kv_shared_layers
    rows = attention_query_rows(backend.graphs[0])
    lm_rows = rows[-model.config.text_config.num_hidden_layers:]  # the encoders' attention comes first
    assert lm_rows[len(lm_rows) - shared:] == [1] * shared, rows


@pytest.mark.compat
def test_without_capture_the_break_costs_yoco():
    """What `capture_data_dependent_ops` is for: Dynamo breaks the graph at the encoders' data-dependent ops, the
    language model's hidden states leave its graph whole, and the kept rows are selected in the next graph."""
    model, backend = build_model("tiny-31b", multimodal=True), YocoOnly()
    input_ids, inputs = model_inputs(model, images=[(36, 24)])
    keep = torch.tensor([input_ids.shape[1] - 1])  # transformers >= 5.2x slices itself for an integer
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(input_ids, **inputs, logits_to_keep=keep, use_cache=False)
        expected = model(input_ids, **inputs, logits_to_keep=keep, use_cache=False).logits
    assert_close(logits.logits, expected)
    assert len(backend.graphs) > 1 and backend.report.counts["yoco"] == 0
    assert len(backend.report.skipped) == 1
    assert backend.report.skipped[0].reason.startswith("kept rows are selected from a graph input")


@pytest.mark.compat
def test_greedy_generate_matches_eager():
    """Prefill (two images of different sizes and an audio clip) and decode steps compiled; the prefill is cut."""
    model, backend = build_model("tiny-e2b", multimodal=True), YocoOnly()
    input_ids, inputs = model_inputs(model, images=[(48, 72), (36, 24)], audio=[0.9], seed=1)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    expected = model.generate(input_ids, **inputs, **kwargs)
    model.forward = torch.compile(model.forward, backend=backend)  # prefill too: generate compiles decode only
    with gemma4_fx.capture_data_dependent_ops():
        tokens = model.generate(input_ids, **inputs, **kwargs)
    assert torch.equal(tokens, expected)
    assert backend.report.counts["yoco"] >= 1 and {m.graph for m in backend.report.matches} == {"graph_0"}


def test_our_generate_with_images_and_audio_gives_hf_generates_tokens():
    """`gemma4_fx.generate` from a prompt with images of two sizes and an audio clip (E2B), and from one with an image
    (31B, whose vision pooler splits by a data-dependent size): HF generate's greedy tokens. Its prefill takes the
    encoders' inputs as one graph (YOCO cuts it), the decode steps the text tokens."""
    backend = YocoOnly()
    for preset, images, audio in (("tiny-e2b", [(48, 72), (36, 24)], [1.3]), ("tiny-31b", [(36, 24)], [])):
        model = build_model(preset, multimodal=True)
        input_ids, inputs = model_inputs(model, images=images, audio=audio, seed=2)
        expected = model.generate(input_ids, **inputs, max_new_tokens=5, do_sample=False,
                                  cache_implementation="static", disable_compile=True)
        tokens = gemma4_fx.generate(model, input_ids, **inputs, max_new_tokens=5, backend=backend)
        assert torch.equal(tokens, expected)
    cut = {match.graph for match in backend.report.matches if match.location.startswith("model.language_model.")}
    assert len(cut) == 2  # each prompt's prefill
    assert not [skip for skip in backend.report.skipped if skip.reason.startswith("kept rows are selected")]


def test_our_generate_takes_a_left_padded_batch_of_image_prompts():
    """Two prompts of different lengths, an image each (of two sizes), left-padded: HF generate's greedy tokens."""
    model = build_model("tiny-e2b", multimodal=True)
    generator = torch.Generator().manual_seed(4)
    pixel_values, positions, soft_tokens = image_inputs(model.config.vision_config, [(48, 72), (24, 24)],
                                                        generator=generator)
    rows = [prompt(model.config, words, [count], generator=generator)[0]
            for words, count in zip((5, 2), soft_tokens)]
    width, pad = max(len(row) for row in rows), model.generation_config.pad_token_id
    input_ids = torch.stack([torch.cat([row.new_full((width - len(row),), pad), row]) for row in rows])
    mask = torch.stack([(torch.arange(width) >= width - len(row)).long() for row in rows])
    inputs = dict(pixel_values=pixel_values, image_position_ids=positions)
    expected = model.generate(input_ids, attention_mask=mask, **inputs, max_new_tokens=4, do_sample=False,
                              cache_implementation="static", disable_compile=True)
    tokens = gemma4_fx.generate(model, input_ids, mask, **inputs, max_new_tokens=4, backend="eager")
    assert mask[1, 0] == 0 and torch.equal(tokens, expected)


def test_piecewise_generate_with_images_compiles_every_piece_with_the_passes():
    """HF generate with two images, prefill and decode through the backend's CUDA-graph split (on CPU nothing is
    captured; the pieces run plainly): every piece compiles with the passes, and the tokens are eager's. (Run on
    fake inputs before its compile, a captured piece made unbacked symbols that nothing bound, and its compile
    failed over to plain Inductor.)"""
    model = build_model("tiny-e2b", multimodal=True)
    input_ids, inputs = model_inputs(model, images=[(48, 72), (36, 24)], seed=1)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    expected = model.generate(input_ids, **inputs, **kwargs)
    backend = Gemma4Backend(cudagraphs="piecewise")
    model.forward = torch.compile(model.forward, backend=backend)
    with gemma4_fx.capture_data_dependent_ops():
        tokens = model.generate(input_ids, **inputs, **kwargs)
    assert torch.equal(tokens, expected)
    assert not backend.report.fallbacks, backend.report.fallbacks
    assert backend.report.counts["yoco"] >= 1 and backend.report.counts["post_attn_norm"] >= 1


def test_image_sizes_and_counts_eager_accepts_run():
    """One compiled model: sizes and counts of images change between calls (sizes are data, the count a shape);
    every call matches eager, and a prompt whose placeholders do not match the images fails as eager fails."""
    model, backend = build_model("tiny-31b", multimodal=True), YocoOnly()
    compiled = torch.compile(model, backend=backend)
    for seed, images in enumerate([[(36, 24)], [(48, 72), (24, 36)], [(12, 204), (36, 36), (24, 12)]]):
        input_ids, inputs = model_inputs(model, images=images, seed=seed)
        assert_close(*run(model, backend, input_ids, inputs, compiled))
    input_ids, inputs = model_inputs(model, images=[(36, 24)])
    input_ids = input_ids[:, input_ids[0] != model.config.image_token_id]  # no placeholders
    with torch.no_grad(), pytest.raises(Exception):
        model(input_ids, **inputs, use_cache=False)
    with torch.no_grad(), gemma4_fx.capture_data_dependent_ops(), pytest.raises(Exception):
        compiled(input_ids, **inputs, use_cache=False)


@pytest.mark.parametrize("torch_version", ["installed", "2.11.0"])
def test_formatting_a_data_dependent_size_keeps_one_graph(monkeypatch, torch_version):
    """`Gemma4Model.forward` formats the image features' count, an unbacked size, into a check's message: under the
    context that costs no graph break, on this torch and with the placeholder torch < 2.13 gets; formatting outside
    compiled code is untouched."""
    def select(x, mask):
        selected = x[mask]
        doubled = selected * 2
        # As the model checks: a message formatting an unbacked size.
        torch_compilable_check(doubled.numel() == selected.numel(), f"selected {selected.shape[0]} rows")
        return doubled

    if torch_version != "installed":
        monkeypatch.setattr(torch, "__version__", torch_version)
    backend = YocoOnly()
    x, mask = torch.randn(6), torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    with gemma4_fx.capture_data_dependent_ops():
        assert torch.equal(torch.compile(select, backend=backend)(x, mask), x[mask] * 2)
        assert f"{x[mask].shape[0]} rows" == "4 rows"
    assert len(backend.graphs) == 1


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b"])
def test_multimodal_presets(preset):
    model = build_model(preset, multimodal=True)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert (model.config.audio_config is not None) == preset.endswith("e2b")
    assert model.config.image_token_id < model.config.text_config.vocab_size
    assert model.model.language_model.config.num_kv_shared_layers == build_model(preset).config.num_kv_shared_layers
    with pytest.raises(ValueError, match="preset"):
        build_model("tiny-nope", multimodal=True)
    with pytest.raises(ValueError, match="sizes"):
        image_inputs(model.config.vision_config, [(36, 13)])
    shallow = build_model(preset, multimodal=True, encoder_overrides={"vision": {"num_hidden_layers": 1}})
    assert len(shallow.model.vision_tower.encoder.layers) == 1
    assert len(model.model.vision_tower.encoder.layers) == 2  # the preset itself is left as it was
    with pytest.raises(ValueError, match="encoder_overrides"):
        build_model("tiny-31b", multimodal=True, encoder_overrides={"audio": {"num_hidden_layers": 1}})


def test_piecewise_pieces_take_data_dependent_sizes(monkeypatch):
    """The backend's CUDA-graph split of a multimodal prefill: the encoders' data-dependent ops run between the
    pieces, and the sizes they make reach later pieces unbacked. Every piece compiles with the passes (no fallback),
    and the runner (capture simulated on CPU) replays its pieces across image counts and sizes with eager's logits."""
    model = build_model("tiny-31b", multimodal=True)
    input_ids, inputs = model_inputs(model, images=[(48, 72), (36, 24)])
    backend = Gemma4Backend(cudagraphs="piecewise")
    assert_close(*run(model, backend, input_ids, inputs))
    assert not backend.report.fallbacks and backend.report.counts["yoco"] >= 1, backend.report

    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)
    runtime = CUDAGraphRuntime(max_shapes=8)
    compiled = torch.compile(model, backend=runner_backend(runtime))
    for seed, images in enumerate([[(36, 24)], [(36, 24)], [(36, 24)], [(48, 72), (24, 36)], [(48, 72), (24, 36)],
                                   [(48, 72), (24, 36)], [(24, 36)]]):
        input_ids, inputs = model_inputs(model, images=images, seed=seed)
        assert_close(*run(model, None, input_ids, inputs, compiled))
    assert runtime.stats.replays > 0 and not runtime.stats.failures, runtime.stats


ENCODER_REQUESTS = {
    # Two images (padded to one patch budget) in prompts of new lengths.
    "vision_tower": ("tiny-31b", [dict(images=[(36, 24), (24, 36)], words=words) for words in (6, 9, 13, 17)]),
    # Clips of new lengths, padded to a 2 s bucket, then a 4 s one; each prompt of a new length.
    "audio_tower": ("tiny-e2b", [dict(audio=[seconds], words=words) for seconds, words
                                 in ((0.3, 6), (0.6, 9), (1.2, 13), (1.9, 17), (2.5, 5), (3.1, 7), (3.9, 11))]),
}


@pytest.mark.parametrize("tower", ENCODER_REQUESTS)
def test_encoder_graphs_replay_for_prompts_of_any_length(monkeypatch, tower):
    """An encoder's pieces are sized by its inputs alone (images padded to a patch budget, clips to a length
    bucket): captured on the second request of a size and replayed for every one after it, whatever the prompt's
    length; the language model's are keyed on the prompt, new each time."""
    preset, requests = ENCODER_REQUESTS[tower]
    captured = []

    def capture(fn, args, pool):
        captured.append(holds(fn, tower))
        return fake_capture(fn, args, pool)

    monkeypatch.setattr(cudagraphs, "_capture", capture)
    model = build_model(preset, multimodal=True)
    runtime = CUDAGraphRuntime(max_shapes=8)
    compiled = torch.compile(model, backend=runner_backend(runtime), dynamic=True)
    sizes, counts = [], []
    for seed, request in enumerate(requests):
        input_ids, inputs = model_inputs(model, seed=seed, **request)
        assert_close(*run(model, None, input_ids, inputs, compiled))
        sizes.append(tuple(inputs["pixel_values" if tower == "vision_tower" else "input_features"].shape))
        counts.append((runtime.stats.captures, runtime.stats.replays))
    assert all(captured) and captured, captured  # no language-model piece: every prompt's length was new
    assert len(set(sizes)) > 1 or tower == "vision_tower", sizes
    assert counts == encoder_graphs(sizes, pieces=counts[1][0]), (sizes, counts)


def encoder_graphs(sizes, pieces):
    """The cumulative (captures, replays) after each request whose encoder input has these `sizes`, for an encoder of
    `pieces` captured pieces: captured on a size's second request, replayed on it and on every later one."""
    assert pieces > 0, "no encoder piece was captured on the second request"
    expected, seen = [], {}
    for size in sizes:
        seen[size] = seen.get(size, 0) + 1
        previous = expected[-1] if expected else (0, 0)
        expected.append((previous[0] + pieces * (seen[size] == 2), previous[1] + pieces * (seen[size] >= 2)))
    return expected


def test_compiles_stop_after_warm_up():
    """Requests of 0 to 4 images of mixed sizes: Dynamo specialises on a few image counts, then makes the count
    dynamic (sizes are data); after that, no request compiles again."""
    model, backend = build_model("tiny-31b", multimodal=True), YocoOnly()
    compiled = torch.compile(model, backend=backend)
    generator = torch.Generator().manual_seed(0)
    sizes = [(36, 24), (48, 72), (24, 36), (12, 204), (36, 36), (24, 12)]
    graphs = []
    for seed in range(24):
        count = int(torch.randint(0, 5, (), generator=generator))
        images = [sizes[int(i)] for i in torch.randint(0, len(sizes), (count,), generator=generator)]
        input_ids, inputs = model_inputs(model, images=images, seed=seed)
        assert_close(*run(model, backend, input_ids, inputs, compiled))
        graphs.append(len(backend.graphs))
    assert graphs[-12:] == [graphs[-1]] * 12 and graphs[-1] <= 8, graphs


def test_audio_padded_to_a_bucket_keeps_the_logits():
    """Padding a clip to `AUDIO_BUCKET_SAMPLES` (masked) leaves its soft tokens and the logits as they were."""
    model = build_model("tiny-e2b", multimodal=True)
    frames, logits = [], []
    for bucket in (None, AUDIO_BUCKET_SAMPLES):
        features, mask, tokens = audio_inputs(model, [0.7], bucket=bucket)
        input_ids = prompt(model.config, 6, (), tokens, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits.append(model(input_ids, input_features=features, input_features_mask=mask).logits)
        frames.append(features.shape[1])
    assert frames[1] > frames[0], frames
    assert_close(logits[1], logits[0])
