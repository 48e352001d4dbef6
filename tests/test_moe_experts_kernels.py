"""The fused MoE experts op: Triton kernels (interpreter on CPU, compiled on CUDA) against float64 and the eager
reference, the reference against transformers' experts module, the custom op and its fake."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from gemma4_fx.replacements import moe_experts as M
from benchmarks.moe import hf_experts
from helpers import DEVICES, DTYPES, hopper_ptx, seeded

# ‖out - float64‖ / ‖float64‖: eager rounds four times per pair (gate_up, gelu, product, down) and once at the end.
REL_BOUND = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _experts_args(tokens, experts, inter, hidden, top_k, dtype, device, routing="random",
                  weights_dtype=torch.float32):
    """Activations over two orders of magnitude, weights at unit-ish output scale, and a routing:
    "random": distinct random experts per token; "few": every token picks among top_k + 1 experts (the rest get
    none, those get many rows each); "one": every token has expert 3, in a random slot; "tied": random experts,
    every token's weights equal."""
    g = seeded("moe", tokens, experts, inter, hidden, top_k, dtype, routing, weights_dtype)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, tokens)[:, None]
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    pool = top_k + 1 if routing == "few" else experts
    ids = torch.stack([torch.randperm(pool, generator=g)[:top_k] for _ in range(tokens)])
    if routing == "one":
        others = torch.stack([torch.randperm(experts - 1, generator=g)[: top_k - 1] for _ in range(tokens)])
        others += (others >= 3).long()  # skip expert 3
        slot = torch.randint(0, top_k, (tokens,), generator=g)
        ids = torch.stack([torch.cat([o[:s], torch.tensor([3]), o[s:]]) for o, s in zip(others, slot)])
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    if routing == "tied":
        weights = torch.full((tokens, top_k), 1 / top_k)
    cast = [t.to(dtype).to(device) for t in (x, gate_up, down)]
    return cast[0], ids.to(device), weights.to(weights_dtype).to(device), cast[1], cast[2]


def _float64_experts(x, ids, weights, gate_up, down):
    """The math in float64 from the rounded inputs, expert by expert."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for expert in (e for e in ids.unique().tolist() if e < gate_up.shape[0]):  # ids >= E: sentinels, skipped
        token, slot = (ids == expert).nonzero(as_tuple=True)
        gate, up = (x[token].double() @ gate_up[expert].double().T).chunk(2, dim=-1)
        y = (F.gelu(gate, approximate="tanh") * up) @ down[expert].double().T
        out.index_add_(0, token, y * weights[token, slot].double()[:, None])
    return out


def _assert_close_to_eager(out, eager, min_bitwise, max_eps=2):
    """Ours and eager round at the same places; only the GEMMs accumulate in another order, which now and then
    flips a rounding by an ulp (fp32: every element may differ in its last bits). Each token's differences are
    held to `max_eps` (fp32: 8 times that) of its largest output, and most elements must be equal."""
    scale = eager.double().abs().amax(-1, keepdim=True)
    diff = (out.double() - eager.double()).abs() / scale / torch.finfo(out.dtype).eps
    bitwise = (out == eager).double().mean().item()
    print(f"{out.dtype}: {bitwise:.4%} bitwise equal, max |diff| {diff.max().item():.2f} eps of the token's "
          f"largest output")
    assert diff.max().item() <= (8 if out.dtype == torch.float32 else 1) * max_eps
    assert bitwise >= min_bitwise


def _check_kernel(args, path, min_bitwise, tma=None):
    x = args[0]
    out = torch.full_like(x, float("nan"))
    assert M.moe_experts_triton(*args, out=out, path=path, tma=tma) is out
    assert not out.isnan().any()  # every element written
    exact = _float64_experts(*args)
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    print(f"{path}: ‖out - float64‖ / ‖float64‖ = {rel:.3g}")
    assert rel <= REL_BOUND[x.dtype]
    _assert_close_to_eager(out, M.moe_experts_reference(*args), min_bitwise)


# tokens, experts, intermediate, hidden, top_k, routing. H and N are not multiples of the blocks; T*K > E but for T=1.
CASES = [(1, 16, 48, 96, 4, "random"), (7, 8, 24, 40, 3, "tied"), (33, 16, 40, 72, 4, "few"),
         (17, 8, 32, 64, 2, "one")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path,tma", [("stream", False), ("tiled", False), ("tiled", True)],
                         ids=["stream", "tiled", "tiled+tma"])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] + str(c[0]) for c in CASES])
def test_kernels(device, dtype, path, tma, case):
    """Each path; the tiled GEMMs reading weights (and down's activations) through pointers or tensor
    descriptors."""
    *shape, routing = case
    args = _experts_args(*shape, dtype, device, routing)
    # On CPU, eager's GEMMs and the interpreter's both add in fp32 without blocking over K: bf16 roundings agree.
    _check_kernel(args, path, min_bitwise=0.0 if dtype == torch.float32 else 0.97, tma=tma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["stream", "tiled"])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] + str(c[0]) for c in CASES])
def test_kernels_in_the_eager_loops_order(device, dtype, path, case):
    """`expert_order`: the sum over k as transformers' "eager" experts loop adds (experts by ascending id, each
    product and sum rounded to x.dtype), with expert-parallel sentinels (id E) in some slots skipped."""
    *shape, routing = case
    x, ids, *rest = _experts_args(*shape, dtype, device, routing)
    ids = ids.clone()
    ids[::3, -1] = rest[1].shape[0]  # every third token's last slot: a sentinel
    args = (x, ids, *rest)
    out = torch.full_like(x, float("nan"))
    assert M.moe_experts_triton(*args, out=out, path=path, expert_order=True) is out
    exact = _float64_experts(*args)
    assert ((out.double() - exact).norm() / exact.norm()).item() <= REL_BOUND[dtype]
    _assert_close_to_eager(out, M.moe_experts_loop_reference(*args), min_bitwise=0.0 if dtype == torch.float32
                           else 0.97)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_with_weights_in_activation_dtype_top_8_strided_x(device, dtype):
    """Weights in x.dtype: eager rounds each weighted row to x.dtype before the fp32 sum; k = 8 > 4 accumulators (on
    CPU eager may sum in another order than CUDA's, which the kernel copies); x with a row stride past H."""
    x, *rest = _experts_args(5, 16, 24, 48, 8, dtype, device, weights_dtype=dtype)
    wide = torch.zeros(5, 56, dtype=dtype, device=device)
    wide[:, :48] = x
    _check_kernel((wide[:, :48], *rest), None, min_bitwise=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(16, 16, 24, 40, 4, "few", {"quarter"}), (33, 16, 40, 40, 4, "few", {"half"}),
                                  (40, 8, 24, 40, 2, "one", {"quarter", "full"})],
                         ids=["quarter", "half+narrow", "full"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_tall_blocks(device, case, tma):
    """BLOCK_M = 64: an expert's last block of at most 16 or 32 rows runs as a quarter- or half-height tile ("few":
    at most 16 rows an expert, or 17 to 32), a fuller one at full height ("one": expert 3 has 40 rows, the others a
    few); with N = 40 in 32-column blocks, gate_up's last N-block (8 columns) as a half-width tile."""
    *shape, routing, heights = case
    args = _experts_args(*shape, torch.bfloat16, device, routing)
    rows = args[1].flatten().bincount()
    assert {"quarter" if r <= 16 else "half" if r <= 32 else "full" for r in rows.tolist() if r} == heights, rows
    tiles = M.GemmConfig(32, 32, 8, 4, 2)
    out = M.moe_experts_triton(*args, path="tiled", config=M.Config(64, tiles, tiles), tma=tma)
    _assert_close_to_eager(out, M.moe_experts_reference(*args), min_bitwise=0.97)
    if tma:  # the same K order: the same bits as pointer loads
        assert torch.equal(out, M.moe_experts_triton(*args, path="tiled", config=M.Config(64, tiles, tiles),
                                                     tma=False))


@pytest.mark.parametrize("path", ["tiled", "stream"])
def test_hopper_launches_compile(path):
    """The GEMMs as Hopper launches them compile for sm_90 at 26B-A4B's widths (E=128, N=704, H=2816, top-8): tiled,
    the weights and down's activation rows read through tensor descriptors (TMA), the gate/up tail a half-width
    descriptor; streaming, each launch a programmatic dependent one (the route and combine kernels too). The
    interpreter runs neither."""
    inter, hidden, block_m, block_n, block_k = 704, 2816, (128 if path == "tiled" else 16), 128, 64
    stream, bf16 = path == "stream", "*bf16"

    def descriptors(**tiles):
        """(signature, constexprs) of descriptor arguments: tensor descriptors of these tiles, or streaming None."""
        if stream:
            return {}, dict.fromkeys(tiles)
        return {name: f"tensordesc<bf16[{rows},{block_k}]>" for name, rows in tiles.items()}, {}

    shared = dict(INTER=inter, HIDDEN=hidden, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="tf32",
                  PDL=stream)
    rows = dict(order_ptr="*i32", table_ptr="*i32", max_blocks="i32", group_m="i32")
    signature, constexprs = descriptors(w_desc=block_n, w_tail_desc=block_n // 2)
    gate_up = hopper_ptx(M._gate_up_kernel, dict(x_ptr=bf16, w_ptr=bf16, act_ptr=bf16, x_row_stride="i32", **rows,
                                                 **signature),
                         dict(shared, TOP_K=8, NARROW_TAIL=M._narrow_tail(inter, block_n), **constexprs),
                         num_warps=8, num_stages=3)
    signature, constexprs = descriptors(w_desc=block_n, act_desc=block_m, act_half_desc=max(block_m // 2, 16),
                                        act_quarter_desc=max(block_m // 4, 16))
    down = hopper_ptx(M._down_kernel, dict(act_ptr=bf16, w_ptr=bf16, y_ptr=bf16, **rows, **signature),
                      dict(shared, **constexprs), num_warps=8, num_stages=3)
    for ptx in (gate_up, down):
        assert ("cp.async.bulk.tensor" in ptx) != stream and ("griddepcontrol.wait" in ptx) == stream
    if stream:  # the route kernel lets the GEMMs start, the combine waits for them
        route = hopper_ptx(M._route_kernel, dict(ids_ptr="*i64", counts_ptr="*i32", order_ptr="*i32",
                                                 table_ptr="*i32", pairs="i32", experts="i32", max_blocks="i32"),
                           dict(NUM_BINS=128, CHUNK=1024, NUM_CHUNKS=1, CHUNKS_PAD=1, BLOCK_M=block_m, TABLE_CHUNK=16,
                                PDL=True), num_warps=4)
        combine = hopper_ptx(M._combine_kernel, dict(y_ptr=bf16, w_ptr=bf16, ids_ptr="*i64", out_ptr=bf16,
                                                     hidden="i32", experts="i32"),
                             dict(TOP_K=8, K_PAD=8, BLOCK_H=1024, ROUND_PRODUCT=True, EXPERT_ORDER=True, PDL=True),
                             num_warps=4)
        assert "griddepcontrol.launch_dependents" in route and "griddepcontrol.wait" in combine


@pytest.mark.parametrize("device", DEVICES)
def test_descriptors_need_16_byte_rows(device):
    """Weights whose rows are not 16-byte aligned (H = 36 bf16: 72 bytes) cannot be read through tensor
    descriptors: asked for them, the launcher reads through pointers, with the same result."""
    args = _experts_args(9, 8, 24, 36, 2, torch.bfloat16, device)
    assert not M._descriptor_ok(args[3]) and M._descriptor_ok(args[4])
    out = M.moe_experts_triton(*args, path="tiled", tma=True)
    assert torch.equal(out, M.moe_experts_triton(*args, path="tiled", tma=False))
    _assert_close_to_eager(out, M.moe_experts_reference(*args), min_bitwise=0.97)


def test_narrow_tail_rule():
    """gate_up's last N-block takes a half-width tile where its columns fit one and the tile stays a tl.dot's 16."""
    assert M._narrow_tail(704, 128) and M._narrow_tail(40, 32) and M._narrow_tail(48, 32)
    assert not M._narrow_tail(704, 64)  # no partial block
    assert not M._narrow_tail(100, 64)  # 36 columns left: more than half
    assert not M._narrow_tail(40, 16)  # a half-width tile of 8 columns


def test_regime_follows_pairs(monkeypatch):
    """Up to STREAM_MAX_PAIRS pairs the streaming path, whose M-block holds all of an expert's rows."""
    seen = []
    real = M._route
    monkeypatch.setattr(M, "_route", lambda ids, e, block_m, max_blocks, pdl: seen.append((block_m, max_blocks))
                        or real(ids, e, block_m, max_blocks, pdl))
    for tokens in (32, 33):  # 64 and 66 pairs over 16 experts
        M.moe_experts_triton(*_experts_args(tokens, 16, 16, 16, 2, torch.float32, "cpu"))
    assert seen == [(32, 2 + 16), (16, 5 + 16)]  # (BLOCK_M, blocks bound: cdiv(P, BLOCK_M) + E)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_experts(dtype):
    """Bitwise HF's "grouped_mm" forward; "batched_mm" too where its bmm adds as mm does (CPU bf16); "eager" sums
    in x.dtype with index_add_, so only closely."""
    x, ids, weights, gate_up, down = _experts_args(33, 16, 40, 72, 4, dtype, "cpu")
    ours = M.moe_experts_reference(x, ids, weights, gate_up, down)
    with torch.no_grad():
        hf = {name: hf_experts(name, gate_up, down, 4)(x, ids, weights) for name in ("grouped_mm", "batched_mm",
                                                                                      "eager")}
    assert torch.equal(ours, hf["grouped_mm"])
    assert torch.equal(M.moe_experts_loop_reference(x, ids, weights, gate_up, down), hf["eager"])
    _assert_close_to_eager(ours, hf["batched_mm"], min_bitwise={torch.float32: 0.0, torch.bfloat16: 1.0,
                                                                torch.float16: 0.99}[dtype])
    _assert_close_to_eager(ours, hf["eager"], min_bitwise=0.0 if dtype == torch.float32 else 0.3)


def test_custom_op_on_cpu_is_the_reference():
    args = _experts_args(7, 8, 24, 40, 3, torch.bfloat16, "cpu")
    assert torch.equal(torch.ops.gemma4_fx.moe_experts(*args), M.moe_experts_reference(*args))


def test_opcheck():
    torch.library.opcheck(torch.ops.gemma4_fx.moe_experts.default, _experts_args(5, 8, 16, 24, 2, torch.float32,
                                                                                 "cpu"))


def test_fake():
    args = _experts_args(5, 8, 16, 24, 2, torch.bfloat16, "cpu")
    with FakeTensorMode() as mode:
        out = torch.ops.gemma4_fx.moe_experts(*(mode.from_tensor(a) for a in args))
    assert out.shape == (5, 24) and out.dtype == torch.bfloat16

    compiled = torch.compile(lambda *args: torch.ops.gemma4_fx.moe_experts(*args), backend="aot_eager", dynamic=True,
                             fullgraph=True)
    for tokens in (3, 6):
        args = _experts_args(tokens, 8, 16, 24, 2, torch.bfloat16, "cpu")
        assert torch.equal(compiled(*args), M.moe_experts_reference(*args))


def test_bad_arguments_name_the_argument():
    x, ids, w, gate_up, down = _experts_args(4, 8, 16, 24, 2, torch.float32, "cpu")
    op = torch.ops.gemma4_fx.moe_experts
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[None], ids, w, gate_up, down)
    with pytest.raises(ValueError, match="x must be .* unit last stride"):
        op(x.T, ids, w, gate_up, down)
    with pytest.raises(ValueError, match="x must be .*dtype in"):
        op(x.double(), ids, w, gate_up, down)
    with pytest.raises(ValueError, match="top_k_index must be a contiguous \\[4, top_k\\] torch.int64"):
        op(x, ids.int(), w, gate_up, down)
    with pytest.raises(ValueError, match="top_k_weights must be a contiguous \\(4, 2\\) tensor"):
        op(x, ids, w.half(), gate_up, down)
    with pytest.raises(ValueError, match="gate_up_proj must be a contiguous \\[experts, 2 \\* intermediate, 24\\]"):
        op(x, ids, w, gate_up[:, :, :20], down)
    with pytest.raises(ValueError, match="gate_up_proj .* torch.float32"):
        op(x, ids, w, gate_up.half(), down)
    with pytest.raises(ValueError, match="down_proj must be a contiguous \\[8, 24, 16\\]"):
        op(x, ids, w, gate_up, down.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="down_proj must be a contiguous"):
        op(x, ids, w, gate_up, down.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="top_k_index has 9 slots per token, more than the 8 experts"):
        op(x, torch.zeros(4, 9, dtype=torch.int64), torch.rand(4, 9), gate_up, down)
    with pytest.raises(ValueError, match="out must be a contiguous \\(4, 24\\) torch.float32"):
        M.moe_experts_triton(x, ids, w, gate_up, down, out=torch.empty(4, 24).T)
    with pytest.raises(ValueError, match="path must be 'stream' or 'tiled'"):
        M.moe_experts_triton(x, ids, w, gate_up, down, path="dense")


def test_supports():
    assert M.supports(2816, 704, 128, 8, torch.bfloat16)
    assert M.supports(40, 24, 8, 3, torch.float16)
    assert not M.supports(2816, 704, 128, 8, torch.float64)
    assert not M.supports(2816, 704, 4, 8, torch.bfloat16)
    assert not M.supports(2816, 704, M.MAX_EXPERTS + 1, 8, torch.bfloat16)
    assert not M.supports(2816, 704, 128, M.MAX_TOP_K + 1, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------------
# CUDA only: the real widths, CUDA graphs, and eager's order of the sum over k.

REAL = dict(experts=128, inter=704, hidden=2816, top_k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 1024, 4096])
def test_real_widths_against_eager(tokens):
    """Against float64 and the reference (per-expert cuBLAS mm, which splits K at few rows), and against HF's
    "grouped_mm" forward, whose CUTLASS grouped GEMM adds along K in the kernels' order (on an H200, bitwise)."""
    args = _experts_args(tokens, REAL["experts"], REAL["inter"], REAL["hidden"], REAL["top_k"], torch.bfloat16,
                         "cuda")
    _check_kernel(args, None, min_bitwise=0.95)
    with torch.no_grad():
        hf = hf_experts("grouped_mm", args[3], args[4], REAL["top_k"])(*args[:3])
    _assert_close_to_eager(M.moe_experts_triton(*args), hf, min_bitwise=0.99)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_real_widths_in_the_eager_loops_order(tokens):
    """`expert_order` against transformers' "eager" experts loop on CUDA (cuBLAS per expert, bf16 `index_add_`)
    and float64."""
    args = _experts_args(tokens, REAL["experts"], REAL["inter"], REAL["hidden"], REAL["top_k"], torch.bfloat16,
                         "cuda")
    out = M.moe_experts_triton(*args, expert_order=True)
    exact = _float64_experts(*args)
    assert ((out.double() - exact).norm() / exact.norm()).item() <= REL_BOUND[torch.bfloat16]
    with torch.no_grad():
        loop = hf_experts("eager", args[3], args[4], REAL["top_k"])(*args[:3])
    _assert_close_to_eager(out, loop, min_bitwise=0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2, 256])
def test_cuda_graph_replays_any_routing(tokens):
    """One capture, replayed with new routings (all on one expert, then random): the same bits as direct calls."""
    x, ids, weights, gate_up, down = _experts_args(tokens, REAL["experts"], 64, 256, REAL["top_k"], torch.bfloat16,
                                                   "cuda")
    static = [x.clone(), ids.clone(), weights.clone()]
    graph = torch.cuda.CUDAGraph()
    M.moe_experts_triton(*static, gate_up, down)  # compile outside the capture
    with torch.cuda.graph(graph):
        out = M.moe_experts_triton(*static, gate_up, down)
    for routing in ("one", "few", "random"):
        new = _experts_args(tokens, REAL["experts"], 64, 256, REAL["top_k"], torch.bfloat16, "cuda", routing)
        for s, n in zip(static, new):
            s.copy_(n)
        graph.replay()
        assert torch.equal(out, M.moe_experts_triton(*static, gate_up, down)), routing


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [2, 3, 6, 8])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_combine_is_cuda_eagers_sum(top_k, weights_dtype):
    """The combine kernel against `(y * w).sum(dim=1)` as HF computes it, bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(top_k)
    tokens, hidden = 513, 2816
    y = (torch.randn(tokens * top_k, hidden, device="cuda", generator=g) * 100).bfloat16()
    w = torch.rand(tokens, top_k, device="cuda", generator=g).to(weights_dtype)
    want = (y * w.reshape(-1)[:, None]).view(tokens, top_k, hidden).sum(dim=1).bfloat16()
    assert torch.equal(M._combine(y, w, torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")), want)
