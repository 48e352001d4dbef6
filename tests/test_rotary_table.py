"""rotary_table: a cos or sin table that several layers read is stored once, and Inductor's code then computes it in
one kernel, not in every layer's; values unchanged. (Other families' tables: test_models.py.)"""

import re

import torch
from torch._inductor.utils import run_and_get_code

import gemma4_fx
from gemma4_fx import Gemma4Backend, PATTERNS


def _prefill(model, backend, length=24, dynamic=None):
    """(compiled last-token logits, eager's, Inductor's generated code) of a prefill of `length` tokens."""
    ids = torch.randint(3, 400, (1, length), generator=torch.Generator().manual_seed(length))
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        logits, code = run_and_get_code(lambda: compiled(ids, logits_to_keep=1, use_cache=True).logits)
        expected = model(ids, logits_to_keep=1, use_cache=True).logits
    return logits, expected, "\n".join(code)


def _tables(model) -> int:
    """cos and sin of each rotary embedding (one per layer type)."""
    return 2 * len(set(model.config.layer_types))


def _cos_calls(code: str) -> int:
    return len(re.findall(r"\bcos\(", code))


def test_tables_stored_once():
    """tiny-e4b's two rotary embeddings (sliding and full layers), cos and sin each: four tables, each read by the
    layers of its kind. Stored, their cos appears in the code once per table's kernel, where without the pass every
    layer's q/k kernel computes it."""
    model = gemma4_fx.build_model("tiny-e4b")
    backend = Gemma4Backend(cudagraphs=None)
    logits, expected, code = _prefill(model, backend)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert backend.report.counts["rotary_table"] == _tables(model), backend.report
    assert {match.location for match in backend.report.matches if match.pattern == "rotary_table"} == {
        "model.rotary_emb"}
    without = Gemma4Backend([name for name in PATTERNS if name != "rotary_table"], cudagraphs=None)
    torch._dynamo.reset()
    *_, code_without = _prefill(model, without)
    assert 0 < _cos_calls(code) < _cos_calls(code_without), (_cos_calls(code), _cos_calls(code_without))


def test_dynamic_prompt_length():
    """A symbolic prompt length: the table's strides are read in the graph; one graph serves both lengths."""
    backend = Gemma4Backend(cudagraphs=None)
    model = gemma4_fx.build_model("tiny-e4b")
    for length in (24, 17):
        logits, expected, _ = _prefill(model, backend, length, dynamic=True)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert len(backend.report.graphs) == 1 and not backend.report.fallbacks, backend.report
    assert backend.report.counts["rotary_table"] == _tables(model)


def test_a_table_read_once_is_left_alone():
    """A sin that one node reads has nothing to share: the graph keeps it inline."""
    backend = Gemma4Backend(cudagraphs=None)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    out = torch.compile(lambda x, y: torch.sin(x) * 2.0 * y, backend=backend)(x, y)
    torch.testing.assert_close(out, torch.sin(x) * 2.0 * y)
    assert backend.report.counts["rotary_table"] == 0 and not backend.report.fallbacks
