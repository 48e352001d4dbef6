"""The YOCO pass: KV-shared layers (and the last layer's tail) run on the kept rows only, with the same results.

Most tests run the rewritten Dynamo graph eagerly (a backend that applies `yoco` and returns the graph): that
isolates the pass and takes seconds. Each compares the kept rows against the whole computation (eager, every
row) on fresh random inputs, checks that the rewrite happened (match counts, and the query rows the attention
ops really see), and checks what is left alone.
"""

import warnings

import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from transformers.models.gemma4 import modeling_gemma4

import gemma4_fx
from gemma4_fx import Gemma4Backend, build_model
from gemma4_fx.passes import yoco
from helpers import YocoOnly, attention_query_rows

# transformers >= 5.2x drops rows before the KV-shared layers itself for integer `logits_to_keep` (and crashes
# there without PLE); a tensor `logits_to_keep` keeps it from doing so.
MODEL_SLICES_ITSELF = hasattr(modeling_gemma4.Gemma4TextModel, "_maybe_slice_kv_shared_inputs")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # of max |logits|

KV_SHARED = {
    # 7 layers (3 sliding : 1 full), the last 3 KV-shared, PLE, double-wide MLP in the shared layers
    "e2b": ("tiny-e2b", {}),
    # 6 layers (2 sliding : 1 full), the last 2 KV-shared, PLE
    "e4b": ("tiny-e4b", {}),
    "e2b-no-ple": ("tiny-e2b", dict(hidden_size_per_layer_input=0)),
    "e4b-all-sliding-shared": ("tiny-e4b", dict(num_hidden_layers=8, num_kv_shared_layers=2,
                                                layer_types=["sliding_attention"] * 5 + ["full_attention"]
                                                + ["sliding_attention"] * 2)),
    # MoE beside the MLP: the sorted expert dispatch mixes tokens, so only the last layer's tail is cut
    "moe": ("tiny-26b-a4b", dict(num_hidden_layers=6, num_kv_shared_layers=2)),
}


def random_ids(model, shape, seed):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def assert_close(out, expected, dtype):
    error = (out.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max |out - expected| = {error:.3g}, max |expected| = {scale:.3g}"


def expected_truncation(model, keep_is_int: bool):
    """(attention ops truncated, whether the model drops the rows itself): the KV-shared layers and the layer before
    them, whose queries need only the kept rows once its keys and values are computed."""
    shared = model.config.num_kv_shared_layers
    if MODEL_SLICES_ITSELF and keep_is_int:
        return 1, True
    return shared + 1, False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", KV_SHARED)
def test_kept_rows_match_the_whole_computation(name, dtype):
    preset, overrides = KV_SHARED[name]
    model = build_model(preset, dtype=dtype, **overrides)
    ple = bool(model.config.hidden_size_per_layer_input)
    batch, length = 2, 11
    # generate's integer logits_to_keep where the model runs it, else the equivalent index tensor
    keep = 1 if ple or not MODEL_SLICES_ITSELF else torch.tensor([length - 1])
    everything = torch.arange(length)
    backend = YocoOnly()
    compiled = torch.compile(model, backend=backend)
    for seed in range(2):
        input_ids = random_ids(model, (batch, length), seed)
        with torch.no_grad():
            logits = compiled(input_ids, logits_to_keep=keep, use_cache=False).logits
            expected = model(input_ids, logits_to_keep=everything, use_cache=False).logits[:, -1:]
        assert_close(logits, expected, dtype)
    assert len(backend.graphs) == 1
    truncated, already_sliced = expected_truncation(model, isinstance(keep, int))
    if name == "moe":
        truncated = 1
        assert backend.report.matches[0].location.startswith(f"model.layers.{model.config.num_hidden_layers - 1}.")
    else:
        rows = attention_query_rows(backend.graphs[0])
        assert rows.count(1) == truncated + already_sliced * model.config.num_kv_shared_layers
        assert rows.count(length) == model.config.num_hidden_layers - rows.count(1)
    assert backend.report.counts["yoco"] == truncated, backend.report
    reasons = {skip.reason for skip in backend.report.skipped}
    assert reasons == ({"already sliced by the model"} if already_sliced else set()), backend.report


@pytest.mark.compat
def test_generate_matches_eager():
    model, backend = build_model("tiny-e2b"), YocoOnly()
    input_ids = random_ids(model, (1, 9), seed=3)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    expected = model.generate(input_ids, **kwargs)
    model.forward = torch.compile(model.forward, backend=backend)  # prefill too: generate compiles decode only
    tokens = model.generate(input_ids, **kwargs)
    assert torch.equal(tokens, expected)
    truncated, _ = expected_truncation(model, keep_is_int=True)
    assert [match.graph for match in backend.report.matches] == ["graph_0"] * truncated, backend.report


def test_backend_composes_with_the_post_grad_patterns():
    """Through Inductor with every rewrite: the norm-chain and PLE-tail patterns still match on the truncated
    layers, and verify mode checks the result against the graph as Dynamo traced it."""
    model = build_model("tiny-e2b")
    backend = Gemma4Backend(verify=True, verify_action="raise")
    input_ids = random_ids(model, (2, 9), seed=4)
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(input_ids, logits_to_keep=1, use_cache=False).logits
        expected = model(input_ids, logits_to_keep=torch.arange(9), use_cache=False).logits[:, -1:]
    assert_close(logits, expected, torch.float32)
    report = backend.report
    assert report.counts["yoco"] == expected_truncation(model, keep_is_int=True)[0], report
    assert report.verify and all(result.ok for result in report.verify) and not report.fallbacks
    truncated_layers = {match.location.rsplit(".", 1)[0] for match in report.matches if match.pattern == "yoco"}
    for pattern in set(report.counts) & set(gemma4_fx.PATTERNS):  # post-grad patterns; attention: the passes'
        layers = {match.location for match in report.matches if match.pattern == pattern}
        if any(layer.startswith("model.layers.") for layer in layers):
            assert truncated_layers <= {".".join(layer.split(".")[:3]) for layer in layers}, (pattern, report)


def test_dynamic_sequence_length_and_decode():
    model, backend = build_model("tiny-e4b"), YocoOnly()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length in (9, 14, 1):  # one graph for both prompt lengths, then a decode-shaped one
        input_ids = random_ids(model, (2, length), seed=length)
        with torch.no_grad():
            logits = compiled(input_ids, logits_to_keep=1, use_cache=False).logits
            expected = model(input_ids, logits_to_keep=torch.arange(length), use_cache=False).logits[:, -1:]
        assert_close(logits, expected, torch.float32)
    prefill, decode = backend.graphs
    assert backend.report.counts["yoco"] == expected_truncation(model, keep_is_int=True)[0]
    assert isinstance(attention_query_rows(prefill)[0], torch.SymInt)
    assert set(attention_query_rows(decode)) == {1}
    assert not [m for m in backend.report.matches if m.graph == "graph_1"], "decode: nothing to cut"


def test_output_hidden_states_is_left_alone():
    """HF returns every layer's hidden states from one graph and selects the kept rows in the next (a graph break):
    neither graph may drop rows."""
    model, backend = build_model("tiny-e2b"), YocoOnly()
    input_ids = random_ids(model, (1, 8), seed=0)
    with torch.no_grad():
        outputs = torch.compile(model, backend=backend)(input_ids, logits_to_keep=1, use_cache=False,
                                                        output_hidden_states=True)
        expected = model(input_ids, logits_to_keep=1, use_cache=False, output_hidden_states=True)
    assert_close(outputs.logits, expected.logits, torch.float32)
    for hidden, expected_hidden in zip(outputs.hidden_states, expected.hidden_states, strict=True):
        assert_close(hidden, expected_hidden, torch.float32)
    assert backend.report.counts["yoco"] == 0
    assert backend.report.skipped, "the selection left alone, with its reason"
    assert {row for graph in backend.graphs for row in attention_query_rows(graph)} == {8}


class Tail(torch.nn.Module):
    """Two projections whose result also leaves the graph (`mode="output"`) or is written into a cache
    (`mode="cache"`); only the kept rows of its tanh are selected, so every row of the projections is needed."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.a, self.b = mode, torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.register_buffer("cache", torch.zeros(2, 6, 8))

    def forward(self, x):
        h = self.b(self.a(x))
        if self.mode == "cache":
            self.cache.index_copy_(1, torch.arange(6), h)
            return h.tanh()[:, -1:]
        return h.tanh()[:, -1:], h


@pytest.mark.parametrize("mode, reason", [("output", "full-sequence intermediate is a graph output"),
                                          ("cache", "cache write downstream")])
def test_rows_needed_whole_leave_the_graph_alone(mode, reason):
    torch.manual_seed(0)
    model, reference, backend = Tail(mode).eval(), Tail(mode).eval(), YocoOnly()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        outputs, expected = torch.compile(model, backend=backend)(x), reference(x)
    for out, ref in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(expected), strict=True):
        assert_close(out, ref, torch.float32)
    assert torch.equal(model.cache, reference.cache)
    assert backend.report.counts["yoco"] == 0
    assert [skip.reason for skip in backend.report.skipped] == [reason]


@pytest.mark.compat
def test_model_without_kv_sharing_loses_only_the_last_layers_tail():
    """No KV-shared layers: only the last layer's queries, output projection and MLP run on the kept rows."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      attn_implementation="sdpa")
    model, backend = transformers.LlamaForCausalLM(config).eval(), YocoOnly()
    input_ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(input_ids, logits_to_keep=1, use_cache=False).logits
        expected = model(input_ids, use_cache=False).logits[:, -1:]
    assert_close(logits, expected, torch.float32)
    assert [match.location for match in backend.report.matches] == ["model.layers.2.self_attn"]
    assert attention_query_rows(backend.graphs[0]) == [10, 10, 1]


class FlatTokens(torch.nn.Module):
    """An engine's layout: the tokens of all requests in one [tokens, hidden] batch, a block-diagonal causal mask,
    and the last token of each request gathered before the LM head. Layers from `first_shared` on reuse the keys
    and values of layer `first_shared - 1`."""

    def __init__(self, layers=5, first_shared=3, hidden=40, heads=2, head_dim=16, vocab=97, gather="index_select"):
        super().__init__()
        self.heads, self.head_dim, self.first_shared, self.gather = heads, head_dim, first_shared, gather
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.q = torch.nn.ModuleList(torch.nn.Linear(hidden, heads * head_dim, bias=False) for _ in range(layers))
        self.kv = torch.nn.ModuleList(torch.nn.Linear(hidden, 2 * head_dim, bias=False) for _ in range(first_shared))
        self.o = torch.nn.ModuleList(torch.nn.Linear(heads * head_dim, hidden, bias=False) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 3 * hidden), torch.nn.GELU(),
                                                           torch.nn.Linear(3 * hidden, hidden)) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("inv_freq", 1.0 / 1e4 ** (torch.arange(0, head_dim, 2) / head_dim))

    def rope(self, x, cos, sin):
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, ids, positions, mask, kept):
        tokens = ids.shape[0]
        hidden = self.embed(ids)
        angles = positions[:, None].float() * self.inv_freq
        cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
        for layer, (q_proj, o_proj, mlp) in enumerate(zip(self.q, self.o, self.mlp)):
            x = self.norm(hidden)
            q = self.rope(q_proj(x).view(tokens, self.heads, self.head_dim), cos, sin).transpose(0, 1)
            if layer < self.first_shared:
                k, v = self.kv[layer](x).view(tokens, 1, 2 * self.head_dim).chunk(2, dim=-1)
                k = self.rope(k, cos, sin).transpose(0, 1).expand(self.heads, tokens, self.head_dim)
                v = v.transpose(0, 1).expand(self.heads, tokens, self.head_dim)
            causal = mask is None
            attention = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                                                         is_causal=causal)
            hidden = hidden + o_proj(attention[0].transpose(0, 1).reshape(tokens, -1))
            hidden = hidden + mlp(self.norm(hidden))
        if self.gather == "index_select":
            hidden = hidden.index_select(0, kept)
        elif self.gather == "getitem":
            hidden = hidden[kept]
        else:
            hidden = hidden[-kept:]
        return self.head(self.norm(hidden))


def flat_batch(lengths, seed):
    """(ids, positions, block-diagonal causal mask, index of each request's last token) for requests of `lengths`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (sum(lengths),), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])
    request = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    order = torch.arange(len(ids))
    mask = (request[:, None] == request[None, :]) & (order[:, None] >= order[None, :])
    return ids, positions, mask, torch.tensor(lengths).cumsum(0) - 1


@pytest.mark.parametrize("gather", ["index_select", "getitem"])
def test_engine_flat_tokens_with_a_row_gather(gather):
    torch.manual_seed(0)
    model, backend = FlatTokens(gather=gather).eval(), YocoOnly()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    reference = FlatTokens(gather="none").eval()
    reference.load_state_dict(model.state_dict())
    for seed, lengths in enumerate([(5, 9, 3), (7, 2, 6, 4)]):
        ids, positions, mask, last = flat_batch(lengths, seed)
        with torch.no_grad():
            logits = compiled(ids, positions, mask, last)
            expected = reference(ids, positions, mask, 0)[last]  # every row, then the kept ones
        assert_close(logits, expected, torch.float32)
    assert len(backend.graphs) == 1
    assert backend.report.counts["yoco"] == len(model.q) - model.first_shared + 1
    rows = [str(r) for r in attention_query_rows(backend.graphs[0])]  # symbolic: tokens, kept rows
    whole, kept = rows[0], rows[-1]
    assert whole != kept
    assert rows == [whole] * (model.first_shared - 1) + [kept] * (len(model.q) - model.first_shared + 1)


@pytest.mark.parametrize("kept", [1, 3])
def test_causal_attention_gets_a_mask_of_the_kept_rows(kept):
    """`is_causal` lets query i see keys up to i: after the cut the kept queries need an explicit mask."""
    torch.manual_seed(0)
    model, backend = FlatTokens(gather="slice").eval(), YocoOnly()
    ids, positions, _, _ = flat_batch([12], seed=1)
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(ids, positions, None, kept)
        expected = model(ids, positions, None, 0)[-kept:]
    assert_close(logits, expected, torch.float32)
    assert backend.report.counts["yoco"] == len(model.q) - model.first_shared + 1
    assert attention_query_rows(backend.graphs[0]) == [12, 12] + [kept] * 3


def test_in_place_write_into_a_whole_tensor_stays_whole():
    """`g *= 3` writes into `h` (g aliases it) and `h` is read whole later: the write must stay on every row."""

    class WritesThrough(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.proj(x)
            g = h.float()  # h itself in fp32
            g *= 3
            return self.out(g)[:, -2:], h.sum(1)

    model, backend = WritesThrough().eval(), YocoOnly()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        out, total = torch.compile(model, backend=backend)(x)
        expected, expected_total = model(x)
    assert_close(out, expected, torch.float32)
    assert_close(total, expected_total, torch.float32)
    assert [match.location for match in backend.report.matches] == ["out"]  # the projection after the write


def test_backend_selects_yoco_by_name():
    assert Gemma4Backend(patterns=["yoco"]).passes.patterns == ()
    assert Gemma4Backend(patterns=["router"]).graph_passes == ()
    assert "yoco" in Gemma4Backend().graph_passes and "yoco" in gemma4_fx.GRAPH_PASSES
    with pytest.raises(ValueError, match="patterns"):
        Gemma4Backend(patterns=["yoco", "nope"])


def test_a_failing_pass_falls_back_to_the_traced_graph(monkeypatch):
    def broken(gm):
        raise RuntimeError("boom")

    monkeypatch.setattr(yoco, "truncate", broken)
    model, backend = FlatTokens(gather="index_select").eval(), Gemma4Backend(patterns=["yoco"])
    ids, positions, mask, last = flat_batch([4, 6], seed=0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = torch.compile(model, backend=backend)(ids, positions, mask, last)
    assert_close(logits, model(ids, positions, mask, last), torch.float32)
    assert any("yoco" in str(w.message) for w in caught)
    assert len(backend.report.fallbacks) == 1 and "boom" in backend.report.fallbacks[0]
    assert backend.report.counts["yoco"] == 0


def test_apply_names_a_bad_argument():
    with pytest.raises(TypeError, match="gm"):
        yoco.apply(torch.nn.Linear(2, 2))
