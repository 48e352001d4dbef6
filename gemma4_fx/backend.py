"""`Gemma4Backend`: a torch.compile backend that is Inductor with the gemma4_fx rewrites installed.

    compiled = torch.compile(model, backend=gemma4_fx.gemma4_backend)
    compiled(input_ids)
    print(gemma4_fx.gemma4_backend.report)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch._inductor.compile_fx import compile_fx

from .fx_utils import copy_graph_module
from .passes import decode_attention, prefill_attention, slide_window, yoco
from .passes.pipeline import Gemma4Passes
from .patterns import moe_experts
from .report import Report, describe_error, paths_from_the_model, record_fallback
from .runtime.cudagraphs import CUDAGraphRuntime, CUDAGraphStats, GraphRunner, shape_inputs
from .runtime.split import bake_float_inputs, compile_pieces, is_decode_shaped, split_graph
from .runtime.verify import VerifiedGraph

log = logging.getLogger("gemma4_fx")

_VERIFY_ACTIONS = ("warn", "raise")
# Rewrites of Dynamo's graph, before it is split or lowered, in this order: YOCO first, since it leaves KV-shared
# layers one query row that decode_attention then takes, and prefill_attention the attentions of more rows;
# slide_window's cache updates are apart from them.
GRAPH_PASSES = {yoco.NAME: yoco, decode_attention.NAME: decode_attention,
                prefill_attention.NAME: prefill_attention, slide_window.NAME: slide_window}
CUDAGRAPH_MODES = ("auto", "piecewise", "full", None)
_DYNAMO_CONTROL_FLOW = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)


class Gemma4Backend:
    """torch.compile backend: Dynamo's graph is lowered by Inductor (`compile_fx`) with `Gemma4Passes` installed
    as its post-grad custom pass.

    Args:
        patterns: names of the rewrites to run (default: all). They are of two kinds, named in one list:
            `gemma4_fx.GRAPH_PASSES` (YOCO) rewrite Dynamo's graph before it is split or lowered;
            `gemma4_fx.PATTERNS` match Inductor's post-grad graph (through `Gemma4Passes`). Each kind runs in its
            registry's order, whatever the order of the names.
        verify: on the first call of each compiled graph, also run it eagerly and compare every output
            (`report.verify`); differences beyond `verify_tolerance` warn or raise (`verify_action`).
        verify_action: "warn" or "raise".
        verify_tolerance: max |out - eager| / max |eager| allowed per float output (default: by dtype).
        dump_dir: write each graph's Dynamo code and its post-grad code before/after the passes there.
        router_exact, rms_norm_ops, linear_ops: see `Gemma4Passes`.
        emulate_precision_casts: Inductor's own kernels round bf16/fp16 intermediates where eager does, so the
            parts we do not rewrite track eager (Inductor's default keeps them in fp32, and bf16 tokens then pick
            other experts when Inductor computes the router). On by default: compiled results should be eager's.
            It costs speed where it splits Inductor's fusions (E2B prefill in BENCHMARKS.md); pass False for
            Inductor's numerics and speed.
        fx_graph_cache: Inductor's FX graph cache skips the passes on a hit (the cached code has the rewrites), so
            the report lists those graphs under `cached` without their matches; it is off unless you ask for it.
        cudagraphs: how compiled graphs run from CUDA graphs (`gemma4_fx.runtime.cudagraphs`): "piecewise" cuts
            the graph at attention and at what a graph cannot hold, and captures the pieces between per input
            shape; "full" cuts only at what a graph cannot hold; "auto" is "full" for decode steps (one query
            token per attention) and "piecewise" otherwise (the default); None captures nothing. Only graphs with
            CUDA inputs are captured, and none that may need a backward (grad mode on and an input requiring grad);
            an explicit "piecewise" or "full" on CPU still cuts and compiles the pieces. When ours are on,
            Inductor's own (`mode="reduce-overhead"`, `triton.cudagraphs`) are switched off inside the pieces;
            with `cudagraphs=None` a `mode` is passed to Inductor as it is. Under `dynamic=True` a graph that will be
            captured has its float inputs (module attributes, arguments) specialised, as Dynamo does for Inductor's
            own CUDA graphs: a new value recompiles.
        max_captured_shapes: shapes each compiled graph keeps graphs for, per group of pieces sized by the same
            inputs (`runtime.cudagraphs`); the least recently used shape is dropped (with its graphs) past this.
        splitting_ops: more ops to run between graphs in piecewise mode: op overloads, functions, or "ns::name"
            (always, where attention of one query row in a prefill would otherwise stay in the graphs).
    """

    def __init__(self, patterns=None, *, verify: bool = False, verify_action: str = "warn",
                 verify_tolerance: float | None = None, dump_dir: str | Path | None = None,
                 router_exact: bool = False, emulate_precision_casts: bool = True, fx_graph_cache: bool = False,
                 cudagraphs: str | None = "auto", max_captured_shapes: int = 32, splitting_ops=(), rms_norm_ops=(),
                 linear_ops=()):
        if cudagraphs not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraphs: expected one of {CUDAGRAPH_MODES}, got {cudagraphs!r}")
        if isinstance(max_captured_shapes, bool) or not isinstance(max_captured_shapes, int) or max_captured_shapes < 1:
            raise ValueError(f"max_captured_shapes: expected a positive int, got {max_captured_shapes!r}")
        if isinstance(splitting_ops, str):
            raise TypeError(f"splitting_ops: expected a sequence of ops or op names, got the string {splitting_ops!r}")
        if verify_action not in _VERIFY_ACTIONS:
            raise ValueError(f"verify_action: expected one of {_VERIFY_ACTIONS}, got {verify_action!r}")
        if verify_tolerance is not None and not verify_tolerance > 0:
            raise ValueError(f"verify_tolerance: expected a positive float or None, got {verify_tolerance!r}")
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        post_grad, self.graph_passes = _split_patterns(patterns)
        self.passes = Gemma4Passes(post_grad, router_exact=router_exact, dump_dir=self.dump_dir,
                                   rms_norm_ops=rms_norm_ops, linear_ops=linear_ops)
        # transformers' "eager" experts loop traced as one op for the moe_experts rewrite, not broken at each expert
        self.traces_eager_experts = moe_experts.NAME in self.passes.patterns
        if self.traces_eager_experts:
            moe_experts.trace_eager_experts()
        self.verify, self.verify_action, self.verify_tolerance = bool(verify), verify_action, verify_tolerance
        self.inductor_config = {"emulate_precision_casts": bool(emulate_precision_casts),
                                "fx_graph_cache": bool(fx_graph_cache)}
        self.graph_reports: dict[str, Report] = {}
        self.cudagraphs, self.splitting_ops = cudagraphs, tuple(splitting_ops)
        self.cudagraph_runtime = CUDAGraphRuntime(max_captured_shapes)

    @property
    def report(self) -> Report:
        """Every graph compiled through this backend, merged; per graph in `graph_reports`."""
        return Report.merged(self.graph_reports.values())

    @property
    def cudagraph_stats(self) -> CUDAGraphStats:
        """Graphs captured, replays, evictions, failures, and the bytes of the shared memory pool (read now)."""
        stats = self.cudagraph_runtime.stats
        stats.pool_bytes = self.cudagraph_runtime.pool_bytes()
        return stats

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
        report = self.graph_reports[graph_name] = Report(self.graph_passes + self.passes.patterns)
        with contextlib.suppress(Exception):  # the report's locations only (outside Dynamo there is no frame)
            paths_from_the_model(gm)
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{graph_name}.dynamo.py").write_text(gm.code)
        config = {**self.inductor_config, **(torch._inductor.list_mode_options(mode) if mode else {}),
                  **(options or {})}
        if _may_need_backward(example_inputs):
            report.for_backward.append(graph_name)
            log.info("%s: a backward may follow (grad on, an input requiring grad): no CUDA graphs, few rewrites",
                     graph_name)
        try:
            compiled = self._compile(self._rewrite(gm, graph_name, report), example_inputs, graph_name, report,
                                     config)
        except _DYNAMO_CONTROL_FLOW:  # Dynamo asks to re-trace (e.g. to specialise floats): not a failure
            del self.graph_reports[graph_name]
            raise
        except Exception as error:  # our rewrites and runtime must never cost the user their compile
            message = f"{graph_name}: gemma4_fx failed ({describe_error(error)}); Dynamo's graph compiled with " \
                      "plain Inductor instead"
            report.discard()
            compiled = _plain_inductor(gm, example_inputs, config, report, graph_name, message)
        if self.verify:  # against the graph as Dynamo traced it, so the check covers the graph passes too
            return VerifiedGraph(compiled, gm, graph_name, report, action=self.verify_action,
                                 tolerance=self.verify_tolerance)
        return compiled

    def _rewrite(self, gm: torch.fx.GraphModule, graph_name: str, report: Report) -> torch.fx.GraphModule:
        """A copy of `gm` after the enabled `GRAPH_PASSES`, which the split rewrites further in place (`gm` stays as
        Dynamo traced it, for the fallback and `verify`). Each pass rewrites a copy of its own, kept where it
        succeeds: a pass that fails is skipped whole, its partial rewrite with it, never the compile."""
        rewritten = gm
        for name in self.graph_passes:
            try:
                rewritten = GRAPH_PASSES[name].apply(copy_graph_module(rewritten), report=report,
                                                     graph_name=graph_name)
            except Exception as error:
                message = f"{graph_name}: graph pass {name!r} failed ({describe_error(error)}); graph left as it was"
                report.discard([name])
                record_fallback(report.fallbacks, message)
                continue
            if self.dump_dir is not None:
                (self.dump_dir / f"{graph_name}.{name}.py").write_text(rewritten.code)
        return copy_graph_module(gm) if rewritten is gm else rewritten

    def _compile(self, gm, example_inputs, graph_name: str, report: Report, config: dict):
        mode = self._cudagraph_mode(gm, example_inputs)
        if mode is None:
            return self._inductor(gm, example_inputs, graph_name, report, config)
        return self._compile_split(gm, example_inputs, graph_name, report, config, mode)

    def _cudagraph_mode(self, gm, example_inputs) -> str | None:
        """"piecewise", "full", or None (compile the graph whole, no graphs of ours)."""
        if self.cudagraphs is None or _may_need_backward(example_inputs):
            return None
        if self.cudagraphs == "auto":
            if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
                return None
            return "full" if is_decode_shaped(gm.graph, self.splitting_ops) else "piecewise"
        return self.cudagraphs

    def _compile_split(self, gm, example_inputs, graph_name: str, report: Report, config: dict, mode: str):
        """Cut `gm` (`runtime.split`), compile each captured piece with our passes, run them from CUDA graphs."""
        floats = bake_float_inputs(gm, example_inputs)
        split = split_graph(gm, split_attention=mode == "piecewise", extra_ops=self.splitting_ops)
        config = {**config, "triton.cudagraphs": False}  # ours hold the pieces: no graphs inside graphs
        piece_reports = []

        def compile_piece(piece, inputs):
            piece_reports.append(Report(self.passes.patterns))
            return self._inductor(piece.module, inputs, f"{graph_name}.{piece.name}", piece_reports[-1], config)

        compiled = compile_pieces(split, gm, example_inputs, compile_piece)
        if floats:  # Inductor found the float inputs unread and had Dynamo trace again with them as guarded constants
            raise RuntimeError(f"{len(floats)} float inputs were baked in but Dynamo did not specialise them")
        report.graphs.append(graph_name)
        report.absorb(Report.merged(piece_reports), graphs=False)
        capture = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        log.info("%s: %s CUDA graphs, %d pieces (%d captured)", graph_name, mode, len(split.pieces),
                 len(split.captured))
        return GraphRunner(split, compiled, shape_inputs(gm), self.cudagraph_runtime, capture=capture, report=report)

    def _inductor(self, gm, example_inputs, graph_name: str, report: Report, config: dict):
        """Inductor with our post-grad passes; without them if that fails (the graph passes' work stays)."""
        try:
            with self.passes.recording(graph_name, report), \
                    torch._functorch.config.patch(enable_autograd_cache=config["fx_graph_cache"]):
                compiled = compile_fx(gm, example_inputs,
                                      config_patches={**config, "post_grad_custom_post_pass": self.passes})
            if graph_name not in report.graphs:  # the passes never ran: Inductor took the code from its cache
                report.cached.append(graph_name)
            return compiled
        except _DYNAMO_CONTROL_FLOW:
            raise
        except Exception as error:  # our rewrites must never cost the user their compile
            message = f"{graph_name}: compile with gemma4_fx passes failed ({describe_error(error)}); " \
                      "compiled with plain Inductor instead"
            report.discard(self.passes.patterns)
            return _plain_inductor(gm, example_inputs, config, report, graph_name, message)


def _plain_inductor(gm, example_inputs, config: dict, report: Report, graph_name: str, message: str):
    """Plain Inductor, after our compile failed (`message`, recorded; call it while handling that error). Where
    plain Inductor fails too, the error is not ours to hide: it goes on to Dynamo, which breaks the graph there, as
    it would under `backend="inductor"`, and the report says so."""
    record_fallback(report.fallbacks, message)
    try:
        return compile_fx(gm, example_inputs, config_patches=config)
    except _DYNAMO_CONTROL_FLOW:
        raise
    except Exception as error:
        report.fallbacks.append(f"{graph_name}: plain Inductor failed too ({describe_error(error)}); left to Dynamo")
        raise


def _may_need_backward(example_inputs) -> bool:
    """Grad mode is on and an input requires grad: autograd may differentiate the compiled graph."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _split_patterns(patterns) -> tuple[list[str] | None, tuple[str, ...]]:
    """(names for `Gemma4Passes`, names of `GRAPH_PASSES`) of the backend's `patterns` argument; unknown names are
    left for `Gemma4Passes` to reject."""
    if patterns is None:
        return None, tuple(GRAPH_PASSES)
    if isinstance(patterns, str):
        return patterns, ()
    names = list(patterns)
    return [name for name in names if name not in GRAPH_PASSES], tuple(name for name in GRAPH_PASSES if name in names)


gemma4_backend = Gemma4Backend()
