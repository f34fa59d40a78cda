"""Two processes x 4 CPU devices (gloo) train like one process on one device."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from recsys.trainer import Trainer
from tests.test_sharded_training import batches, model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path):
    out, port = tmp_path / "result.npz", str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", str(i), port, str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)

    trainer = Trainer(model(), optax.adam(0.01))
    state, losses = trainer.init_state(), []
    for batch in batches():
        state, loss = trainer.train_step(state, batch)
        losses.append(float(loss))
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-4)
    for name, table in trainer.model(state).embedding.logical_tables().items():
        np.testing.assert_allclose(
            got[f"table_{name}"], np.asarray(table), rtol=1e-4, atol=1e-5, err_msg=name
        )
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state.params)):
        key = "param_" + jax.tree_util.keystr(path)
        np.testing.assert_allclose(got[key], np.asarray(value), rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_cli_on_two_processes_matches_one_device_and_its_checkpoint_restores_on_one(tmp_path):
    """`recsys-train --coordinator ...` on 2 processes x 4 devices trains like one device,
    and the checkpoint the two processes wrote together restores in one process."""
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

    from recsys import train

    one = train.run(train.parse_args(common))
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["auc"], one["auc"], rtol=1e-4)
    restored = train.run(train.parse_args([*common, "--checkpoint-dir", ckpt, "--resume"]))
    assert restored["resumed_from_step"] == 12
    np.testing.assert_allclose(restored["auc"], two["auc"], rtol=1e-5)
