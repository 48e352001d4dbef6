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

    def matched(self, pattern: str, anchor: torch.fx.Node, nodes=()) -> None:
        self.report.add_match(pattern, self.graph_name, node_location(anchor), [anchor.name, *nodes])

    def skipped(self, pattern: str, anchor: torch.fx.Node, reason: str) -> None:
        self.report.add_skip(pattern, self.graph_name, node_location(anchor), reason, [anchor.name])


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
