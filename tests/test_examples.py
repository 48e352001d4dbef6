"""The examples run as a user runs them (`python examples/<name>.py`, CPU) and show what they say they show."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str) -> str:
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name, shown", [
    ("quickstart.py", ["router", "Inductor pass alone:", "generate:", "YOCO prefill:"]),
    ("multimodal.py", ["prefill: 1 graph(s)", "'yoco': 1", "gemma4_fx.generate:", "] same"]),
])
def test_example_runs_and_shows_its_results(name, shown):
    out = run_example(name)
    missing = [text for text in shown if text not in out]
    assert not missing, f"{name} did not print {missing}:\n{out[-3000:]}"
