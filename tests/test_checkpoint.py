"""Checkpoints: logical round trip, clear mismatch errors, crash safety and exact resume."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from recsys import train
from recsys.cli import build, flags
from recsys.specs import SparseOptimizerSpec
from recsys.synthetic import SyntheticConfig
from recsys.training import Checkpointer, CheckpointMismatch, Trainer
from tests.conftest import cli_error

SMALL = ["--train-samples", "2048", "--eval-samples", "512", "--batch-size", "64", "--num-tables", "3"]
SMALL += ["--rows", "50", "--no-progress"]


def _trainer(rows=50, optimizer="adam", state_dtype="float32"):
    args = flags.parse(["--num-tables", "2"])
    config = SyntheticConfig(num_sparse=2, rows=rows).embedding_config(
        16, SparseOptimizerSpec(kind=optimizer, state_dtype=state_dtype)
    )
    return Trainer(build.build_model(args, config, 13), optax.adam(1e-3))


def test_round_trip_is_exact(tmp_path):
    trainer = _trainer()
    state = trainer.init_state()
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(7, trainer, state, {"note": "x"})
    ckpt.wait()
    restored, metadata = ckpt.restore(trainer, _trainer().init_state())
    assert metadata == {"note": "x"}
    for a, b in zip(
        jax.tree.leaves(trainer.to_logical(state)), jax.tree.leaves(trainer.to_logical(restored))
    ):
        np.testing.assert_array_equal(a, b)
    saved = ocp.StandardCheckpointer().restore(tmp_path / "7" / "state")
    assert saved["tables"]["t0"].shape == (50, 16)  # logical per-table form, not the stacked group


def test_restoring_another_model_names_the_difference(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    trainer = _trainer(rows=50)
    ckpt.save(1, trainer, trainer.init_state(), {})
    ckpt.wait()
    other = _trainer(rows=60, optimizer="rowwise_adagrad")
    with pytest.raises(CheckpointMismatch) as info:
        ckpt.restore(other, other.init_state())
    message = str(info.value)
    assert "tables.t0.rows: checkpoint 50, this run 60" in message
    assert "tables.t1.optimizer: checkpoint 'adam', this run 'rowwise_adagrad'" in message
    narrow = _trainer(state_dtype="bfloat16")
    with pytest.raises(CheckpointMismatch, match="tables.t0.state_dtype: in this run, not in the checkpoint"):
        ckpt.restore(narrow, narrow.init_state())


def test_round_trip_keeps_narrow_optimizer_state(tmp_path):
    trainer = _trainer(state_dtype="bfloat16")
    state = trainer.init_state()
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, trainer, state, {})
    ckpt.wait()
    restored, _ = ckpt.restore(trainer, trainer.init_state())
    slots = jax.tree.leaves(trainer.to_logical(restored)["slots"])
    assert slots and all(x.dtype == jax.numpy.bfloat16 for x in slots)


def test_cli_refuses_to_overwrite_and_checks_run_settings(tmp_path, capsys):
    directory = str(tmp_path / "ck")
    assert train.main([*SMALL, "--steps", "4", "--checkpoint-dir", directory, "--checkpoint-every", "2"]) == 0
    assert "pass --resume" in cli_error(capsys, [*SMALL, "--steps", "4", "--checkpoint-dir", directory])
    line = cli_error(
        capsys, [*SMALL, "--batch-size", "32", "--steps", "4", "--checkpoint-dir", directory, "--resume"]
    )
    assert "batch_size: checkpoint 64, this run 32" in line
    line = cli_error(capsys, [*SMALL, "--steps", "6", "--checkpoint-dir", directory, "--resume"])
    assert "a run of 4 steps, this one has 6" in line


def test_partial_save_is_ignored(tmp_path):
    directory = tmp_path / "ck"
    assert (
        train.main([*SMALL, "--steps", "8", "--checkpoint-dir", str(directory), "--checkpoint-every", "2"])
        == 0
    )
    # What a crash while saving step 8 leaves: step 6 complete, step 8 a partial temporary.
    shutil.rmtree(directory / "8")
    partial = directory / "8.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    assert Checkpointer(str(directory)).latest_step() == 6
    out = tmp_path / "m.json"
    args = [*SMALL, "--steps", "8", "--checkpoint-dir", str(directory), "--resume", "--metrics-out", str(out)]
    assert train.main(args) == 0
    assert json.loads(out.read_text())["resumed_from_step"] == 6


def _run_cli(args, **kwargs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "recsys.train", *args], env=env, **kwargs)


def _steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps, every = 160, 20
    base = [*SMALL, "--epochs", "1", "--steps", str(steps), "--checkpoint-every", str(every)]
    reference = tmp_path / "reference"
    assert (
        _run_cli(
            [*base, "--checkpoint-dir", str(reference), "--metrics-out", str(tmp_path / "a.json")]
        ).wait()
        == 0
    )

    kill_after = random.Random().randrange(every, steps // 2)  # truly random; printed on failure
    victim = tmp_path / "victim"
    proc = _run_cli(
        [*base, "--checkpoint-dir", str(victim)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while not (_steps(victim) and _steps(victim)[-1] >= kill_after) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random().random() * 0.2)  # land anywhere: mid-step or mid-save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run finished before the kill (kill_after={kill_after})"
    killed_at = _steps(victim)[-1]
    assert killed_at < steps, f"killed after the last checkpoint (kill_after={kill_after})"

    args = [*base, "--checkpoint-dir", str(victim), "--resume", "--metrics-out", str(tmp_path / "b.json")]
    assert _run_cli(args).wait() == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert b["resumed_from_step"] == killed_at
    for key in ("auc", "logloss", "train_loss", "normalized_entropy"):
        assert a[key] == b[key], (key, kill_after, killed_at)
    final_a = ocp.StandardCheckpointer().restore(reference / str(steps) / "state")
    final_b = ocp.StandardCheckpointer().restore(victim / str(steps) / "state")
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(final_a), jax.tree.leaves(final_b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{path} (killed at {killed_at})")


def test_resume_on_file_data_reuses_the_saved_schema(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = ["label,price,user,tags"]
    for _ in range(700):
        tags = "|".join(f"t{t}" for t in rng.integers(0, 30, rng.integers(0, 4)))
        rows.append(f"{int(rng.random() < 0.3)},{rng.integers(0, 100)},u{rng.integers(0, 50)},{tags}")
    data = tmp_path / "d.csv"
    data.write_text("\n".join(rows) + "\n")
    base = ["--data", f"csv:{data}", "--dense", "price", "--multi-hot-sep", "|", "--batch-size", "32"]
    base += ["--epochs", "3", "--no-progress", "--checkpoint-every", "10"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    full = [*base, "--checkpoint-dir", str(tmp_path / "ck_a"), "--keep-checkpoints", "10"]
    assert train.main([*full, "--metrics-out", str(a)]) == 0
    # A crash after step 40: later checkpoints never happened.
    interrupted = tmp_path / "ck_b"
    shutil.copytree(tmp_path / "ck_a", interrupted)
    for step in Checkpointer(str(interrupted)).manager.all_steps():
        if step > 40:
            shutil.rmtree(interrupted / str(step))
    interrupted = str(interrupted)
    assert train.main([*base, "--checkpoint-dir", interrupted, "--resume", "--metrics-out", str(b)]) == 0
    first, resumed = json.loads(a.read_text()), json.loads(b.read_text())
    assert resumed["resumed_from_step"] == 40
    for key in ("auc", "logloss", "train_loss", "steps"):
        assert first[key] == resumed[key], key

    data.write_text("\n".join(rows[:-1]) + "\n")  # the data changed under the checkpoint
    assert "other data" in cli_error(capsys, [*base, "--checkpoint-dir", interrupted, "--resume"])
