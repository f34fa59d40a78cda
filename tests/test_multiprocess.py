"""Two processes x 4 CPU devices (gloo) train like one process on one device."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_on_two_processes_matches_one_device_and_its_checkpoint_restores_on_one(tmp_path):
    """`recsys-train --coordinator ...` on 2 processes x 4 devices (each reading only its half
    of every batch) trains like one device: every table, optimizer slot and dense parameter
    the two processes checkpointed together equals the one-device run's. That checkpoint
    also restores in one process."""
    common = [
        "--data", "synthetic", "--train-samples", "1024", "--eval-samples", "256", "--num-tables", "4",
        "--rows", "200", "--batch-size", "64", "--steps", "12", "--no-progress",
    ]  # fmt: skip
    port, ckpt = str(_free_port()), str(tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "recsys.train",
                *common,
                "--mesh",
                "host=2,device=4",
                "--sharding",
                "grid",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--checkpoint-dir",
                ckpt,
                "--metrics-out",
                str(tmp_path / f"m{i}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    two = json.loads((tmp_path / "m0.json").read_text())
    assert not (tmp_path / "m1.json").exists()  # one report per run
    assert two["processes"] == 2 and two["devices"] == 8

    from recsys.cli import flags, loop

    one_ckpt = str(tmp_path / "one")
    one = loop.run(flags.parse([*common, "--checkpoint-dir", one_ckpt]))
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["auc"], one["auc"], rtol=1e-4)
    restored = loop.run(flags.parse([*common, "--checkpoint-dir", ckpt, "--resume"]))
    assert restored["resumed_from_step"] == 12
    np.testing.assert_allclose(restored["auc"], two["auc"], rtol=1e-5)
    one_state = _saved_state(one_ckpt, step=12)
    two_state = _saved_state(ckpt, step=12, like=one_state)  # onto this process's devices
    assert jax.tree.structure(two_state) == jax.tree.structure(one_state)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(two_state), jax.tree.leaves(one_state)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _saved_state(directory: str, step: int, like=None):
    """The logical train state a run checkpointed (tables, slots, dense parameters), placed
    like `like`'s arrays (default: as saved)."""
    with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))
    return restored["state"]
