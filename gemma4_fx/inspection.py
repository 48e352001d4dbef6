"""`inspect`: compile a model once and write down what gemma4_fx saw and did, for a person to read."""

from __future__ import annotations

from pathlib import Path

import torch

from .report import Report


def inspect(model, *example_inputs, dump_dir: str | Path, patterns=None, **example_kwargs) -> Report:
    """Compile `model` with the gemma4_fx backend, run it once on the example inputs, and write to `dump_dir`:

    - `<graph>.dynamo.py`: the graph Dynamo captured;
    - `<graph>.post_grad.before.py` / `.after.py`: Inductor's post-grad graph before and after our passes;
    - `depyf/`: depyf's dump of Dynamo's view (decompiled bytecode, guards, compiled functions);
    - `report.txt`: the report, also returned.
    """
    import depyf

    from .backend import Gemma4Backend

    if not callable(model):
        raise TypeError(f"model: expected a callable (an nn.Module or function), got {type(model).__name__}")
    dump_dir = Path(dump_dir)
    dump_dir.mkdir(parents=True, exist_ok=True)
    backend = Gemma4Backend(patterns, dump_dir=dump_dir)
    torch._dynamo.reset()
    with torch.no_grad(), depyf.prepare_debug(str(dump_dir / "depyf")):
        torch.compile(model, backend=backend)(*example_inputs, **example_kwargs)
    report = backend.report
    (dump_dir / "report.txt").write_text(str(report) + "\n")
    return report
