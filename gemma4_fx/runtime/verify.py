"""Verify mode: on the first call of a compiled graph, run the graph eagerly beside it and compare every output.

Eager, not plain Inductor, is the reference: it is what the model means, and plain Inductor itself changes bf16
results (it keeps intermediates in fp32), so a difference against it would not tell the user whether we broke
something. Inputs the graph may mutate (caches) are cloned for the eager run; parameters are shared.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.utils._pytree as pytree

from ..report import Report, VerifyResult

log = logging.getLogger("gemma4_fx")

# Largest allowed max|out - ref| / max|ref| per output dtype: compiled code may reorder float sums (float64 graphs
# often hold float32 islands, e.g. a softmax with dtype=float32).
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class VerificationError(AssertionError):
    """A rewritten graph's output differs from eager beyond the tolerance."""


def compare(graph_name: str, outputs, expected, tolerance: float | None) -> list[VerifyResult]:
    results = []
    for index, (out, ref) in enumerate(zip(pytree.tree_leaves(outputs), pytree.tree_leaves(expected))):
        if not isinstance(ref, torch.Tensor):
            continue
        if not ref.is_floating_point():
            mismatched = int((out != ref).sum())
            results.append(VerifyResult(graph_name, index, float(mismatched > 0), float(mismatched > 0),
                                        mismatched, mismatched == 0))
            continue
        out64, ref64 = out.detach().double(), ref.detach().double()
        diff = (out64 - ref64).abs()
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        max_abs = diff.max().item() if diff.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        tol = DEFAULT_TOLERANCE.get(ref.dtype, 1e-4) if tolerance is None else tolerance
        mismatched = int((diff > tol * max(scale, 1e-30)).sum()) + int(torch.isnan(out64).ne(torch.isnan(ref64)).sum())
        results.append(VerifyResult(graph_name, index, max_abs, max_rel, mismatched, mismatched == 0))
    return results


class VerifiedGraph:
    """Wraps a compiled graph; the first call is checked against `reference` (the Dynamo graph, run eagerly)."""

    def __init__(self, compiled, reference: torch.fx.GraphModule, graph_name: str, report: Report, *,
                 action: str, tolerance: float | None):
        self.compiled, self.reference = compiled, reference
        self.graph_name, self.report = graph_name, report
        self.action, self.tolerance = action, tolerance
        self.checked = False

    def __call__(self, *args):
        if self.checked:
            return self.compiled(*args)
        self.checked = True
        reference_args = [a.clone() if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter) else a
                          for a in args]
        expected = self.reference(*reference_args)
        outputs = self.compiled(*args)
        results = compare(self.graph_name, outputs, expected, self.tolerance)
        self.report.verify += results
        failed = [r for r in results if not r.ok]
        for r in results:
            log.info("verify %s output %d: max abs %.3g, max rel %.3g, mismatched %d", r.graph, r.output,
                     r.max_abs, r.max_rel, r.mismatched)
        if failed:
            message = (f"gemma4_fx verify: {self.graph_name}: {len(failed)} output(s) differ from eager: "
                       + "; ".join(f"output {r.output}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, "
                                   f"{r.mismatched} mismatched" for r in failed))
            if self.action == "raise":
                raise VerificationError(message)
            warnings.warn(message, stacklevel=2)
        return outputs
