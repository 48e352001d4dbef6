"""The fused router ops against eager: Triton kernels (interpreter on CPU, compiled on CUDA), custom ops, fakes."""

import pytest
import torch
import triton
import triton.language as tl

from gemma4_fx.replacements import eager_math
from gemma4_fx.replacements import router as R
from helpers import DEVICES, DTYPES, seeded, ulps


def _router_input_args(rows, hidden, dtype, device, *key):
    g = seeded("input", rows, hidden, dtype, *key)
    row_scale = torch.logspace(-4, 4, rows, dtype=torch.float64)[torch.randperm(rows, generator=g)]
    x = (torch.randn(rows, hidden, generator=g, dtype=torch.float64) * row_scale[:, None]).to(dtype)
    scale = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return x.to(device), scale.to(device), 1e-6, hidden**-0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,row_stride", [(1, 88, 88), (5, 100, 100), (33, 352, 352), (5, 100, 136)])
def test_router_input_kernel(device, dtype, rows, hidden, row_stride):
    wide, scale, eps, root_size = _router_input_args(rows, row_stride, dtype, device)
    x, scale = wide[:, :hidden], scale[:hidden].contiguous()
    out = torch.full((rows, hidden), float("nan"), dtype=dtype, device=device)
    assert R.router_input_triton(x, scale, eps, root_size, out=out) is out
    assert not out.isnan().any()

    # The math in float64, rounding only the input.
    x64 = x.double()
    exact = x64 * (x64.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * scale.double() * root_size
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=0)
    else:
        finfo = torch.finfo(dtype)  # subnormal outputs keep only absolute precision
        torch.testing.assert_close(out.double(), exact, rtol=2 * finfo.eps, atol=finfo.smallest_normal)

    _assert_close_to_eager(out, R.router_input_reference(x, scale, eps, root_size), min_bitwise=0.98)


def _assert_close_to_eager(out, eager, min_bitwise):
    """Eager rounds to x.dtype after each of its three steps, and so does the kernel; only the sum of squares is added
    in another order, which moves the rsqrt factor by a few fp32 ulps. In fp32 that is a few ulps of output; in
    bf16/fp16 it rarely flips the first rounding by one ulp, which each later rounding can grow by one more."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, eager, rtol=2e-6, atol=0)
        return
    apart = ulps(out, eager)
    bitwise = (apart == 0).double().mean().item()
    print(f"router_input {out.dtype}: {bitwise:.6%} bitwise equal to eager, max {apart.max()} ulp")
    assert apart.max() <= 3 and bitwise >= min_bitwise


def _softmax_topk_tie_order(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Expert ids in the order torch.topk returns them on CUDA (sorted=True), read off ATen's kernels.

    The radix select writes the values above the k-th in index order, then the ties at the k-th in index order;
    SmallBitonicSort (k <= 32) then sorts those slots descending with a 32-wide bitonic network, which reorders ties.
    """
    out = []
    for row in probs.tolist():
        kth = sorted(row, reverse=True)[k - 1]
        chosen = [e for e, p in enumerate(row) if p > kth]
        chosen += [e for e, p in enumerate(row) if p == kth][: k - len(chosen)]
        keys = [row[e] for e in chosen] + [0.0] * (32 - k)
        ids = chosen + [-1] * (32 - k)
        for log_size in range(1, 6):
            for stride in (1 << s for s in reversed(range(log_size))):
                for pos in (p for p in range(32) if not p & stride):
                    a, b = pos, pos + stride
                    ascending = bool(pos & (1 << log_size))
                    swap = (keys[a] > keys[b] and ids[a] >= 0) or ids[b] < 0
                    if swap == ascending:
                        keys[a], keys[b], ids[a], ids[b] = keys[b], keys[a], ids[b], ids[a]
        out.append(ids[:k])
    return torch.tensor(out, dtype=torch.int64).reshape(len(out), k)


def _logits(rows, experts, dtype, device, ties, *key):
    g = seeded("logits", rows, experts, dtype, ties, *key)
    if ties:  # few distinct values: ties inside the top-k and across the k-th place
        logits = torch.randint(0, 6, (rows, experts), generator=g) / 4.0
    else:
        logits = torch.randn(rows, experts, generator=g) * torch.logspace(-1, 1, rows)[:, None]
    return logits.to(dtype).to(device)


def _check_select(logits, per_expert_scale, k, weights, ids):
    rows, experts = logits.shape
    assert not weights.isnan().any() and ((ids >= 0) & (ids < experts)).all()
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ref_w, ref_ids = R.router_select_reference(logits, per_expert_scale, k)
    topk_values = torch.topk(probs, k, dim=-1).values

    # Same probabilities, in torch.topk's order; on CUDA the very ids of torch.topk, on CPU (where ties come out of
    # std::nth_element in no defined order) the ids CUDA's kernels give.
    assert torch.equal(probs.gather(1, ids), topk_values)
    assert torch.equal(ids.cpu(), _softmax_topk_tie_order(probs.cpu(), k))
    untied = (topk_values[:, :-1] > topk_values[:, 1:]).all(-1)
    if k < experts:
        untied &= topk_values[:, -1] > probs.topk(k + 1, dim=-1).values[:, -1]
    if logits.is_cuda:
        assert torch.equal(ids, ref_ids)
    else:
        assert torch.equal(ids[untied], ref_ids[untied])

    # Weights: on CUDA eager's bit for bit; on CPU (other exp, other sums) to fp32 rounding. And against float64.
    same = (ids == ref_ids).all(-1)
    if logits.is_cuda:
        assert torch.equal(weights, ref_w)
    torch.testing.assert_close(weights[same], ref_w[same], rtol=1e-6, atol=1e-7)
    p64 = torch.softmax(logits.double(), dim=-1).gather(1, ids)
    exact = p64 / p64.sum(-1, keepdim=True) * per_expert_scale.double()[ids]
    torch.testing.assert_close(weights.double(), exact, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,experts,k", [(1, 20, 4), (5, 37, 8), (33, 128, 8), (33, 128, 1), (5, 16, 16), (7, 64, 3),
                                            (9, 512, 32)])
@pytest.mark.parametrize("ties", [False, True])
def test_router_select_kernel(device, dtype, rows, experts, k, ties):
    logits = _logits(rows, experts, dtype, device, ties)
    g = seeded("per_expert_scale", experts, dtype)
    per_expert_scale = (1 + 0.1 * torch.randn(experts, generator=g)).to(dtype).to(device)
    out = (torch.full((rows, k), float("nan"), device=device), torch.full((rows, k), -1, device=device))
    weights, ids = R.router_select_triton(logits, per_expert_scale, k, out=out)
    assert weights is out[0] and ids is out[1]
    _check_select(logits, per_expert_scale, k, weights, ids)


@pytest.mark.parametrize("device", DEVICES)
def test_router_select_engineered_ties(device):
    """Ties at the k-th / (k+1)-th place, inside the top-k, and across the whole row; 37 experts leave padding lanes."""
    experts, k = 37, 8
    rows = torch.full((6, experts), -2.0)
    rows[0, [3, 9, 30, 31]] = 1.0  # four-way tie at places 7-10, winners by lowest index
    rows[0, [1, 2, 5, 7, 8, 11]] = torch.tensor([3.0, 3.0, 2.5, 2.5, 2.5, 2.0])
    rows[1, [36, 0, 18, 17]] = 4.0  # a tie inside the top-k, at both ends of the row
    rows[1, [20, 21, 22, 23]] = 1.0
    rows[2] = 0.5  # every expert tied
    rows[3, ::2] = 1.0  # ties across the k-th place
    rows[4] = torch.arange(experts) % 3  # many small tie groups
    rows[5, [35, 36]] = 7.0
    rows[5, [0, 1, 2, 3, 4, 5, 6]] = 6.0  # k-th place tie after a leading pair
    per_expert_scale = torch.linspace(0.5, 1.5, experts)
    for dtype in DTYPES:
        logits = rows.to(dtype).to(device)
        scale = per_expert_scale.to(dtype).to(device)
        weights, ids = R.router_select_triton(logits, scale, k)
        _check_select(logits, scale, k, weights, ids)
        assert sorted(ids[0, -2:].tolist()) == [3, 9]  # the lowest indices win the k-th place
        assert sorted(ids[2].tolist()) == list(range(k))


def test_custom_ops_on_cpu_are_the_reference():
    x, scale, eps, root_size = _router_input_args(5, 100, torch.bfloat16, "cpu")
    h = torch.ops.gemma4_fx.router_input(x, scale, eps, root_size, False)
    assert torch.equal(h, R.router_input_reference(x, scale, eps, root_size))
    logits = _logits(5, 37, torch.bfloat16, "cpu", False)
    per_expert_scale = torch.rand(37).to(torch.bfloat16)
    got = torch.ops.gemma4_fx.router_select(logits, per_expert_scale, 8)
    want = R.router_select_reference(logits, per_expert_scale, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    wide, scale, eps, root_size = _router_input_args(5, 136, dtype, "cpu")
    for x in (wide[:, :100], wide[:, :100].contiguous()):
        torch.library.opcheck(torch.ops.gemma4_fx.router_input.default, (x, scale[:100].contiguous(), eps, root_size,
                                                                          False))
    logits = _logits(5, 37, dtype, "cpu", False)
    torch.library.opcheck(torch.ops.gemma4_fx.router_select.default, (logits, torch.rand(37).to(dtype), 4))


def test_fake_with_symbolic_tokens():
    def router(x, scale, proj, per_expert_scale):
        h = torch.ops.gemma4_fx.router_input(x, scale, 1e-6, 88**-0.5, False)
        return torch.ops.gemma4_fx.router_select(h @ proj.T, per_expert_scale, 4)

    compiled = torch.compile(router, backend="aot_eager", dynamic=True, fullgraph=True)
    proj, scale, per_expert_scale = torch.randn(20, 88), torch.rand(88), torch.rand(20)
    for rows in (3, 7):
        x = torch.randn(rows, 88)
        got, want = compiled(x, scale, proj, per_expert_scale), router(x, scale, proj, per_expert_scale)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_arguments_name_the_argument():
    x, scale = torch.randn(4, 8), torch.rand(8)
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.gemma4_fx.router_input(x[None], scale, 1e-6, 1.0, False)
    with pytest.raises(ValueError, match="x must be .* unit last stride"):
        torch.ops.gemma4_fx.router_input(x.T, torch.rand(4), 1e-6, 1.0, False)
    with pytest.raises(ValueError, match="scale must be a contiguous \\[8\\] torch.float32"):
        torch.ops.gemma4_fx.router_input(x, scale.half(), 1e-6, 1.0, False)
    with pytest.raises(ValueError, match="per_expert_scale must be a contiguous \\[8\\]"):
        torch.ops.gemma4_fx.router_select(x, torch.rand(7), 2)
    with pytest.raises(ValueError, match="k must be in \\[1, 8\\]"):
        torch.ops.gemma4_fx.router_select(x, torch.rand(8), 9)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        torch.ops.gemma4_fx.router_select(x.int(), torch.rand(8), 2)
    with pytest.raises(ValueError, match="at most 1024 experts and k <= 32"):
        R.router_select_triton(torch.randn(2, 64), torch.rand(64), 33)


def test_supports():
    assert R.supports(2816, 128, 8, torch.bfloat16)
    assert R.supports(8192, 512, 32, torch.float16)
    assert not R.supports(2816, 128, 8, torch.float64)
    assert not R.supports(R.MAX_HIDDEN + 1, 128, 8, torch.bfloat16)
    assert not R.supports(2816, 2048, 8, torch.bfloat16)
    assert not R.supports(2816, 128, 33, torch.bfloat16)
    assert not R.supports(2816, 4, 8, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------------
# CUDA only: the real router, many tokens, against eager on the same device.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_router_matches_eager_on_many_tokens(dtype):
    torch.manual_seed(0)
    rows, hidden, experts, k = 3 * 4096, 2816, 128, 8
    x = torch.randn(rows, hidden, device="cuda") * torch.logspace(-2, 2, rows, device="cuda")[:, None]
    x = x.to(dtype)
    scale = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    proj = (torch.randn(experts, hidden, device="cuda") * hidden**-0.5).to(dtype)
    per_expert_scale = (1 + 0.1 * torch.randn(experts, device="cuda")).to(dtype)

    h = torch.ops.gemma4_fx.router_input(x, scale, 1e-6, hidden**-0.5, False)
    _assert_close_to_eager(h, R.router_input_reference(x, scale, 1e-6, hidden**-0.5), min_bitwise=0.9999)

    logits = torch.mm(h, proj.T)
    weights, ids = torch.ops.gemma4_fx.router_select(logits, per_expert_scale, k)
    eager_w, eager_ids = R.router_select_reference(logits, per_expert_scale, k)
    print(f"router_select {dtype}: ids equal on {(ids == eager_ids).all(-1).double().mean():.4%} of tokens, "
          f"weights bitwise equal {(weights == eager_w).double().mean():.4%}")
    assert torch.equal(ids, eager_ids) and torch.equal(weights, eager_w)


def _halves_tree(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim adding element j to j + n/2 first, then halving again."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


@pytest.mark.gpu
def test_eager_summation_orders():
    """The orders router_select copies are eager's: softmax_warp_forward's per-lane sums and xor butterfly, and the
    halves-first tree of ATen's reduce for w.sum(-1), with lanes holding slots j and j + last_pow2(k)."""
    torch.manual_seed(0)
    logits = torch.randn(4096, 128, device="cuda") * 3
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    lanes = e.view(-1, 4, 32)
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(e / _halves_tree(((lanes[:, 0] + lanes[:, 1]) + lanes[:, 2]) + lanes[:, 3])[:, None], probs)
    for k in (8, 6, 3):
        w = probs.topk(k).values
        width = 1 << (k.bit_length() - 1)
        folded = torch.nn.functional.pad(w, (0, 2 * width - k)).view(-1, 2, width).sum(1)
        assert torch.equal(_halves_tree(folded), w.sum(-1)), k


@triton.jit
def _exp_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, eager_math.exp(tl.load(x_ptr + offsets, mask=offsets < n)), mask=offsets < n)


@pytest.mark.gpu
def test_exp_is_eagers_expf_where_its_result_is_normal():
    """The kernels' exp (libdevice __nv_expf) is bit for bit the expf of eager's softmax wherever that is a normal
    float; where expf's result is subnormal (x below about -87.34) ours is another value below 2**-126 (Triton links
    libdevice flushing subnormals)."""
    x = torch.cat([torch.linspace(-104, 89, 1 << 22, device="cuda"), torch.randn(1 << 20, device="cuda")])
    y = torch.empty_like(x)
    _exp_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = torch.exp(x)
    normal = want >= 2.0 ** -126
    assert torch.equal(y[normal], want[normal])
    assert ((y[~normal] >= 0) & (y[~normal] < 2.0 ** -126)).all()
