"""The grouped skinny-GEMM op: the Triton kernel (interpreter on CPU, compiled on CUDA) against float64 and the eager
reference, split along K and not, its determinism, the split rule, bad input, the custom op and its fake; the
pattern on a layer's linears as Gemma-4 and other families write them, its size rule for the gated group on CUDA,
and on a tiny Gemma-4 decode step, whole and cut into the CUDA-graph runtime's pieces."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import gemma4_fx
from gemma4_fx.patterns import skinny_linear as P
from gemma4_fx.replacements import skinny_linear as S
from gemma4_fx.replacements.skinny_linear_configs import CONFIGS
from gemma4_fx.replacements.rows import rms_norm
from helpers import DEVICES, hopper_ptx, seeded

# ‖out - float64‖ / ‖float64‖: one rounding per output (gated: the two GEMMs', the gelu's and the product's).
REL_BOUND = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SPLIT = S.Config(16, 32, 4, 4, 2)  # small blocks: several column blocks a weight, K in runs of several steps


def _args(rows, hidden, widths, dtype, device):
    """x with rows over two orders of magnitude; weights at unit-ish output scale."""
    g = seeded("skinny", rows, hidden, widths, dtype)
    x = torch.randn(rows, hidden, generator=g) * torch.logspace(-1, 1, rows)[:, None]
    weights = [torch.randn(n, hidden, generator=g) * hidden**-0.5 for n in widths]
    return x.to(dtype).to(device), [w.to(dtype).to(device) for w in weights]


def _float64(x, weights, gated, times=None):
    ys = [x.double() @ w.double().T for w in weights]
    if gated or times is not None:
        return [F.gelu(ys[0], approximate="tanh") * (ys[1] if gated else times.double())]
    return ys


def _check(x, weights, gated, config, times=None):
    outs = S.skinny_linear_triton(x, weights, gated, times, config=config)
    one = gated or times is not None
    assert [o.shape for o in outs] == [(x.shape[0], w.shape[0]) for w in (weights[:1] if one else weights)]
    for out, exact, eager in zip(outs, _float64(x, weights, gated, times),
                                 S.skinny_linear_reference(x, weights, gated, times)):
        assert out.dtype == x.dtype and not out.isnan().any()
        rel = ((out.double() - exact).norm() / exact.norm()).item()
        # Against eager only the K order differs: an ulp of the row's largest output here and there (fp32: a few).
        scale = eager.double().abs().amax(-1, keepdim=True)
        diff = ((out.double() - eager.double()).abs() / scale / torch.finfo(x.dtype).eps).max().item()
        bitwise = (out == eager).double().mean().item()
        print(f"{x.dtype} gated={gated}: rel {rel:.3g}, max {diff:.2f} eps, {bitwise:.1%} bitwise equal to eager")
        assert rel <= REL_BOUND[x.dtype]
        assert diff <= (16 if x.dtype == torch.float32 else 1)
        assert x.dtype == torch.float32 or bitwise >= 0.9
    return outs


# rows, hidden, widths, gated. Widths not multiples of the blocks; hidden a multiple of 8 (bf16 rows 16-byte
# aligned) but not of BLOCK_K.
CASES = [(1, 184, (40,), False), (3, 120, (72, 24, 24), False), (8, 104, (33, 17), False), (3, 120, (40, 40), True),
         (1, 184, (24, 24), True), (64, 40, (24, 24), True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [None, SPLIT], ids=["default", "split"])
@pytest.mark.parametrize("case", CASES, ids=[f"m{c[0]}-{len(c[2])}w" + ("-gated" if c[3] else "") for c in CASES])
def test_kernel(device, dtype, config, case):
    rows, hidden, widths, gated = case
    x, weights = _args(rows, hidden, widths, dtype, device)
    _check(x, weights, gated, config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [None, SPLIT], ids=["default", "split"])
@pytest.mark.parametrize("rows", [1, 5])
def test_gelu_times(device, dtype, config, rows):
    """`gelu_tanh(x @ w.T) * t` (the PLE gate times the per-layer input), t a strided slice as the model's is."""
    x, (w,) = _args(rows, 184, (40,), dtype, device)
    wide = torch.randn(rows, 3, 40, generator=seeded("times", rows)).to(dtype).to(device)
    _check(x, [w], False, config, times=wide[:, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_strided_x_and_k_a_multiple_of_the_block(device, dtype):
    """x with a row stride past K (a slice of a wider activation); K a whole number of BLOCK_K steps."""
    x, weights = _args(5, 128, (24, 40), dtype, device)
    wide = torch.zeros(5, 136, dtype=x.dtype, device=device)
    wide[:, :128] = x
    _check(wide[:, :128], weights, False, SPLIT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated", [False, True])
def test_deterministic(device, gated):
    """Split along K, the partials are added in split order by a second launch: every run gives the same bits."""
    x, weights = _args(3, 136, (40, 40), torch.bfloat16, device)
    first = S.skinny_linear_triton(x, weights, gated, config=SPLIT)
    second = S.skinny_linear_triton(x, weights, gated, config=SPLIT)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", sorted(CONFIGS), ids=lambda key: f"{key[0]}x{'+'.join(map(str, key[1]))}"
                         + ("-gated" if key[2] else ""))
def test_tuned_configs(device, key):
    """Every tuned config of the table on a shape cut down to it (two BLOCK_K steps per split, widths two blocks
    and a part), at 1 and 16 rows: the config's tiles, split and stages, not the model's widths."""
    hidden, widths, gated, _ = key
    config = S.Config(*CONFIGS[key])
    small = [2 * config.block_n + 8] * len(widths)
    for rows in (1, S.TUNED_MAX_ROWS):
        _check(*_args(rows, 2 * config.block_k * config.split_k, small, torch.bfloat16, device), gated, config)


@pytest.mark.parametrize("gated", [False, True])
def test_hopper_split_launch_compiles(gated):
    """Split along K as Hopper launches it (the reduction a programmatic dependent launch: the GEMM lets it start,
    it waits for the partials) compiles for sm_90: the interpreter runs neither instruction."""
    widths, dtype = ((6144, 6144) if gated else (2048, 256, 256)), "*bf16"
    weights = (dtype,) * len(widths)
    outs = weights[:1] if gated else weights
    shared = dict(WIDTHS=widths, NUM_WEIGHTS=len(widths), TOTAL=sum(widths), GATED=gated, TIMES=False, SPLIT_K=4,
                  BLOCK_M=16, BLOCK_N=64, PDL=True)
    gemm = hopper_ptx(S._skinny_kernel, dict(x_ptr=dtype, w_ptrs=weights, out_ptrs=outs, times_ptr=dtype,
                                             part_ptr="*fp32", m="i32", x_row_stride="i32", times_row_stride="i32"),
                      dict(shared, HIDDEN=1536, STEPS=3, BLOCK_K=128, PRECISION="tf32"), num_warps=4, num_stages=4)
    reduction = hopper_ptx(S._reduce_kernel, dict(part_ptr="*fp32", out_ptrs=outs, times_ptr=dtype, m="i32",
                                                  times_row_stride="i32"), shared, num_warps=4)
    assert "griddepcontrol.launch_dependents" in gemm and "griddepcontrol.wait" not in gemm
    assert "griddepcontrol.wait" in reduction


def test_split_rule():
    """BLOCK_N shrinks until the column blocks fill the SMs; short of that, K is split while the fp32 partials stay
    under a quarter of the weight bytes; the launcher takes a divisor of the K steps."""
    e2b_qkv = S.default_config(1, 1536, [2048, 256, 256], torch.bfloat16, False, 132)
    assert (e2b_qkv.block_n, e2b_qkv.split_k) == (16, 1)  # 160 blocks
    e2b_mlp = S.default_config(8, 1536, [6144, 6144], torch.bfloat16, True, 132)
    assert (e2b_mlp.block_n, e2b_mlp.split_k) == (32, 1)  # 192 blocks
    kv = S.default_config(1, 1536, [256, 256], torch.bfloat16, False, 132)
    assert (kv.block_n, kv.block_k, kv.split_k) == (16, 128, 5)  # 32 blocks, 12 steps
    assert S.default_config(64, 1536, [256, 256], torch.bfloat16, False, 132).split_k == 1  # partials too big
    assert S.default_config(2, 40, [8], torch.float32, False, 132).block_k == 64  # fp32: half the K block
    assert [S.split_runs(12, k) for k in (1, 4, 5, 12, 20)] == [1, 4, 4, 12, 12]
    assert [S.split_runs(7, 4), S.split_runs(6, 4), S.split_runs(4, 4)] == [1, 3, 4]  # the test cases' K steps


def test_bad_input_names_the_argument():
    x, (w0, w1, w2) = _args(3, 16, (8, 8, 4), torch.float32, "cpu")
    cases = [
        ((x[None], [w0]), "x must be 2-D"),
        ((torch.zeros(65, 16), [w0]), "x must be 2-D .* at most 64 rows"),
        ((x.to(torch.float64), [w0]), "x must"),
        ((x, []), "weights must hold 1 to 3"),
        ((x, [w0, w1, w2, w0]), "weights must hold 1 to 3"),
        ((x, [w0, w1, w2], True), r"weights must hold 2 \(gate, up\)"),
        ((x, [w0, torch.zeros(8, 15)]), r"weights\[1\] must be a contiguous \[out_features, 16\]"),
        ((x, [w0.half()]), r"weights\[0\] must"),
        ((x, [w0, w1.T.contiguous().T]), r"weights\[1\] must be a contiguous"),
        ((x, [w0, w2], True), "gated weights must have one shape"),
        ((x, [w0, w1], False, torch.zeros(3, 8)), "gelu_times takes one weight, not gated"),
        ((x, [w0], False, torch.zeros(3, 4)), r"gelu_times must be a \[3, 8\] torch.float32 tensor"),
        ((x, [w0], False, torch.zeros(8, 3).T), "gelu_times must .* unit last stride"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            S.skinny_linear_triton(*args)
        with pytest.raises(ValueError, match=message):
            torch.ops.gemma4_fx.skinny_linear(*args)


def test_no_rows():
    x, weights = _args(0, 24, (8, 16), torch.float32, "cpu")
    assert [o.shape for o in S.skinny_linear_triton(x, weights)] == [(0, 8), (0, 16)]


def test_custom_op_and_fake():
    """On CPU the op is the reference; its fake gives one [rows, N_i] per weight (gated or gelu_times: one)."""
    x, weights = _args(3, 24, (8, 16), torch.bfloat16, "cpu")
    for gated in (False, True):
        outs = torch.ops.gemma4_fx.skinny_linear(x, weights[:1] * 2 if gated else weights, gated)
        refs = S.skinny_linear_reference(x, weights[:1] * 2 if gated else weights, gated)
        assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        fakes = [mode.from_tensor(w) for w in weights]
        assert [o.shape for o in torch.ops.gemma4_fx.skinny_linear(fake_x, fakes)] == [(3, 8), (3, 16)]
        (gated_out,) = torch.ops.gemma4_fx.skinny_linear(fake_x, [fakes[1], fakes[1]], True)
        assert gated_out.shape == (3, 16) and gated_out.dtype == torch.bfloat16
        (times_out,) = torch.ops.gemma4_fx.skinny_linear(fake_x, fakes[:1], False, fake_x[:, :8])
        assert times_out.shape == (3, 8)
    torch.library.opcheck(torch.ops.gemma4_fx.skinny_linear.default, (x, weights, False))


class _Layer(torch.nn.Module):
    """A decoder layer's linears as a family writes them: q/k/v on the normed input, those named in `normed` then
    RMS-normed per head (Gemma-4: all three, v without a weight); gate/up on another norm's output, weighed by w
    (Gemma-4) or by `1 + w` (Gemma-2/3), through `act` and down; and a biased linear, which is not a bare mm."""

    def __init__(self, normed="qkv", act="gelu_tanh", one_plus_w=False, hidden=40, q=48, kv=16, inter=56, head=8):
        super().__init__()
        self.normed, self.one_plus_w, self.head = normed, one_plus_w, head
        self.act = (lambda t: F.gelu(t, approximate="tanh")) if act == "gelu_tanh" else F.silu
        self.q, self.k, self.v = (torch.nn.Linear(hidden, n, bias=False) for n in (q, kv, kv))
        self.gate, self.up = (torch.nn.Linear(hidden, inter, bias=False) for _ in range(2))
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.biased = torch.nn.Linear(hidden, kv)
        self.input_norm, self.ff_norm = (torch.nn.Parameter(torch.rand(hidden) + 0.5) for _ in range(2))
        self.q_norm, self.k_norm = (torch.nn.Parameter(torch.rand(head) + 0.5) for _ in range(2))

    def forward(self, x):
        h = rms_norm(x, self.input_norm, 1e-6)
        heads = {name: proj(h).unflatten(-1, (-1, self.head)) for name, proj in zip("qkv", (self.q, self.k, self.v))}
        for name, weight in zip("qkv", (self.q_norm, self.k_norm, None)):
            if name in self.normed:
                heads[name] = rms_norm(heads[name], weight, 1e-6)
        attn = torch.cat([t.flatten(-2) for t in heads.values()], -1)
        ff_in = rms_norm(x * 0.5, 1 + self.ff_norm if self.one_plus_w else self.ff_norm, 1e-6)
        mlp = self.down(self.act(self.gate(ff_in)) * self.up(ff_in))
        return attn, mlp, self.biased(x)


class _Pass(gemma4_fx.Gemma4Passes):
    """The pattern alone as Inductor's post-grad custom pass; `ops` lists each op it installed as (weights, gated)."""

    def __init__(self):
        super().__init__([P.NAME])
        self.ops = []

    def __call__(self, graph):
        super().__call__(graph)
        self.ops += [(len(node.args[1]), node.args[2]) for node in
                     graph.find_nodes(op="call_function", target=torch.ops.gemma4_fx.skinny_linear.default)]


def _compile(module, *args, dynamic=None):
    """(compiled outputs, eager outputs, the pass) of `module` through Inductor with the pattern alone."""
    graph_pass = _Pass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=graph_pass, fx_graph_cache=False), torch.no_grad():
        return torch.compile(module, dynamic=dynamic)(*args), module(*args), graph_pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(3, 1), (70,)], ids=["decode", "prefill"])
def test_pattern(dtype, rows):
    """Decode rows: q/k/v become one op, gate/up one gated op, within the eager rounding; 70 rows are left to
    cuBLAS with the reason; the biased linear is not matched."""
    layer = _Layer().to(dtype).eval()
    x = torch.randn(*rows, 40, generator=seeded("pattern", rows, dtype)).to(dtype)
    got, eager, graph_pass = _compile(layer, x)
    for out, ref in zip(got, eager):
        torch.testing.assert_close(out, ref, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    report = graph_pass.report
    if rows == (70,):
        assert report.counts[P.NAME] == 0
        assert {skip.reason for skip in report.skipped} == {"70 rows: above 64 the GEMMs are cuBLAS's"}
    else:
        assert report.counts[P.NAME] == 2 and not report.skipped
        assert sorted(graph_pass.ops) == [(2, True), (3, False)]  # gate/up gated; q/k/v


def test_symbolic_rows_left_alone_with_the_reason():
    """Under dynamic shapes (as Dynamo compiles a decode step at its second batch size) the row count is a symbol:
    both groups are left to Inductor, with the reason."""
    layer = _Layer().eval()
    got, eager, graph_pass = _compile(layer, torch.randn(3, 1, 40, generator=seeded("symbolic rows")), dynamic=True)
    for out, ref in zip(got, eager):
        torch.testing.assert_close(out, ref)
    assert graph_pass.report.counts[P.NAME] == 0 and graph_pass.ops == []
    assert [skip.reason for skip in graph_pass.report.skipped] == \
        ["symbolic rows or hidden size: the op needs a static x of at most 64 rows"] * 2


FAMILIES = {  # name: _Layer arguments of a layer whose linears share inputs but are not Gemma-4's
    "llama": dict(normed="", act="silu"),  # no q/k norms, SiLU-gated MLP
    "qwen3": dict(normed="qk", act="silu"),  # q and k normed, v not
    "gemma3": dict(normed="qk", one_plus_w=True),  # gelu-tanh MLP on a norm weighed by 1 + w
    "gemma4-silu": dict(act="silu"),  # Gemma-4's q/k/v (rewritten), gate/up through SiLU (left alone)
}


@pytest.mark.parametrize("family", FAMILIES)
def test_other_families_left_alone(family):
    """Linears sharing an input that are not Gemma-4's q/k/v or gelu-tanh gate/up are no candidates: nothing
    rewritten or reported."""
    layer = _Layer(**FAMILIES[family]).eval()
    x = torch.randn(3, 1, 40, generator=seeded("families", family))
    got, eager, graph_pass = _compile(layer, x)
    for out, ref in zip(got, eager):
        torch.testing.assert_close(out, ref)
    assert graph_pass.ops == ([(3, False)] if family == "gemma4-silu" else [])
    assert not graph_pass.report.skipped


def _group(device, rows, hidden, widths, gated):
    """`_unsupported`'s arguments for bf16 linears of `widths` on x [rows, hidden] (fake tensors on `device`)."""
    graph = torch.fx.Graph()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = graph.placeholder("x")
        x.meta["val"] = torch.empty(rows, hidden, dtype=torch.bfloat16, device=device)
        weights = []
        for i, n in enumerate(widths):
            weights.append(graph.placeholder(f"w{i}"))
            weights[-1].meta["val"] = torch.empty(n, hidden, dtype=torch.bfloat16, device=device)
        product = graph.call_function(torch.mul, (x, x)) if gated else None
        if gated:
            product.meta["val"] = torch.empty(rows, widths[0], dtype=torch.bfloat16, device=device)
    return x, weights, product


@pytest.mark.parametrize("case, reason", [
    (("cuda", 8, 1536, [12288, 12288], True), None),  # E2B double-wide gate/up: measured faster
    (("cuda", 8, 2560, [10240, 10240], True), "gate and up weights of 100 MiB: above 72 MiB one launch is faster "
                                              "than separate linears only with a tuned config, and this shape has "
                                              "none"),  # E4B gate/up on a GPU without tuned configs
    (("cuda", 32, 2560, [4096, 1024, 1024], False), None),  # q/k/v: any size
    (("cpu", 8, 2560, [10240, 10240], True), None),  # the CPU op is eager's: no speed to lose
], ids=["e2b-double-wide", "e4b-gate-up", "e4b-qkv", "cpu"])
def test_gated_size_rule(case, reason):
    """On CUDA a gated group above `GATED_MAX_WEIGHT_BYTES` of weights is rewritten only with a tuned config (none
    on a GPU the table does not name; `test_skinny_single.py` takes E4B's on an H200)."""
    assert P.unsupported(*_group(*case)) == reason


def test_pattern_on_a_tiny_gemma4_decode_step():
    """tiny-e2b at 4 layers, 2 sequences of one token: q/k/v in the layers that compute their own k/v, gate/up
    (gated) in all; logits as eager's."""
    model = gemma4_fx.build_model("tiny-e2b", seed=5, num_hidden_layers=4)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 1), generator=seeded("tiny decode"))
    got, eager, graph_pass = _compile(lambda i: model(i, use_cache=False).logits, ids)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    own_kv = config.num_hidden_layers - config.num_kv_shared_layers
    assert sorted(graph_pass.ops) == [(2, True)] * config.num_hidden_layers + [(3, False)] * own_kv


def test_pattern_in_the_pieces_of_a_piecewise_decode_step():
    """The CUDA-graph runtime cuts the graph at attention (on CPU: cut and compiled, nothing captured): each layer's
    q/k/v are rewritten in the piece before its attention, gate/up in the piece after it."""
    model = gemma4_fx.build_model("tiny-26b-a4b", num_hidden_layers=2)
    backend = gemma4_fx.Gemma4Backend([P.NAME], cudagraphs="piecewise")
    ids = torch.randint(3, model.config.vocab_size, (2, 1), generator=seeded("piecewise decode"))
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        torch.testing.assert_close(got, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    layers = range(model.config.num_hidden_layers)
    assert sorted((match.graph, match.location) for match in backend.report.matches) == sorted(
        [(f"graph_0.submod_{2 * i}", f"model.layers.{i}.self_attn.q_proj") for i in layers]
        + [(f"graph_0.submod_{2 * i + 2}", f"model.layers.{i}.mlp.gate_proj") for i in layers])
    assert not backend.report.skipped and not backend.report.fallbacks
