"""The fused post-attention norm op against eager and float64 (Triton interpreter on CPU), and its pattern."""

import pytest
import torch

import gemma4_fx
from gemma4_fx.replacements import post_attn_norm as N
from helpers import DEVICES, seeded

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _args(rows, hidden, dtype, device, variant):
    g = seeded("post_attn", rows, hidden, dtype, variant)
    attn = torch.randn(1, rows, hidden, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, rows)[:, None]
    residual = torch.randn(1, rows, hidden, generator=g, dtype=torch.float64) * 4
    weights = [(1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(device) for _ in range(4)]
    moe = weights[2] if variant != "dense" else None
    scale = weights[3] if variant == "moe_router" else None
    eps = [1e-6] * (2 + (moe is not None) + (scale is not None))
    return (attn.to(dtype).to(device), residual.to(dtype).to(device), weights[0], weights[1], eps, moe, scale,
            hidden**-0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [88, 352])
@pytest.mark.parametrize("variant", ["dense", "moe", "moe_router"])
def test_kernel_against_eager_and_float64(device, dtype, hidden, variant):
    args = _args(5, hidden, dtype, device, variant)
    want = N.post_attn_norm_reference(*args)
    out = [torch.full_like(w, float("nan")) for w in want]
    got = N.post_attn_norm_triton(*args, out=out)
    assert all(g is o for g, o in zip(got, out)) and not any(g.isnan().any() for g in got)
    args64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    exact = N.post_attn_norm_reference(*args64)
    for name, g, w, e in zip(["h", "ff_in", "moe_in", "router_in"], got, want, exact):
        ours, eager = (g.double() - e).abs().max().item(), (w.double() - e).abs().max().item()
        print(f"{variant} {dtype} {name}: max |ours - f64| {ours:.3g}, |eager - f64| {eager:.3g}")
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=4e-6, atol=1e-6)
        else:
            assert ours <= 2 * eager + 1e-12


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(2, 8), torch.rand(8)
    with pytest.raises(ValueError, match="residual"):
        torch.ops.gemma4_fx.post_attn_norm(x, x[:, :4], w, w, [1e-6, 1e-6])
    with pytest.raises(ValueError, match="pre_weight"):
        torch.ops.gemma4_fx.post_attn_norm(x, x, w, torch.rand(7), [1e-6, 1e-6])
    with pytest.raises(ValueError, match="eps"):
        torch.ops.gemma4_fx.post_attn_norm(x, x, w, w, [1e-6])


def test_moe_model_rewritten_per_layer():
    model = gemma4_fx.build_model("tiny-26b-a4b", dtype=torch.bfloat16, num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    backend = gemma4_fx.Gemma4Backend()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    assert backend.report.counts["post_attn_norm"] == 2 and backend.report.counts["router"] == 2
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("preset,overrides", [("tiny-e2b", {"num_hidden_layers": 3}),
                                              ("tiny-31b", {"num_hidden_layers": 2})])
def test_dense_models_rewritten_per_layer_and_float64_left_alone(preset, overrides):
    counts, reasons = {}, {}
    for dtype in (torch.float32, torch.float64):
        model = gemma4_fx.build_model(preset, dtype=dtype, **overrides)
        ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
        backend = gemma4_fx.Gemma4Backend(patterns=["post_attn_norm"])
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
            logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        counts[dtype] = backend.report.counts["post_attn_norm"]
        reasons[dtype] = {skip.reason.split(" (")[0] for skip in backend.report.skipped}
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert counts == {torch.float32: model.config.num_hidden_layers, torch.float64: 0}
    assert reasons == {torch.float32: set(),
                       torch.float64: {f"torch.float64 rows of {model.config.hidden_size} are outside the kernel's range"}}
