"""The state a pattern sees while it runs on one graph: where to record matches and skips, and the options."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from ..report import Report, node_location


@dataclass
class PassContext:
    graph_name: str
    report: Report
    options: dict = field(default_factory=dict)
    _pending: list = field(default_factory=list)

    def matched(self, pattern: str, anchor: torch.fx.Node) -> None:
        """A candidate passed its checks; it counts once `commit` sees its anchor replaced."""
        self._pending.append((pattern, anchor.name, node_location(anchor)))

    def commit(self, graph: torch.fx.Graph) -> None:
        """Record the pending matches whose anchor node is gone from `graph`, i.e. really rewritten."""
        live = {node.name for node in graph.nodes}
        for pattern, anchor, location in self._pending:
            if anchor not in live:
                self.report.add_match(pattern, self.graph_name, location, [anchor])
        self._pending.clear()

    def skipped(self, pattern: str, anchor: torch.fx.Node, reason: str) -> None:
        self.report.add_skip(pattern, self.graph_name, node_location(anchor), reason, [anchor.name])

    def decide(self, pattern: str, anchor: torch.fx.Node, reason: str | None) -> bool:
        """A pattern's extra check: rewrite when there is no `reason` against it, else record why not."""
        if reason:
            self.skipped(pattern, anchor, reason)
            return False
        self.matched(pattern, anchor)
        return True


_current: contextvars.ContextVar[PassContext | None] = contextvars.ContextVar("gemma4_fx_pass", default=None)


def current() -> PassContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("gemma4_fx patterns run only inside Gemma4Passes")
    return ctx


@contextlib.contextmanager
def active(ctx: PassContext):
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
