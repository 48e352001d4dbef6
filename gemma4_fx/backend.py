"""`Gemma4Backend`: a torch.compile backend that is Inductor with the gemma4_fx rewrites installed.

    compiled = torch.compile(model, backend=gemma4_fx.gemma4_backend)
    compiled(input_ids)
    print(gemma4_fx.gemma4_backend.report)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch._inductor.compile_fx import compile_fx

from .passes.pipeline import Gemma4Passes
from .report import Report, describe_error
from .runtime.verify import VerifiedGraph

log = logging.getLogger("gemma4_fx")

_VERIFY_ACTIONS = ("warn", "raise")
_DYNAMO_CONTROL_FLOW = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)


class Gemma4Backend:
    """torch.compile backend: Dynamo's graph is lowered by Inductor (`compile_fx`) with `Gemma4Passes` installed
    as its post-grad custom pass.

    Args:
        patterns: rewrites to run (default: all; see `gemma4_fx.PATTERNS`).
        verify: on the first call of each compiled graph, also run it eagerly and compare every output
            (`report.verify`); differences beyond `verify_tolerance` warn or raise (`verify_action`).
        verify_action: "warn" or "raise".
        verify_tolerance: max |out - eager| / max |eager| allowed per float output (default: by dtype).
        dump_dir: write each graph's Dynamo code and its post-grad code before/after the passes there.
        router_exact: see `Gemma4Passes`.
        emulate_precision_casts: Inductor rounds bf16/fp16 intermediates where eager does (Inductor's own default keeps
            them in fp32, which changes results: 3.8% of bf16 tokens pick other experts at 26B-A4B widths). On by
            default: compiled results should be eager's results.
        fx_graph_cache: Inductor's FX graph cache skips the passes on a hit, so the report would miss those graphs;
            it is off unless you ask for it.
    """

    def __init__(self, patterns=None, *, verify: bool = False, verify_action: str = "warn",
                 verify_tolerance: float | None = None, dump_dir: str | Path | None = None,
                 router_exact: bool = False, emulate_precision_casts: bool = True, fx_graph_cache: bool = False):
        if verify_action not in _VERIFY_ACTIONS:
            raise ValueError(f"verify_action: expected one of {_VERIFY_ACTIONS}, got {verify_action!r}")
        if verify_tolerance is not None and not verify_tolerance > 0:
            raise ValueError(f"verify_tolerance: expected a positive float or None, got {verify_tolerance!r}")
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.passes = Gemma4Passes(patterns, router_exact=router_exact, dump_dir=self.dump_dir)
        self.verify, self.verify_action, self.verify_tolerance = bool(verify), verify_action, verify_tolerance
        self.inductor_config = {"emulate_precision_casts": bool(emulate_precision_casts),
                                "fx_graph_cache": bool(fx_graph_cache)}
        self.graph_reports: dict[str, Report] = {}

    @property
    def report(self) -> Report:
        """Every graph compiled through this backend, merged; per graph in `graph_reports`."""
        return Report.merged(self.graph_reports.values())

    def __deepcopy__(self, memo):
        # HF's CompileConfig deep-copies its fields; the copy would collect the reports the user reads here.
        return self

    def reset(self) -> None:
        """Forget the reports (compiled graphs stay compiled)."""
        self.graph_reports.clear()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                 options: dict | None = None):
        """Called by torch.compile; `mode` and `options` are torch.compile's, applied to Inductor's config
        (HF generate passes `mode="reduce-overhead"`: Inductor's CUDA graphs)."""
        graph_name = f"graph_{len(self.graph_reports)}"
        report = self.graph_reports[graph_name] = Report(self.passes.patterns)
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{graph_name}.dynamo.py").write_text(gm.code)
        config = {**self.inductor_config, **(torch._inductor.list_mode_options(mode) if mode else {}),
                  **(options or {})}
        compiled = self._compile(gm, example_inputs, graph_name, report, config)
        if self.verify:
            return VerifiedGraph(compiled, gm, graph_name, report, action=self.verify_action,
                                 tolerance=self.verify_tolerance)
        return compiled

    def _compile(self, gm, example_inputs, graph_name: str, report: Report, config: dict):
        try:
            with self.passes.recording(graph_name, report), \
                    torch._functorch.config.patch(enable_autograd_cache=config["fx_graph_cache"]):
                return compile_fx(gm, example_inputs, config_patches={**config, "post_grad_custom_post_pass": self.passes})
        except _DYNAMO_CONTROL_FLOW:  # Dynamo asks to re-trace (e.g. to specialise floats): not a failure
            del self.graph_reports[graph_name]
            raise
        except Exception as error:  # our rewrites must never cost the user their compile
            message = f"{graph_name}: compile with gemma4_fx passes failed ({describe_error(error)}); " \
                      "compiled with plain Inductor instead"
            warnings.warn(f"gemma4_fx: {message}", stacklevel=2)
            log.warning(message, exc_info=True)
            report.matches.clear()
            report.skipped.clear()
            report.fallbacks.append(message)
            return compile_fx(gm, example_inputs, config_patches=config)


gemma4_backend = Gemma4Backend()
