"""Every example runs, in its small mode, as a user would start it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_example(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the example sets its devices
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_custom_model_trains_on_one_device_and_on_eight():
    lines = _run_example("custom_model.py", "--small").strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["one device", "8 devices"], lines
    aucs = [float(line.rsplit("AUC", 1)[1]) for line in lines]
    assert min(aucs) > 0.75, lines  # the planted model's signal, learned both ways
