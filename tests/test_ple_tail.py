"""The fused PLE-tail ops against eager and float64: Triton kernels (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch

import gemma4_fx
from gemma4_fx.replacements.rows import rms_norm
from gemma4_fx.replacements import ple_tail as P
from helpers import DEVICES, DTYPES, seeded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,row_stride", [(1, 88, 88), (5, 104, 104), (3, 1536, 1600), (2, 2560, 2560)])
@pytest.mark.parametrize("with_scale", [False, True])
def test_norm_add_kernel(device, dtype, rows, hidden, row_stride, with_scale):
    g = seeded("norm_add", rows, hidden, dtype, with_scale)
    x = (torch.randn(rows, row_stride, generator=g) * 3).to(dtype).to(device)[:, :hidden]
    residual = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(device)
    scale = torch.tensor([0.75], dtype=dtype, device=device) if with_scale else None
    out = torch.full((rows, hidden), float("nan"), dtype=dtype, device=device)
    assert P.norm_add_triton(x, residual, weight, scale, 1e-6, out=out) is out
    eager = P.norm_add_reference(x, residual, weight, scale, 1e-6)
    x64 = x.double()
    exact = residual.double() + x64 * (x64.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * weight.double()
    exact = exact if scale is None else exact * scale.double()
    ours, theirs = (out.double() - exact).abs().max().item(), (eager.double() - exact).abs().max().item()
    print(f"norm_add {dtype} {rows}x{hidden}: max |ours - f64| {ours:.3g}, |eager - f64| {theirs:.3g}")
    if dtype == torch.float32:
        torch.testing.assert_close(out, eager, rtol=2e-6, atol=1e-6)
    else:  # one rounding step apart at most where the fp32 rstd differs in its last bits
        torch.testing.assert_close(out, eager, rtol=2 * torch.finfo(dtype).eps, atol=0)
        assert ours <= 1.5 * theirs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 12), (7, 256), (33, 100)])
def test_gate_kernel(device, dtype, rows, cols):
    g = seeded("gate", rows, cols, dtype)
    gate = (torch.randn(rows, cols, generator=g) * 3).to(dtype).to(device)
    pli = torch.randn(rows, 2 * cols, generator=g).to(dtype).to(device)[:, :cols]
    out = torch.full((rows, cols), float("nan"), dtype=dtype, device=device)
    assert P.gate_triton(gate, pli, out=out) is out
    eager = P.gate_reference(gate, pli)
    if dtype == torch.float32:
        torch.testing.assert_close(out, eager, rtol=4e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out, eager, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_take_rows_in_any_leading_shape(device, dtype):
    """As the pattern calls them: [batch, seq, H] activations beside the GEMMs' [tokens, H] (a transposed one too,
    which the kernel reads through a copy); results shaped as the residual (norm_add) and the gate (gate)."""
    g = seeded("leading shapes", dtype)
    x = torch.randn(6, 88, generator=g).to(dtype).to(device)
    residual = torch.randn(2, 3, 88, generator=g).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(88, generator=g)).to(dtype).to(device)
    scale = torch.tensor([0.75], dtype=dtype, device=device)
    for a, b in ((x, residual), (residual, x), (residual.transpose(0, 1), x)):
        out = P.norm_add_triton(a, b, weight, scale, 1e-6)
        assert out.shape == b.shape
        torch.testing.assert_close(out, P.norm_add_reference(a.reshape(b.shape), b, weight, scale, 1e-6),
                                   rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    gate, pli = torch.randn(6, 12, generator=g).to(dtype).to(device), torch.randn(2, 3, 12, generator=g).to(dtype)
    out = P.gate_triton(gate, pli.to(device))
    assert out.shape == gate.shape
    torch.testing.assert_close(out, P.gate_reference(gate, pli.to(device).reshape(6, 12)),
                               rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_custom_ops_and_errors():
    x, r, w = torch.randn(3, 88), torch.randn(3, 88), torch.rand(88)
    assert torch.equal(torch.ops.gemma4_fx.ple_norm_add(x, r, w, None, 1e-6), P.norm_add_reference(x, r, w, None, 1e-6))
    torch.library.opcheck(torch.ops.gemma4_fx.ple_norm_add.default, (x, r, w, torch.ones(1), 1e-6))
    torch.library.opcheck(torch.ops.gemma4_fx.ple_gate.default, (torch.randn(3, 12), torch.randn(3, 12)))
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.gemma4_fx.ple_norm_add(x, r, torch.rand(87), None, 1e-6)
    with pytest.raises(ValueError, match="per_layer_input must hold 3 rows of 12"):
        torch.ops.gemma4_fx.ple_gate(torch.randn(3, 12), torch.randn(3, 13))


class PLETail(torch.nn.Module):
    """The PLE tail as `Gemma4TextDecoderLayer.forward` computes it; `leak_h` also returns an intermediate."""

    def __init__(self, hidden=88, ple=12, leak_h=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_ff, self.w_ple = (torch.nn.Parameter(1 + 0.1 * torch.randn(hidden, generator=g)) for _ in range(2))
        self.gate = torch.nn.Parameter(torch.randn(ple, hidden, generator=g) * hidden**-0.5)
        self.proj = torch.nn.Parameter(torch.randn(hidden, ple, generator=g) * ple**-0.5)
        self.register_buffer("layer_scalar", torch.tensor([0.75]))
        self.leak_h = leak_h

    def forward(self, mlp_out, residual, per_layer_input):
        h = residual + rms_norm(mlp_out, self.w_ff, 1e-6)
        g = torch.nn.functional.gelu(torch.nn.functional.linear(h, self.gate), approximate="tanh") * per_layer_input
        out = (h + rms_norm(torch.nn.functional.linear(g, self.proj), self.w_ple, 1e-6)) * self.layer_scalar
        return (out, h) if self.leak_h else out


def _tail_inputs(dtype, tokens=6, hidden=88, ple=12):
    g = torch.Generator().manual_seed(tokens)
    return [(torch.randn(1, tokens, width, generator=g) * scale).to(dtype)
            for width, scale in ((hidden, 3.0), (hidden, 1.0), (ple, 1.0))]


@pytest.mark.parametrize("dtype,leak_h,matches,reason", [
    (torch.float32, False, 1, None),
    (torch.bfloat16, False, 1, None),
    (torch.float64, False, 0, "torch.float64 rows of 88 are outside the kernels' range"),
    (torch.float32, True, 0, None),  # h has a user outside the tail: the pattern does not apply
])
def test_pattern_rewrites_only_what_it_can(dtype, leak_h, matches, reason):
    module = PLETail(leak_h=leak_h).to(dtype)
    args = _tail_inputs(dtype)
    backend = gemma4_fx.Gemma4Backend(patterns=["ple_tail"])
    with torch.no_grad():
        expected, out = module(*args), torch.compile(module, backend=backend)(*args)
    assert backend.report.counts["ple_tail"] == matches
    reasons = [skip.reason for skip in backend.report.skipped]
    assert len(reasons) == (reason is not None) and all(r.startswith(reason) for r in reasons), reasons
    for o, e in zip(out if leak_h else [out], expected if leak_h else [expected]):
        torch.testing.assert_close(o, e, rtol=0 if dtype == torch.bfloat16 else 2e-6, atol=1e-6)
