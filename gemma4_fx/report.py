"""What the passes did: matches, candidates left alone (with the reason), fallbacks and verify results.

One `Report` per compiled graph; `Report.merged` sums them for a backend. Everything is plain data so tests and
tools can assert on it; `str(report)` is the table a person reads.
"""

from __future__ import annotations

import logging
import warnings
import re
import sys
from dataclasses import dataclass, field, fields

import torch

log = logging.getLogger("gemma4_fx")


def record_fallback(record: list[str], message: str) -> None:
    """Something of ours was left out of a compiled graph: warn the user, log the traceback (call it inside the
    `except`), and keep `message` in `record` (a report's fallbacks, the CUDA-graph failures)."""
    warnings.warn(f"gemma4_fx: {message}", stacklevel=3)
    log.warning(message, exc_info=True)
    record.append(message)


@dataclass(frozen=True)
class Match:
    pattern: str
    graph: str
    location: str  # the module path the nodes came from, e.g. "model.layers.3.router"
    nodes: tuple[str, ...]  # names of the replaced nodes' anchors in the post-grad graph


@dataclass(frozen=True)
class Skip:
    pattern: str
    graph: str
    location: str
    reason: str
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    graph: str
    output: int
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    mismatched: int  # integer outputs: elements that differ; float outputs: elements outside the tolerance
    ok: bool


@dataclass
class Report:
    patterns: tuple[str, ...] = ()  # the patterns that ran
    graphs: list[str] = field(default_factory=list)
    matches: list[Match] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # graphs compiled without our passes, and why
    uncaptured: list[str] = field(default_factory=list)  # pieces whose CUDA graph capture failed, and why
    cached: list[str] = field(default_factory=list)  # graphs from Inductor's FX graph cache: no pass ran on them
    for_backward: list[str] = field(default_factory=list)  # graphs compiled with a backward in view (grad on)
    verify: list[VerifyResult] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.patterns, 0)
        for match in self.matches:
            counts[match.pattern] = counts.get(match.pattern, 0) + 1
        return counts

    def add_match(self, pattern: str, graph: str, location: str, nodes) -> None:
        self.matches.append(Match(pattern, graph, location, tuple(nodes)))
        log.debug("%s: %s matched at %s", graph, pattern, location)

    def add_skip(self, pattern: str, graph: str, location: str, reason: str, nodes=()) -> None:
        skip = Skip(pattern, graph, location, reason, tuple(nodes))
        if skip not in self.skipped:
            self.skipped.append(skip)
            log.info("%s: %s left alone at %s: %s", graph, pattern, location, reason)

    def discard(self, patterns=None) -> None:
        """Forget the matches and skips of `patterns` (all if None): their rewrites did not make it into the
        compiled graph."""
        self.matches[:] = [m for m in self.matches if patterns is not None and m.pattern not in patterns]
        self.skipped[:] = [s for s in self.skipped if patterns is not None and s.pattern not in patterns]

    def absorb(self, other: Report, *, graphs: bool = True) -> None:
        """Add `other`'s findings to this report; `graphs=False` when other's graphs are pieces of one of ours."""
        self.patterns = tuple(dict.fromkeys(self.patterns + other.patterns))
        for f in fields(self):
            if f.name != "patterns" and (graphs or f.name != "graphs"):
                getattr(self, f.name).extend(getattr(other, f.name))

    @classmethod
    def merged(cls, reports) -> Report:
        total = cls()
        for report in reports:
            total.absorb(report)
        return total

    def __str__(self) -> str:
        lines = [f"gemma4_fx report: {len(self.graphs)} graph(s)"]
        matches = sorted(self.matches, key=lambda m: (m.graph, _natural(m.location)))
        width = max([14, *(len(name) for name in self.counts)])  # the longest pattern name
        lines += ["", f"{'pattern':<{width + 2}}{'matches':>8}"]
        lines += [f"{name:<{width + 2}}{count:>8}" for name, count in self.counts.items()]
        if self.matches:
            lines += ["", "matched:"]
            lines += [f"  {m.pattern:<{width}} {m.graph:<10} {m.location or '?':<40} {', '.join(m.nodes)}"
                      for m in matches]
        if self.skipped:
            lines += ["", "left alone:"]
            lines += [f"  {s.pattern:<{width}} {s.graph:<10} {s.location or '?':<40} {s.reason}"
                      for s in self.skipped]
        if self.fallbacks:
            lines += ["", "compiled without gemma4_fx passes:"] + [f"  {f}" for f in self.fallbacks]
        if self.uncaptured:
            lines += ["", "running without CUDA graphs:"] + [f"  {u}" for u in self.uncaptured]
        if self.for_backward:
            lines += ["", "a backward may follow (grad on, an input requiring grad), so no CUDA graphs and few rewrites "
                          "(what autograd saves for it stays as it is); for inference call under torch.no_grad():"]
            lines += [f"  {g}" for g in self.for_backward]
        if self.cached:
            lines += ["", "from Inductor's FX graph cache (compiled earlier with these passes; their matches are not "
                          "listed):"] + [f"  {c}" for c in self.cached]
        if self.verify:
            lines += ["", f"verify against eager:  {'graph':<10}{'output':>7}{'max abs':>12}{'max rel':>12}"
                          f"{'mismatched':>12}"]
            lines += [f"  {'ok' if v.ok else 'FAILED':<20}{v.graph:<10}{v.output:>7}{v.max_abs:>12.3g}"
                      f"{v.max_rel:>12.3g}{v.mismatched:>12}" for v in self.verify]
        return "\n".join(lines)


def _natural(text: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def describe_error(error: BaseException) -> str:
    """`Type: message` cut to its first line: some torch errors carry whole stack traces in their message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def node_location(node: torch.fx.Node) -> str:
    """The innermost module that produced `node` ("model.layers.3.router"), from Dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    return module_path(list(stack.values())[-1][0]) if stack else ""


_SOURCE_ROOT = re.compile(r"^[LG](\[[^\]]*\])+\.?")  # L['self'], L['args'][0], L['fn'], G['model']
_FRAME_SELF = "L['self']"


def paths_from_the_model(gm: torch.fx.GraphModule) -> None:
    """Make the module paths of a graph that Dynamo traced from a submodule's method (a frame resumed after a graph
    break, "L['self'].router" in a decoder layer) paths from the compiled model ("model.layers.3.router"), in
    place (the frame's own ops get the submodule's path), so that reports locate its nodes as they do the model's
    own graphs. The model is the outermost module calling on the Python stack (torch.compile's wrapper unwrapped);
    a frame of the model itself, or one whose module it does not hold, is left as it is."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.symbolic_convert import InstructionTranslator

    frame_self = InstructionTranslator.current_tx().f_locals.get("self")
    if not isinstance(frame_self, torch.nn.Module):
        return
    caller, model = sys._getframe(1), None
    while caller is not None:
        candidate = caller.f_locals.get("self")
        if isinstance(candidate, OptimizedModule):
            candidate = candidate._orig_mod
        if isinstance(candidate, torch.nn.Module):
            model = candidate
        caller = caller.f_back
    prefix = next((name for name, module in model.named_modules() if module is frame_self), None) if model else None
    if not prefix:
        return
    for node in (node for node in gm.graph.nodes if node.op == "call_function"):
        stack = node.meta.get("nn_module_stack") or {_FRAME_SELF: (_FRAME_SELF, type(frame_self))}  # its own ops
        node.meta["nn_module_stack"] = {
            key: (".".join(filter(None, (prefix, module_path(path)))) if path.startswith(_FRAME_SELF) else path,
                  kind) for key, (path, kind) in stack.items()}


def module_path(source: str) -> str:
    """The module path of a Dynamo source name: "L['self'].model.layers[3].router" and
    "L['args'][0].model.layers.3.router" (how newer transformers' wrapped forwards reach the module) are both
    "model.layers.3.router"."""
    path = _SOURCE_ROOT.sub("", source, count=1)
    return re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), path).lstrip(".")
