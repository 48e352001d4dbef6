"""gemma4_fx in vLLM: `Gemma4VllmPass`, the rewrites as a post-grad pass vLLM's pass manager takes as it is.

    LLM(model, compilation_config={"inductor_compile_config": {"post_grad_custom_post_pass": Gemma4VllmPass()}})
    LLM(model, compilation_config={"inductor_passes": {"post_grad_custom_post_pass":
                                                       "gemma4_fx.integrations.vllm.vllm_pass"}})

vLLM adds the pass to its own post-grad pass manager, which runs it before its IR lowering: the norms arrive as
`vllm_ir::rms_norm` ops (matched by op, `rms_norm_ops`), linears as aten `mm` (GPU) or vLLM's CPU GEMM ops, which
write into their output and are not matched. vLLM copies the config into its engine process, so the report is
written where the caller can read it after the engine ran: the `gemma4_fx` logger (INFO, per graph) and, with
`report_path`, a file rewritten after every graph. A compile that hits vLLM's or Inductor's cache skips the passes
and adds nothing to the report.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import vllm

from ..passes.pipeline import Gemma4Passes
from ..report import Report, describe_error, record_fallback

SUPPORTED = ((0, 32), (0, 33))  # vLLM versions whose pass manager this was built against: 0.32.x (tested)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


if not SUPPORTED[0] <= _release(vllm.__version__) < SUPPORTED[1]:
    raise ImportError(f"gemma4_fx.integrations.vllm supports vLLM >= {'.'.join(map(str, SUPPORTED[0]))}, < "
                      f"{'.'.join(map(str, SUPPORTED[1]))}; found vLLM {vllm.__version__}")

from vllm.compilation.passes.inductor_pass import InductorPass  # noqa: E402  (where 0.32 keeps it)

log = logging.getLogger("gemma4_fx")
VLLM_RMS_NORM_OPS = ("vllm_ir::rms_norm",)


class Gemma4VllmPass(InductorPass):
    """`Gemma4Passes` as a vLLM `InductorPass`: its `uuid()` is `Gemma4Passes.uuid()` (our sources and options), so
    vLLM's compile cache stays correct.

    Args:
        patterns, router_exact, linear_ops, dump_dir: as `Gemma4Passes`.
        rms_norm_ops: vLLM's norm op by default.
        report_path: file the merged report (`str(Report)`) is written to after every graph, from whichever process
            compiles; default `$GEMMA4_FX_REPORT` as the compiling process sees it (for the pass named by string).
    """

    def __init__(self, patterns=None, *, router_exact: bool = False, rms_norm_ops=VLLM_RMS_NORM_OPS, linear_ops=(),
                 dump_dir: str | os.PathLike | None = None, report_path: str | os.PathLike | None = None):
        if report_path is not None and not isinstance(report_path, (str, os.PathLike)):
            raise TypeError(f"report_path: expected a path or None, got {report_path!r}")
        self.passes = Gemma4Passes(patterns, router_exact=router_exact, rms_norm_ops=rms_norm_ops,
                                   linear_ops=linear_ops, dump_dir=dump_dir)
        self.report_path = None if report_path is None else Path(report_path)

    @property
    def report(self) -> Report:
        """The graphs this process compiled (vLLM compiles in its engine process: read `report_path` there)."""
        return self.passes.report

    def __call__(self, graph) -> None:
        try:  # patterns already never raise (`Gemma4Passes`); nothing of ours may stop the engine's start-up
            self.passes(graph)
        except Exception as error:
            record_fallback(self.passes.reports[-1].fallbacks, f"gemma4_fx passes failed ({describe_error(error)}); "
                                                               "the graph goes on with the rewrites made before")
        log.info("gemma4_fx on a vLLM graph: %s", self.passes.reports[-1].counts)
        path = self.report_path or os.environ.get("GEMMA4_FX_REPORT")
        if path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(f"{self.report}\n")
            except OSError as error:
                log.warning("gemma4_fx: cannot write the report to %s (%s)", path, error)

    def uuid(self) -> str:
        return self.passes.uuid()


# For `inductor_passes` by name. vLLM resolves "a.b.c.name" as `__import__("a.b.c").__dict__["name"]`, and
# `__import__` returns the top package: the name must be found in `gemma4_fx` itself once this module is imported.
vllm_pass = Gemma4VllmPass()
setattr(sys.modules[__package__.split(".")[0]], "vllm_pass", vllm_pass)
