"""The CUDA graph runtime on CPU: where graphs are split, how pieces are rewired, and the capture bookkeeping
(warm-up, capture, replay, eviction, inputs copied or pinned, outputs the caller holds) with capture simulated.

CUDA itself is exercised in test_gpu_runtime.py.
"""

import gc
import logging
import operator
import weakref
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from transformers import StaticCache

import gemma4_fx
import gemma4_fx.runtime.cudagraphs as cudagraphs
from gemma4_fx import Gemma4Backend
from gemma4_fx.presets import cache_kwargs
from gemma4_fx.passes import yoco
from gemma4_fx.fx_utils import value as example_value
from gemma4_fx.report import Report
from gemma4_fx.runtime.cudagraphs import CUDAGraphRuntime, GraphPool, GraphRunner, mutated_inputs, shape_inputs
from gemma4_fx.replacements.launch import BETWEEN_GRAPHS
from gemma4_fx.runtime.split import bake_float_inputs, call_ops_directly, is_attention, is_decode_shaped, split_graph
from helpers import attention_query_rows, dynamo_graph, fake_capture, runner_backend

PRESET = "tiny-e2b"  # 7 layers
FP32 = dict(rtol=1e-4, atol=1e-4)  # compiled against eager: Inductor may reorder fp32 sums


@pytest.fixture(scope="module")
def models():
    return {impl: gemma4_fx.build_model(PRESET, attn_implementation=impl) for impl in ("sdpa", "eager")}


def attention_nodes(gm):
    return [node for node in gm.graph.nodes
            if node.target in (torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.softmax)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_split_at_attention_gives_the_same_results(models, impl):
    model = models[impl]
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    gm, inputs = dynamo_graph(model, ids, use_cache=False, dynamic=True)
    split = split_graph(gm)
    layers = model.config.num_hidden_layers
    assert len(split.pieces) == 2 * layers + 1
    assert [piece.captured for piece in split.pieces] == [index % 2 == 0 for index in range(2 * layers + 1)]
    for piece in split.pieces:  # each attention alone between two captured pieces
        assert len(attention_nodes(piece.module)) == (0 if piece.captured else 1)
        if impl == "eager" and not piece.captured:
            assert sum(node.target is torch.matmul for node in piece.module.graph.nodes) == 2
    assert [sorted(piece.escaping) for piece in split.captured] == [[]] * layers + [[0]]  # only the logits escape
    with torch.no_grad():
        torch.testing.assert_close(split.module(*inputs), gm(*inputs), rtol=0, atol=0)


def yoco_prefill_graph(model, dynamic: bool):
    """Dynamo's graph of HF's prefill (a DynamicCache, the last row kept) after YOCO, and its inputs."""
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    gm, inputs = dynamo_graph(model, ids, logits_to_keep=1, use_cache=True, dynamic=dynamic)
    return yoco.apply(gm, inputs, report=Report((yoco.NAME,)), graph_name="prefill"), inputs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_prefill_keeps_yocos_one_row_attention_in_the_graphs(monkeypatch, models, impl, dynamic):
    """After YOCO the KV-shared layers (and the layer before them) attend with one query row over keys the prompt's
    length: that adds no shape to capture, so only the layers with a whole prompt's queries are cut at attention.
    As HF's prefill calls it (a DynamicCache, the last row kept), and replayed from (simulated) graphs."""
    model = models[impl]
    gm, inputs = yoco_prefill_graph(model, dynamic)
    if impl == "sdpa":
        rows = attention_query_rows(gm)
        assert rows.count(1) == model.config.num_kv_shared_layers + 1 and len(rows) == model.config.num_hidden_layers
    split = split_graph(gm)
    whole = model.config.num_hidden_layers - model.config.num_kv_shared_layers - 1
    assert [piece.captured for piece in split.pieces] == [index % 2 == 0 for index in range(2 * whole + 1)]
    captured_attention = sum(len(attention_nodes(piece.module)) for piece in split.captured)
    assert captured_attention == model.config.num_kv_shared_layers + 1
    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)
    runtime = CUDAGraphRuntime(max_shapes=4)
    runner = GraphRunner(split, [piece.module for piece in split.captured], shape_inputs(gm), runtime, capture=True)
    with torch.no_grad():
        expected = gm(*inputs)
        for _ in range(3):  # run, capture, replay (simulated replays read copies of the inputs: fp32 reorders)
            pytree.tree_map(partial(torch.testing.assert_close, **FP32), runner(*inputs), expected)
    assert (runtime.stats.graphs, runtime.stats.replays) == (whole + 1, 2 * (whole + 1))


def test_listed_splitting_ops_run_between_graphs_even_with_one_row(models):
    """An op the caller lists in `splitting_ops` runs between graphs wherever it is, YOCO's one-row calls too."""
    model = models["sdpa"]
    gm, _ = yoco_prefill_graph(model, dynamic=True)
    split = split_graph(gm, extra_ops=(torch.nn.functional.scaled_dot_product_attention,))
    layers = model.config.num_hidden_layers
    assert [piece.captured for piece in split.pieces] == [index % 2 == 0 for index in range(2 * layers + 1)]


@pytest.mark.parametrize("op, attention", [("decode_attention", True), ("post_attn_norm", False),
                                            ("skinny_linear", False), ("router_select", False)])
def test_our_ops_split_at_decode_attention_only(op, attention):
    """Of gemma4_fx's ops only decode_attention is attention to the splitter (post_attn_norm has "attn" in its name:
    a norm, which belongs in the graphs)."""
    graph = torch.fx.Graph()
    node = graph.call_function(getattr(torch.ops.gemma4_fx, op).default, (graph.placeholder("x"),))
    assert is_attention(node) is attention


def test_attention_called_with_keywords_runs_between_graphs():
    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(query=q.sin(), key=k, value=v).cos()

    q, k, v = (torch.randn(1, 2, rows, 8) for rows in (1, 5, 5))
    gm, inputs = dynamo_graph(fn, q, k, v, dynamic=True)
    split = split_graph(gm)
    assert [piece.captured for piece in split.pieces] == [True, False, True]
    torch.testing.assert_close(split.module(*inputs), gm(*inputs), rtol=0, atol=0)


def test_full_split_keeps_attention_inside():
    model = gemma4_fx.build_model(PRESET)
    gm, inputs = dynamo_graph(model, torch.randint(3, 400, (1, 5)), use_cache=False, dynamic=True)
    split = split_graph(gm, split_attention=False)
    assert [piece.captured for piece in split.pieces] == [True]


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_data_dependent_ops_run_between_graphs():
    def fn(x):
        y = torch.sin(x) * 2
        rows = torch.nonzero(y[:, 0] > 0).squeeze(1)
        picked = y[rows].sum(0)  # shape from data
        return torch.cos(picked) + y.sum(0)

    x = torch.randn(9, 4)
    gm, inputs = dynamo_graph(fn, x, dynamic=True)
    split = split_graph(gm)
    captured = [piece.captured for piece in split.pieces]
    assert captured == [True, False, True]
    nonzero = [node for piece in split.pieces for node in piece.module.graph.nodes if node.target is torch.nonzero]
    assert nonzero and all(not piece.captured for piece in split.pieces if nonzero[0].graph is piece.module.graph)
    torch.testing.assert_close(split.module(*inputs), gm(*inputs))


def sync_nodes(gm):
    return [node for node in gm.graph.nodes
            if node.op in ("call_function", "call_method") and node.target in (torch.nonzero, "item")]


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
def test_host_syncs_on_what_the_inputs_give_run_first():
    """A mask's positions and a count computed cheaply from the inputs are read on the host before the costly work
    above them, not after it; the boolean index still gathers where it was, from its mask's positions."""
    def fn(x, ids, weight):
        h = torch.relu(x @ weight)
        picked = h[(ids > 2) & (ids < 9)]  # the mask from an input: its positions are read first
        count = (ids == 1).sum().item()  # and so is the count
        return picked.sum(0) * count, h.sum(0)

    gm, inputs = dynamo_graph(fn, torch.randn(9, 4), torch.randint(0, 12, (9,)), torch.randn(4, 4), dynamic=True)
    expected = gm(*inputs)
    split = split_graph(gm)
    syncs = [(index, node.target) for index, piece in enumerate(split.pieces) for node in sync_nodes(piece.module)]
    matmul = next(index for index, piece in enumerate(split.pieces)
                  if any(node.target is operator.matmul for node in piece.module.graph.nodes))
    assert sorted((str(target) for _, target in syncs)) == sorted(map(str, [torch.nonzero, "item"])), syncs
    assert {index for index, _ in syncs} == {1} and matmul == 2 and not split.pieces[1].captured, split.pieces
    index = next(node for piece in split.pieces for node in piece.module.graph.nodes if node.target is operator.getitem
                 and node.args[0].name == "h")
    assert not split.pieces[[p.module.graph for p in split.pieces].index(index.graph)].captured
    for out, want in zip(split.module(*inputs), expected):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def _costly(x, ids, weight):
    return x[(x @ weight)[:, 0] > 0].sum(0) + ids.sum()


def _written(x, ids, weight):
    ids.add_(1)
    return x[ids > 2].sum(0)


def _other_mode(x, ids, weight):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return (x @ weight)[x.sum(1) > ids.float()].sum(0)


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
@pytest.mark.parametrize("fn", [_costly, _written, _other_mode])
def test_host_syncs_stay_where_moving_them_would_change_or_cost(fn):
    """A sync whose mask needs a matmul, reads what the graph writes in place, or sits in an autocast region stays
    where it is: its boolean index keeps its mask."""
    gm, inputs = dynamo_graph(fn, torch.randn(9, 4), torch.randint(0, 12, (9,)), torch.randn(4, 4))
    before, after = [x.clone() for x in inputs], [x.clone() for x in inputs]
    expected, order = gm(*before), [node.format_node() for node in gm.graph.nodes]
    split = split_graph(gm)  # cuts the graph it rewrote in place
    assert [node.format_node() for node in gm.graph.nodes] == order
    assert not [node for piece in split.pieces for node in sync_nodes(piece.module)]
    torch.testing.assert_close(split.module(*after), expected)
    assert all(torch.equal(x, y) for x, y in zip(after, before))


def decode_graph(model, cache_len=16, tokens=1):
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    return dynamo_graph(model, ids[:, :tokens], **cache_kwargs(model, cache), use_cache=True,
                        cache_position=torch.arange(5, 5 + tokens), dynamic=False)[0]


def test_decode_steps_are_decode_shaped(models):
    model = models["sdpa"]
    assert is_decode_shaped(decode_graph(model).graph)
    assert not is_decode_shaped(decode_graph(model, tokens=3).graph)
    assert is_decode_shaped(decode_graph(models["eager"]).graph)


def test_mutated_cache_inputs_are_found(models):
    gm = decode_graph(models["sdpa"])
    split = split_graph(gm)
    names = [[node.name for node in piece.module.graph.find_nodes(op="placeholder")] for piece in split.captured]
    mutated = [{names[index][i] for i in mutated_inputs(piece.module)} for index, piece in enumerate(split.captured)]
    writing = models["sdpa"].config.num_hidden_layers - models["sdpa"].config.num_kv_shared_layers
    for found in mutated[:writing]:  # the piece before each attention writes that layer's cache
        assert any(name.endswith("_keys") for name in found) and any(name.endswith("_values") for name in found)
    assert not any(mutated[writing:])  # layers that share another layer's cache write none


def test_warm_up_capture_replay_and_held_outputs(monkeypatch, models):
    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)
    model, runtime = models["sdpa"], CUDAGraphRuntime(max_shapes=8)
    compiled = torch.compile(model, backend=runner_backend(runtime), dynamic=True)
    held, expected, counts = [], [], []
    with torch.no_grad():
        for seed, length in enumerate([5, 5, 5, 9, 9, 5, 9]):
            ids = torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
            held.append(compiled(ids, use_cache=False).logits)
            expected.append(model(ids, use_cache=False).logits)
            counts.append((runtime.stats.captures, runtime.stats.replays))
    pieces = model.config.num_hidden_layers + 1
    assert counts == [(0, 0), (pieces, pieces), (pieces, 2 * pieces), (pieces, 2 * pieces),
                      (2 * pieces, 3 * pieces), (2 * pieces, 4 * pieces), (2 * pieces, 5 * pieces)]
    assert runtime.stats.graphs == 2 * pieces
    for actual, reference in zip(held, expected):  # later replays did not overwrite what the caller holds
        torch.testing.assert_close(actual, reference, **FP32)


def test_captured_outputs_are_not_kept_alive(monkeypatch, models):
    """Each tensor a capture made is freed at its last use in the split graph (on a GPU its memory goes back to the
    pool for the pieces captured after): the runtime reads and returns them through unowned views."""
    made = []

    def capture(fn, args, pool):
        replay, outputs = fake_capture(fn, args, pool)
        made.extend(weakref.ref(out) for out in outputs if isinstance(out, torch.Tensor))
        return replay, outputs

    monkeypatch.setattr(cudagraphs, "_capture", capture)
    model, runtime = models["sdpa"], CUDAGraphRuntime(max_shapes=8)
    compiled = torch.compile(model, backend=runner_backend(runtime), dynamic=True)
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        for _ in range(4):  # warm-up, capture, replays
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, expected, **FP32)
    gc.collect()
    assert len(made) >= model.config.num_hidden_layers and not [ref for ref in made if ref() is not None]


def test_least_recently_used_shape_is_evicted(monkeypatch, models, caplog):
    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)
    model, runtime = models["sdpa"], CUDAGraphRuntime(max_shapes=2)
    compiled = torch.compile(model, backend=runner_backend(runtime), dynamic=True)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="gemma4_fx"):
        for length in [4, 4, 6, 6, 4, 8, 8, 6]:  # 8 evicts 6 (4 was used since); 6 then evicts 4
            ids = torch.randint(3, model.config.vocab_size, (1, length))
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       **FP32)
    pieces = model.config.num_hidden_layers + 1
    assert runtime.stats.evicted_shapes == 2
    assert runtime.stats.captures == 3 * pieces  # 4, 6, 8
    assert runtime.stats.graphs == pieces  # 8's; 6 came back after its eviction and ran its warm-up again
    warned = [r.getMessage() for r in caplog.records if "max_captured_shapes=2" in r.getMessage()]
    assert len(warned) == 1 and "pieces sized by s" in warned[0]  # once, naming the sizes (s0, ...) and the cap


@pytest.mark.compat
@pytest.mark.parametrize("split_attention", [True, False], ids=["piecewise", "full"])
def test_decode_steps_replay_and_write_the_static_cache(monkeypatch, models, split_attention):
    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)
    model, runtime = models["sdpa"], CUDAGraphRuntime(max_shapes=8)
    compiled = torch.compile(model, backend=runner_backend(runtime, split_attention=split_attention))
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache_kwargs(model, cache), use_cache=True)
        token = ids[:, -1:]
        for position in range(5, 13):  # the sliding layers fill up at 6: their fill level moves every step
            kwargs = dict(use_cache=True, cache_position=torch.tensor([position]))
            expected = model(token, **cache_kwargs(model, caches[0]), **kwargs).logits
            logits = compiled(token, **cache_kwargs(model, caches[1]), **kwargs).logits
            torch.testing.assert_close(logits, expected, **FP32)
            token = expected.argmax(-1)
    for layer, expected in zip(caches[1].layers, caches[0].layers):
        torch.testing.assert_close(layer.keys, expected.keys, **FP32)
        torch.testing.assert_close(layer.values, expected.values, **FP32)
    assert runtime.stats.replays > 0 and runtime.stats.graphs == runtime.stats.captures


def test_cache_is_written_in_place_and_captured_again_when_it_moves(monkeypatch):
    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)

    def step(cache, position, x):
        cache.index_copy_(0, position, torch.tanh(x))
        return cache.sum(0) * 2

    runtime = CUDAGraphRuntime(max_shapes=4)
    compiled = torch.compile(step, backend=runner_backend(runtime))
    caches = [torch.zeros(6, 3), torch.zeros(6, 3)]
    expected = torch.zeros(6, 3)
    for position in range(4):  # a fresh x (new address) each call: copied into the graph's buffer
        x = torch.randn(1, 3)
        out = compiled(caches[0], torch.tensor([position]), x)
        step(expected, torch.tensor([position]), x)
        torch.testing.assert_close(out, expected.sum(0) * 2)
        torch.testing.assert_close(caches[0], expected)
    assert (runtime.stats.captures, runtime.stats.graphs) == (1, 1)
    x = torch.randn(2, 1, 3)
    compiled(caches[1], torch.tensor([4]), x[0])  # another cache: the graph is dropped, this call runs plainly
    assert (runtime.stats.captures, runtime.stats.graphs) == (1, 0)
    compiled(caches[1], torch.tensor([5]), x[1])  # and the next one captures it again, on the new cache
    assert (runtime.stats.captures, runtime.stats.graphs) == (2, 1)
    torch.testing.assert_close(caches[0], expected)  # the first cache left alone
    torch.testing.assert_close(caches[1][4:], torch.tanh(x[:, 0]))


FLAKY = {"fail": False}


@torch.library.custom_op("gemma4_fx_test::flaky", mutates_args=())
def flaky(x: torch.Tensor) -> torch.Tensor:
    """Runs between graphs (a splitting op); raises when `FLAKY` says so, as user code between graphs may."""
    if FLAKY["fail"]:
        raise ValueError("flaky")
    return x * 3


@flaky.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_capture_call_that_raised_is_captured_again_in_order(monkeypatch):
    """Pieces the capture call did not reach are not captured by a later call, after the earlier ones' memory was
    handed back: that shape's graphs are dropped and all captured again on its next call."""
    monkeypatch.setattr(cudagraphs, "_capture", fake_capture)

    def fn(x):
        return torch.cos(flaky(torch.sin(x)))

    runtime = CUDAGraphRuntime(max_shapes=4)
    compiled = torch.compile(fn, backend=runner_backend(runtime, extra_ops=["gemma4_fx_test::flaky"]))
    x = torch.randn(5)
    counts = []
    for fail in [False, True, False, False, False]:
        FLAKY["fail"] = fail
        try:
            if fail:
                with pytest.raises(ValueError, match="flaky"):
                    compiled(x)
            else:
                torch.testing.assert_close(compiled(x), fn(x))
        finally:
            FLAKY["fail"] = False
        counts.append((runtime.stats.captures, runtime.stats.graphs))
    # call 2 captures sin and raises; 3 replays sin, finds cos uncaptured and drops the graphs; 4 captures both
    assert counts == [(0, 0), (1, 1), (1, 0), (3, 2), (3, 2)]


def test_pieces_are_keyed_on_the_inputs_that_size_them(monkeypatch):
    """A piece sized by `a` alone replays whatever `b`'s size; `b`'s pieces capture per size of `b`, into a pool of
    their own (the two domains' graphs interleave within a call)."""
    pools = []

    def capture(fn, args, pool):
        pools.append(pool)
        return fake_capture(fn, args, pool)

    monkeypatch.setattr(cudagraphs, "_capture", capture)

    def fn(a, b):
        x = flaky(torch.cos(a) * 2)
        y = flaky(torch.cos(b) + 1)
        return x, torch.tanh(y)

    runtime = CUDAGraphRuntime(max_shapes=4)
    compiled = torch.compile(fn, backend=runner_backend(runtime, extra_ops=["gemma4_fx_test::flaky"]), dynamic=True)
    a, counts = torch.randn(3), []
    for n in [5, 6, 7, 8, 5, 5]:
        b = torch.randn(n)
        torch.testing.assert_close(compiled(a, b), fn(a, b))
        counts.append((runtime.stats.captures, runtime.stats.replays))
    # a's piece: captured on the second call, replayed on every call after; b's two: on the second call with 5
    assert counts == [(0, 0), (1, 1), (1, 2), (1, 3), (3, 6), (3, 9)]
    assert pools[0] is not pools[1] and pools[1] is pools[2]


def test_failed_capture_warns_and_runs_without_graphs(monkeypatch, models):
    def failing(fn, args, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cudagraphs, "_capture", failing)
    model, runtime, report = models["sdpa"], CUDAGraphRuntime(max_shapes=8), gemma4_fx.Report()
    compiled = torch.compile(model, backend=runner_backend(runtime, report=report), dynamic=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    with torch.no_grad(), pytest.warns(UserWarning, match="capture failed"):
        for _ in range(3):
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       **FP32)
    assert len(runtime.stats.failures) == model.config.num_hidden_layers + 1  # each piece gave up once
    assert report.uncaptured == runtime.stats.failures and "not permitted" in str(report)
    assert runtime.stats.graphs == 0


class _Graph:
    """Stands for a torch.cuda.CUDAGraph: an object the runtime holds weakly."""


def test_a_pool_whose_graphs_are_all_gone_is_not_captured_into(monkeypatch):
    """The allocator refuses a capture into a pool none of whose graphs is alive (its use count is 0) while memory
    in it lives: after the graphs die (a Dynamo reset drops the compiled graphs that held them), a fresh pool."""
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(handles))
    pool = GraphPool()
    first, second = _Graph(), _Graph()
    with pool.capturing(first) as handle:
        pass
    with pool.capturing(second) as shared:
        assert shared == handle  # a graph of the pool is alive: share it
    first.cycle, second.cycle = first, second  # die only when the garbage collector runs
    alive = weakref.ref(second)
    del first, second
    with pool.capturing(_Graph()) as again:
        gc.collect()  # as torch.cuda.graph may when the capture begins
        assert again == handle and alive() is not None  # held through the capture
    gc.collect()
    assert alive() is None
    with pool.capturing(_Graph()) as fresh:
        pass
    # the graph captured into `again` died at once (nothing held it): none is alive
    assert fresh not in (handle, None)


def test_piece_whose_int_input_a_guard_equated_with_another_size():
    """`n == x.size(0)` makes the shape environment replace n's symbol by x's; Inductor then writes the piece that
    reads only n in x's symbol, which nothing in that piece binds (a NameError at its first call, seen first with
    the FX graph cache in piecewise decode). Pieces get their int inputs as the symbol the environment uses."""

    def f(n: int, x):
        return torch.arange(n) + torch.sin(x)  # the piece before sin reads n alone

    backend = Gemma4Backend(cudagraphs="piecewise", splitting_ops=(torch.sin,))
    compiled = torch.compile(f, backend=backend, dynamic=True)
    for n in (5, 6, 9):
        x = torch.randn(n)
        torch.testing.assert_close(compiled(n, x), f(n, x))
    assert not backend.report.fallbacks


def test_piecewise_backend_compiles_each_piece_with_the_passes():
    model = gemma4_fx.build_model("tiny-26b-a4b", num_hidden_layers=2)
    backend = Gemma4Backend(["router"], cudagraphs="piecewise")  # on CPU: split and compiled, no graphs
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for length in (5, 8):
            ids = torch.randint(3, model.config.vocab_size, (2, length))
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       **FP32)
    report = backend.report
    assert report.graphs == ["graph_0"]
    assert report.counts["router"] == model.config.num_hidden_layers
    assert {match.graph for match in report.matches if match.pattern == "router"} == {
        f"graph_0.submod_{2 * layer + 2}" for layer in range(model.config.num_hidden_layers)}
    assert not report.fallbacks
    assert backend.cudagraph_stats.captures == 0


def test_graphs_only_where_they_can_be_used():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    x = torch.randn(2, 3)
    assert Gemma4Backend()._cudagraph_mode(gm, [x]) is None  # auto on CPU
    assert Gemma4Backend(cudagraphs="full")._cudagraph_mode(gm, [x]) == "full"
    with torch.enable_grad():  # a graph that may need a backward
        assert Gemma4Backend(cudagraphs="full")._cudagraph_mode(gm, [x.requires_grad_()]) is None


@pytest.mark.parametrize("kwargs, argument", [
    pytest.param({"cudagraphs": "yes"}, "cudagraphs", id="cudagraphs"),
    pytest.param({"max_captured_shapes": 0}, "max_captured_shapes", id="max_captured_shapes"),
    pytest.param({"max_captured_shapes": 2.0}, "max_captured_shapes", id="max_captured_shapes-float"),
    pytest.param({"splitting_ops": "flash_attn::fwd"}, "splitting_ops", id="splitting_ops-string"),
])
def test_bad_runtime_argument_is_named(kwargs, argument):
    with pytest.raises((TypeError, ValueError), match=argument):
        Gemma4Backend(**kwargs)




class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.shift = 0.25  # under dynamic=True Dynamo passes float attributes and arguments as 0-d CPU tensors

    def forward(self, x, scale: float):
        return torch.relu(self.linear(x) * scale + self.shift)


def test_float_inputs_are_baked_in():
    module, x = Scaled(), torch.randn(3, 8)
    gm, inputs = dynamo_graph(module, x, 0.5, dynamic=True)
    floats = bake_float_inputs(gm, inputs)
    assert sorted(floats.values()) == [0.25, 0.5]
    assert not any(node.op == "call_method" and node.target == "item" for node in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs)[0], module(x, 0.5), rtol=0, atol=0)


def test_float_inputs_end_as_guarded_constants():
    module, x = Scaled(), torch.randn(3, 8)
    backend = Gemma4Backend(cudagraphs="piecewise")  # on CPU: split and compiled, no graphs
    compiled = torch.compile(module, backend=backend, dynamic=True)
    with torch.no_grad():
        for scale in (0.5, 2.0, 0.5):
            torch.testing.assert_close(compiled(x, scale), module(x, scale))
    assert list(backend.graph_reports) == ["graph_0", "graph_1"]  # 2.0 recompiled; 0.5 found its graph again
    assert not backend.report.fallbacks


def test_arithmetic_on_baked_floats_is_folded_before_the_split():
    """The audio encoder clips to `min(self.gradient_clipping, finfo.max)`: under dynamic=True, arithmetic on a float
    input that bakes into a number. It folds into constants, so no piece asks `split_module` for the float's symbol
    (torch 2.11 on CUDA: `KeyError: zf44`); "meta" stands in for the GPU, the cut for the attention between."""

    def clipped(x, clip: float):
        bound = min(clip, torch.finfo(x.dtype).max)
        y = torch.sin(x.cos() * 3)
        return torch.clamp(y, -bound, bound) * 2

    gm, inputs = dynamo_graph(clipped, torch.randn(8, 4, device="meta"), 0.5, dynamic=True)
    assert sorted(bake_float_inputs(gm, inputs).values()) == [0.5]
    assert not any(isinstance(example_value(node), torch.SymFloat) for node in gm.graph.nodes), gm.code
    split = split_graph(gm, extra_ops=(torch.sin,))
    assert [piece.captured for piece in split.pieces] == [True, False, True]
    [clamp] = [node for piece in split.pieces for node in piece.module.graph.nodes if node.target is torch.clamp]
    assert clamp.args[1:] == (-0.5, 0.5)


def test_a_vmap_stays_whole_in_one_piece():
    """transformers builds its masks with vmap, which Dynamo traces as levels entered and left around the batched ops
    (the audio encoder's under dynamic=True). Entering a level takes only a size, yet it must not move to the top: the
    ops between would run outside their level (torch 2.11 on CUDA: "NYI: querying is_contiguous inside of vmap",
    compiling a piece that has the batched ops without their level); "meta" stands in for the GPU."""

    def masked(x):
        y = F.scaled_dot_product_attention(x[None], x[None], x[None])[0]  # a cut above the vmap
        positions = torch.arange(x.shape[0], device=x.device)
        visible = torch.vmap(lambda row: positions <= row)(positions)
        return torch.relu(y) @ x.T * visible

    x = torch.randn(6, 4, device="meta")
    gm, inputs = dynamo_graph(masked, x, dynamic=True)
    split = split_graph(gm)
    levels = [[node.target.__name__ for node in piece.module.graph.nodes
               if "vmap_" in getattr(node.target, "__name__", "")] for piece in split.pieces]
    assert [names for names in levels if names] == [["_vmap_increment_nesting", "_vmap_decrement_nesting"]], levels


def test_copies_to_the_device_run_between_graphs_from_the_top():
    def layer(x, window):  # "meta" stands in for the GPU; `window` a CPU tensor
        y = torch.relu(x) * 2
        keep = -x.shape[0] + 1  # int arithmetic, hoisted beside the copy: no graph of its own (it launches nothing)
        return y[keep:] + window.to(x.device)

    gm, inputs = dynamo_graph(layer, torch.randn(3, 4, device="meta"), torch.tensor(4), dynamic=True)
    split = split_graph(gm)
    assert [piece.captured for piece in split.pieces] == [False, True]
    assert any(node.target is operator.neg for node in split.pieces[0].module.graph.nodes)
    moved = [node for node in split.pieces[0].module.graph.nodes if node.op == "call_method" and node.target == "to"]
    assert len(moved) == 1 and not any(node.op == "call_method" for node in split.pieces[1].module.graph.nodes)


def test_numbers_copied_to_the_device_become_fills_in_the_graph():
    def layer(x):  # "meta" stands in for the GPU
        window = torch.tensor(4)  # as HF's sliding cache makes its window size: on the CPU, then moved
        scale = torch.tensor(0.5, dtype=torch.float64).to(x.device)
        return torch.relu(x) * scale + window.to(x.device), torch.tensor([1, 2]).to(x.device)

    gm, inputs = dynamo_graph(layer, torch.randn(3, 4, device="meta"))
    split = split_graph(gm)
    [fills] = [[node for piece in split.pieces for node in piece.module.graph.nodes if node.target is torch.full]]
    assert sorted((node.args, node.kwargs["dtype"]) for node in fills) == [(((), 0.5), torch.float64),
                                                                          (((), 4), torch.int64)]
    assert all(node.kwargs["device"].type == "meta" for node in fills)
    pieces = {piece.module: piece.captured for piece in split.pieces}
    assert all(pieces[next(m for m in pieces if node in m.graph.nodes)] for node in fills)  # inside a graph
    # not a number: a list made on the CPU is still copied over between graphs
    assert [piece.captured for piece in split.pieces] == [False, True]


def test_ints_that_size_nothing_reach_the_graph_as_device_scalars():
    def step(x, positions, level):  # "meta" stands in for the GPU; `level` moves every call and sizes nothing, as
        # the fill level HF's sliding cache adds to its positions
        seen = (positions + level).float()[:, None] * torch.relu(x)
        return seen + (level - positions < 2).float()[:, None] + (positions * (level + 1))[:, None]

    x, positions = torch.randn(3, 4, device="meta"), torch.arange(3, device="meta")
    gm, inputs = dynamo_graph(step, x, positions, 5, dynamic=True)
    split = split_graph(gm)
    assert [piece.captured for piece in split.pieces] == [False, True]  # one graph, after the host's fills
    fills = [node for node in split.pieces[0].module.graph.nodes if node.target is torch.full]
    assert len(fills) == 2 and all(node.kwargs == {"dtype": torch.int64, "device": x.device} for node in fills)
    # the same values and dtypes as the step, on CPU, for levels other than the traced one
    cpu = [torch.randn(3, 4), torch.arange(3)]
    gm, inputs = dynamo_graph(step, *cpu, 5, dynamic=True)
    split = split_graph(gm)
    assert [piece.captured for piece in split.pieces] == [False, True]
    for level in (5, 9):
        got, want = split.module(*[level if isinstance(i, int) else i for i in inputs]), [step(*cpu, level)]
        assert [t.dtype for t in got] == [t.dtype for t in want]
        torch.testing.assert_close(list(got), list(want))


def test_attention_between_graphs_is_called_without_the_dispatcher():
    def layer(x, k, v):
        q = torch.relu(x)
        attended = torch.ops.gemma4_fx.prefill_attention.default(q, k, v, None, 0.5, True)  # as the passes put it
        return torch.ops.gemma4_fx.decode_attention.default(attended[:, :, -1:], k, v, None, 0.5) * 2

    args = (torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    gm, _ = dynamo_graph(layer, *args)
    split = split_graph(gm)
    call_ops_directly(split)
    prefill, decode = torch.ops.gemma4_fx.prefill_attention.default, torch.ops.gemma4_fx.decode_attention.default
    called = {captured: [node.target for piece in split.pieces if piece.captured == captured
                         for node in piece.module.graph.nodes if node.op == "call_function"]
              for captured in (False, True)}
    assert BETWEEN_GRAPHS[prefill] in called[False] and prefill not in called[False]
    assert decode in called[True]  # one row over the prompt's keys: inside a graph, where the op stays
    with torch.no_grad():
        torch.testing.assert_close(split.module(*args)[0], layer(*args), rtol=0, atol=0)


@torch.library.custom_op("gemma4_fx_test::column_major", mutates_args=())
def column_major(x: torch.Tensor) -> torch.Tensor:
    """Runs between graphs; its real output is laid out otherwise than its fake one says (as an eager kernel may)."""
    return x.t().contiguous().t().clone(memory_format=torch.preserve_format)


@column_major.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def test_pieces_get_their_inputs_laid_out_as_compiled():
    def fn(x, w):
        return torch.relu(column_major(torch.sin(x)) @ w + 1)

    x, w = torch.randn(6, 4), torch.randn(4, 3)
    assert not column_major(x).is_contiguous()
    backend = Gemma4Backend(cudagraphs="piecewise", splitting_ops=["gemma4_fx_test::column_major"])
    compiled = torch.compile(fn, backend=backend, dynamic=True)
    torch.testing.assert_close(compiled(x, w), fn(x, w))
    assert not backend.report.fallbacks
