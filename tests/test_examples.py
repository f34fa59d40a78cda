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


SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "criteo" / "kaggle_train_10k.tsv").exists(),
    reason="the Criteo Kaggle sample is absent (../shared/data; the research data is not redistributed)",
)
def test_mlperf_dcnv2_smoke_runs_the_benchmark_pipeline_scaled_down(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["RECSYS_SHARED_DATA"] = str(SHARED)
    metrics = tmp_path / "m.json"
    script = ROOT / "examples" / "mlperf_dcnv2" / "smoke.sh"
    done = subprocess.run(
        ["bash", str(script), str(metrics)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(metrics.read_text())
    assert (result["model"], result["devices"], result["optimizer"]) == ("dcnv2", 8, "adagrad")
    assert [h["step"] for h in result["eval_history"]] == [10, 20, 30, 31]  # --eval-every 10, then the end
    assert result["plan"] and 0.5 < result["auc"] < 1
    assert "materialized chunk 1/1 (8000/8000 rows)" in done.stderr


def test_mlperf_flags_follow_the_config():
    sys.path.insert(0, str(ROOT / "examples" / "mlperf_dcnv2"))
    try:
        import mlperf
    finally:
        sys.path.pop(0)
    config = mlperf.load_config()
    assert mlperf.eval_every(config, 65_536) == 3200
    flags = mlperf.train_flags(config, "/d", 64)
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--top-mlp"] == "1024,1024,512,256,1" and pairs["--cross-rank"] == "512"
    assert (pairs["--lr"], pairs["--dense-lr"], pairs["--batch-size"]) == ("0.005", "0.005", "65536")
    assert (pairs["--target-auc"], pairs["--eval-every"], pairs["--devices"]) == ("0.80275", "3200", "64")
    assert pairs["--validation-data"] == pairs["--eval-data"] == "criteo:/d/eval"
    from recsys.cli import flags as cli_flags

    assert cli_flags.parse(flags).model == "dcnv2"  # recsys-train takes them all


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu"])
def test_accelerator_runbook_dry_run_passes_every_step_on_cpu(tmp_path, platform):
    """The runbook's steps on this CPU (DRY_RUN=1: nothing installed, the kernels lowered
    for their compilers instead of run on the hardware, which is never available here)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["DRY_RUN"] = "1"
    script = ROOT / "examples" / platform / "run.sh"
    done = subprocess.run(
        ["bash", str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    steps = {s["step"]: s for s in results["steps"]}
    assert list(steps) == ["devices", "kernel_tests", "kernel_paths", "determinism", "benchmark", "mlperf"]
    assert results["passed"] and results["dry_run"] and steps["devices"]["backend"] == "cpu"
    assert steps["determinism"]["equal"] == {"auc": True, "logloss": True, "train_loss": True}
    assert "recsys-train --data criteo:DATA/train" in (tmp_path / "mlperf.log").read_text()
