"""The accelerator runbook: what to verify on a GPU node or a TPU VM, in one command.

    bash examples/gpu/run.sh OUT_DIR      # installs jax[cuda12], then runs this with --platform gpu
    bash examples/tpu/run.sh OUT_DIR      # installs jax[tpu], then runs this with --platform tpu
    python examples/runbook.py --platform gpu --dry-run --out /tmp/runbook   # the same steps on CPU

Steps, each a subprocess with a time limit, recorded in OUT_DIR/results.json (command,
seconds, passed, what it found) and printed as a table at the end:
  devices       JAX sees the platform's devices (count and kind).
  kernel_tests  the Pallas kernel tests, the platform's flavour compiled (GPU: Triton,
                TPU: Mosaic); the dry run lowers both flavours for their compilers instead.
  kernel_paths  a short `recsys-train --kernels auto` run: which kernels passed their
                self-check here, and so which path each table took.
  determinism   the same short run twice: equal metrics, bit for bit (`--deterministic`).
  benchmark     GPU: `benchmarks.gpu` (bandwidth against the device's and XLA's); TPU and
                the dry run: `benchmarks.bench` (lookup, update, DLRM step).
  mlperf        the MLPerf DLRM-DCNv2 command for these devices; with DATA set (the
                materialized data, examples/mlperf_dcnv2/README.md), the run itself, on
                this host or with HOSTS, HOST_ID and COORDINATOR on several.
The exit status is 1 when any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_pallas_kernels.py", "tests/test_kernel_dispatch.py"]
# Which kernel tests run where: the platform's flavour compiled; the dry run lowers both.
KERNEL_SELECTION = {"gpu": "not tpu and not lower", "tpu": "not gpu", "dry": "lower"}
SHORT_RUN = ["--steps", "30", "--train-samples", "8192", "--eval-samples", "2048", "--batch-size", "512"]
SHORT_RUN += ["--embedding-dim", "32", "--no-progress"]


def _step(name: str, command: list[str], out: Path, timeout: float, env=None) -> dict:
    began = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        passed, tail = done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        passed, tail = False, f"did not finish within {timeout:g} s"
    (out / f"{name}.log").write_text(tail)
    return {
        "step": name,
        "command": shlex.join(command),
        "seconds": round(time.perf_counter() - began, 1),
        "passed": passed,
    }


def _train(args, out: Path, name: str, devices: int) -> tuple[dict, dict | None]:
    metrics = out / f"{name}.json"
    command = [sys.executable, "-m", "recsys.train", *SHORT_RUN, "--metrics-out", str(metrics)]
    if devices > 1:
        command += ["--devices", str(devices), "--sharding", "auto"]
    record = _step(name, command, out, args.timeout)
    return record, json.loads(metrics.read_text()) if record["passed"] else None


def _devices(args, out: Path) -> tuple[dict, int]:
    probe = "import jax, json; d = jax.devices(); "
    probe += "print(json.dumps([jax.default_backend(), len(d), d[0].device_kind]))"
    record = _step("devices", [sys.executable, "-c", probe], out, 120)
    if not record["passed"]:
        return record, 1
    backend, count, kind = json.loads((out / "devices.log").read_text().strip().splitlines()[-1])
    want = "cpu" if args.dry_run else args.platform
    record.update(backend=backend, devices=count, kind=kind, passed=backend == want)
    return record, count


def run(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    device_record, devices = _devices(args, out)
    records.append(device_record)
    if args.dry_run:
        devices = 1  # the simulated steps run on one CPU device
    selection = KERNEL_SELECTION["dry" if args.dry_run else args.platform]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS, "-k", selection]
    records.append(_step("kernel_tests", command, out, args.timeout))

    first, metrics = _train(args, out, "kernel_paths", devices)
    if metrics is not None:
        first["kernel_checks"] = metrics["kernel_checks"]
        first["passed"] = all(c["passed"] for c in metrics["kernel_checks"])
        first["samples_per_s"] = metrics["samples_per_s"]
    records.append(first)
    again, repeat = _train(args, out, "determinism", devices)
    if metrics is not None and repeat is not None:
        keys = ("auc", "logloss", "train_loss")
        again["equal"] = {k: metrics[k] == repeat[k] for k in keys}
        again["passed"] = all(again["equal"].values()) and metrics["deterministic"]
    records.append(again)

    if args.platform == "gpu" and not args.dry_run:
        bench = [sys.executable, "-m", "benchmarks.gpu"]
    else:
        small = (
            [] if not args.dry_run else ["--tables", "4", "--rows", "2000", "--batch", "256", "--steps", "2"]
        )
        bench = [sys.executable, "-m", "benchmarks.bench", *small]
    records.append(_step("benchmark", bench, out, args.timeout))

    mlperf = [
        sys.executable,
        "examples/mlperf_dcnv2/mlperf.py",
        "train",
        "--data",
        os.environ.get("DATA", "DATA"),
    ]
    mlperf += ["--devices", os.environ.get("DEVICES", str(devices))]
    if os.environ.get("DATA") and not args.dry_run:
        env = {**os.environ, "METRICS": str(out / "mlperf_metrics.json"), "DEVICES": str(devices)}
        env["DEVICES"] = os.environ.get("DEVICES", env["DEVICES"])  # all hosts' devices, when several
        records.append(_step("mlperf", ["bash", "examples/mlperf_dcnv2/run.sh"], out, 24 * 3600, env=env))
    else:
        records.append(_step("mlperf", [*mlperf, "--print"], out, 120))
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", choices=["gpu", "tpu"], required=True)
    p.add_argument("--out", default="runbook", help="results.json and each step's log go here")
    p.add_argument("--dry-run", action="store_true", help="the same steps on this CPU (no accelerator)")
    p.add_argument("--timeout", type=float, default=900, help="seconds each step may take")
    args = p.parse_args(argv)
    records = run(args)
    summary = {"platform": args.platform, "dry_run": args.dry_run, "steps": records}
    summary["passed"] = all(r["passed"] for r in records)
    Path(args.out, "results.json").write_text(json.dumps(summary, indent=2))
    for r in records:
        print(f"{'ok ' if r['passed'] else 'FAIL'} {r['step']:<13} {r['seconds']:>7.1f} s  {r['command']}")
    print(f"results: {Path(args.out, 'results.json')}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
