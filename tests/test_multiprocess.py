"""Two processes x 4 CPU devices (gloo) train like one process on one device."""

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
