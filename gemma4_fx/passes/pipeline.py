"""`Gemma4Passes`: the gemma4_fx rewrites as one Inductor custom graph pass.

Use it in `post_grad_custom_post_pass` (or `..._pre_pass`); `Gemma4Backend` installs it for you. A failing pattern
never fails the compile: the error is logged and recorded, and the graph goes on without that pattern's rewrites.
After the patterns, `inductor_launch` replaces the ops on CUDA by their Triton launches, for Inductor to launch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..fx_utils import op_names
from ..patterns import PATTERNS
from ..report import Report, describe_error, record_fallback
from . import inductor_launch
from .context import PassContext, active


_PACKAGE = Path(__file__).resolve().parents[1]


@functools.cache
def _source_hash() -> str:
    """Hash of every source file of the package: any change to a pattern or kernel invalidates Inductor's cache."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Gemma4Passes(CustomGraphPass):
    """Runs the enabled Gemma-4 patterns on a post-grad FX graph and records what they did.

    Args:
        patterns: names of the rewrites to run (default: all that exist; see `gemma4_fx.PATTERNS`). They run in
            `PATTERNS`' order, whatever the order of the names.
        router_exact: compute the router's norm·scale prologue with eager's own kernels (bitwise-identical router
            input and expert ids on CUDA, a few more launches) instead of the fused Triton kernel (within one ulp).
        dump_dir: if set, each graph's post-grad code before and after the passes is written there as
            `<graph>.post_grad.before.py` / `.after.py`.
        rms_norm_ops: names ("ns::name") of ops an engine registers for its RMSNorm, matched wherever the patterns
            have a norm: `op(x, weight or None, eps)` = x·rsqrt(mean(x²) + eps) in fp32, cast to the weight's
            dtype, times the weight (vLLM's `vllm_ir::rms_norm`).
        linear_ops: names of ops an engine registers for its linear layers, `op(x, weight)` = x @ weight.T, matched
            where the PLE tail has its projections.
    """

    def __init__(self, patterns=None, *, router_exact: bool = False, dump_dir: str | Path | None = None,
                 rms_norm_ops=(), linear_ops=()):
        names = tuple(PATTERNS) if patterns is None else tuple(patterns)
        unknown = [name for name in names if name not in PATTERNS]
        if unknown or isinstance(patterns, str):
            raise ValueError(f"patterns: expected a sequence of names from {sorted(PATTERNS)}, got {patterns!r}")
        if not isinstance(router_exact, bool):
            raise TypeError(f"router_exact: expected a bool, got {router_exact!r}")
        self.patterns = tuple(name for name in PATTERNS if name in names)  # PATTERNS' order: see why there
        self.options = {"router_exact": router_exact, "rms_norm_ops": op_names("rms_norm_ops", rms_norm_ops),
                        "linear_ops": op_names("linear_ops", linear_ops)}
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.reports: list[Report] = []
        self._recording: tuple[str, Report] | None = None

    @property
    def report(self) -> Report:
        """All graphs this pass ran on, merged."""
        return Report.merged(self.reports)

    @contextlib.contextmanager
    def recording(self, graph_name: str, report: Report):
        """Record the graphs compiled inside this block under `graph_name` into `report` (used by the backend)."""
        previous, self._recording = self._recording, (graph_name, report)
        try:
            yield
        finally:
            self._recording = previous

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self._recording is not None:
            graph_name, report = self._recording
        else:
            graph_name, report = f"graph_{len(self.reports)}", Report(self.patterns)
            self.reports.append(report)
        report.graphs.append(graph_name)
        ctx = PassContext(graph_name, report, self.options)
        self._dump(graph, graph_name, "before")
        with active(ctx):
            for name in self.patterns:
                try:
                    PATTERNS[name].apply(graph, ctx)
                except Exception as error:  # never fail the user's compile because of a pattern
                    message = f"{graph_name}: pattern {name!r} failed ({describe_error(error)}); " \
                              "its remaining candidates are left to plain Inductor"
                    record_fallback(report.fallbacks, message)
                finally:
                    ctx.commit(graph)
            # Last, once every op is in place: Inductor launches the ops' kernels from its own code.
            try:
                inductor_launch.apply(graph, ctx)
            except Exception as error:
                record_fallback(report.fallbacks, f"{graph_name}: launching the kernels from Inductor's code failed "
                                                  f"({describe_error(error)}); the ops left are extern calls")
        graph.lint()
        self._dump(graph, graph_name, "after")

    def _dump(self, graph: torch.fx.Graph, graph_name: str, stage: str) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            code = graph.python_code(root_module="self").src
            (self.dump_dir / f"{graph_name}.post_grad.{stage}.py").write_text(code)

    def uuid(self) -> str:
        return hashlib.sha256(f"{_source_hash()}|{self.patterns}|{sorted(self.options.items())}".encode()).hexdigest()
