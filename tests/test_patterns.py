"""What holds for every pattern: a fixed run order, distinct float stand-ins, one rule per op in YOCO's registry."""

import pytest
import torch

import gemma4_fx
from gemma4_fx.passes import row_local
from gemma4_fx.patterns.matcher_utils import STAND_INS


def test_stand_ins_are_distinct():
    """A stand-in equal to another pattern's, or to a literal of the math, would let a pattern match a constant."""
    values = [value for table in STAND_INS.values() for value in table.values()]
    assert len(set(values)) == len(values)
    literals = {0.5, -0.5, 1.0, 2.0, 3.0, 0.044715, 0.7978845608028654, 1e-6}
    assert not literals & set(values)
    assert set(STAND_INS) <= set(gemma4_fx.PATTERNS)


def test_patterns_run_in_registry_order():
    for names in (["post_attn_norm", "router"], ["ple_tail", "router", "post_attn_norm"]):
        assert gemma4_fx.Gemma4Passes(names).patterns == tuple(name for name in gemma4_fx.PATTERNS if name in names)


def test_any_order_of_names_gives_the_same_rewrites():
    """post_attn_norm's MoE variant consumes the router rewrite's op: named first, it must still run second."""
    model = gemma4_fx.build_model("tiny-26b-a4b", num_hidden_layers=1)
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    found = []
    for names in (["router", "post_attn_norm"], ["post_attn_norm", "router"]):
        torch._dynamo.reset()
        backend = gemma4_fx.Gemma4Backend(names)
        with torch.no_grad():
            torch.compile(model, backend=backend)(ids, use_cache=False)
        found.append(sorted((m.pattern, m.location) for m in backend.report.matches))
    assert found[0] == found[1] == [("post_attn_norm", "model.layers.0"), ("router", "model.layers.0.router")]


def test_rows_rules_are_one_per_op():
    with pytest.raises(ValueError, match="'linear' already has a rule"):
        row_local.rows_rule("linear")(lambda node, dim: None)
