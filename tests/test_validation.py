"""Evaluation that steers training: `--eval-every`, `--early-stop`, the best state kept for
the final metrics, its history in `--metrics-out`, and resume across all of it."""

import json
import shutil

import numpy as np
import pytest

from recsys import train
from recsys.cli.validation import CheckpointKeeper
from recsys.data import ReadOptions, open_data
from tests.conftest import cli_error

ROWS, VALIDATION = 1200, 0.25


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """train.csv, and eval.csv holding exactly the rows `--validation 0.25` holds out of it:
    the final evaluation then reads the validation split again, so the final metrics must
    equal the history's entry of the state they came from."""
    rng = np.random.default_rng(0)
    user_bias, item_bias = rng.normal(size=60), rng.normal(size=80)
    rows = []
    for _ in range(ROWS):
        user, item, age = rng.integers(60), rng.integers(80), rng.integers(18, 70)
        p = 1 / (1 + np.exp(-(user_bias[user] + item_bias[item] + (age - 40) / 20)))
        rows.append(f"{int(rng.random() < p)},{age},u{user},i{item}")
    header = "label,age,user,item"
    directory = tmp_path_factory.mktemp("data")
    (directory / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    start = int(round(ROWS * (1 - VALIDATION)))
    (directory / "eval.csv").write_text("\n".join([header, *rows[start:]]) + "\n")
    return directory


def _run(tmp_path, files, *argv, name="m"):
    out = tmp_path / f"{name}.json"
    args = ["--data", f"csv:{files / 'train.csv'}", "--eval-data", f"csv:{files / 'eval.csv'}"]
    args += ["--dense", "age", "--validation", str(VALIDATION), "--batch-size", "40", "--no-progress"]
    # 22 steps an epoch. A learning rate that overfits 880 rows within a few epochs: the best state is an early one.
    args += ["--lr", "0.5", "--dense-lr", "0.01", "--epochs", "8", "--eval-every", "8"]
    assert train.main([*args, *argv, "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())


def _check_final_is_best(result):
    history = result["eval_history"]
    best = min(history, key=lambda h: h["logloss"])
    assert result["best_step"] == best["step"] < history[-1]["step"], history
    # The final evaluation reads the validation rows again, from the best state.
    assert (result["auc"], result["logloss"]) == (best["auc"], best["logloss"])
    assert result["validation_examples"] == result["eval_samples"] == ROWS * VALIDATION


def test_the_final_metrics_come_from_the_best_validation_state(tmp_path, files):
    result = _run(tmp_path, files)
    assert [h["step"] for h in result["eval_history"]] == list(range(8, 177, 8))
    assert result["steps"] == 176 and result["stopped_early"] is False
    _check_final_is_best(result)


def test_early_stop_ends_training_after_patience_evaluations(tmp_path, files):
    result = _run(tmp_path, files, "--early-stop", "2")
    history = result["eval_history"]
    assert result["stopped_early"] is True
    assert result["steps"] == history[-1]["step"] == history[-3]["step"] + 16 < 176
    assert result["best_step"] == history[-3]["step"]
    assert all(h["logloss"] >= history[-3]["logloss"] for h in history[-2:])
    _check_final_is_best(result)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [["--devices", "8", "--sharding", "row_wise"], ["--cache-load-factor", "0.9"]],
    ids=["sharded", "cached"],
)
def test_the_best_state_comes_back_on_other_trainers(tmp_path, files, argv):
    _check_final_is_best(_run(tmp_path, files, "--epochs", "4", *argv))


def test_resume_keeps_the_history_and_the_best_checkpoint(tmp_path, files):
    checkpoints = tmp_path / "ck"
    keep = ["--checkpoint-every", "16", "--keep-checkpoints", "10", "--early-stop", "3"]
    full = _run(tmp_path, files, *keep, "--checkpoint-dir", str(checkpoints), name="full")
    assert full["stopped_early"] and full["best_step"] > 32, full["eval_history"]
    assert CheckpointKeeper(str(checkpoints / "best")).checkpoints.latest_step() == full["best_step"]

    # A crash after the checkpoint at step 32, after a later best state was written: the
    # resumed run forgets that state, evaluates those steps again and ends as the first did.
    crashed = tmp_path / "crashed"
    shutil.copytree(checkpoints, crashed)
    for later in [d for d in crashed.iterdir() if d.name.isdigit() and int(d.name) > 32]:
        shutil.rmtree(later)
    resumed = _run(tmp_path, files, *keep, "--checkpoint-dir", str(crashed), "--resume", name="resumed")
    assert resumed["resumed_from_step"] == 32
    for key in ("auc", "logloss", "steps", "best_step", "stopped_early", "eval_history"):
        assert resumed[key] == full[key], key

    # Resuming a run that stopped early trains no further.
    again = _run(tmp_path, files, *keep, "--checkpoint-dir", str(crashed), "--resume", name="again")
    assert again["resumed_from_step"] == full["steps"]
    for key in ("auc", "logloss", "steps", "best_step", "eval_history"):
        assert again[key] == full[key], key


def test_validation_is_the_training_data_tail_and_the_schema_never_sees_it(files):
    opened = open_data(f"csv:{files / 'train.csv'}", options=ReadOptions(dense=("age",), validation=0.25))
    assert (len(opened.train), len(opened.validation), len(opened.eval)) == (720, 240, 240)
    users = [line.split(",")[2] for line in (files / "train.csv").read_text().splitlines()[1:]]
    vocab = set(opened.schema.sparse[0].vocab)
    assert vocab == set(users[:720])
    assert open_data(f"csv:{files / 'train.csv'}", options=ReadOptions(dense=("age",))).validation is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--validation", "1.5", "--early-stop", "2"], "fraction in (0, 1)"),
        (["--early-stop", "0"], "positive int"),
        (["--eval-every", "-3"], "positive int"),
    ],
)
def test_bad_validation_flags_are_one_line_errors(argv, message, capsys):
    assert message in cli_error(capsys, argv)


def test_validation_data_and_a_target_auc(tmp_path, files):
    """--validation-data validates on other files (here the evaluation file itself, so the
    final metrics equal the best validation's); --target-auc stops at the first
    validation that reaches it."""
    result = _run(tmp_path, files, "--validation-data", f"csv:{files / 'eval.csv'}", "--epochs", "4")
    assert result["train_examples"] == ROWS  # nothing split off the training file
    best = min(result["eval_history"], key=lambda h: h["logloss"])
    assert (result["auc"], result["logloss"]) == (best["auc"], best["logloss"])
    target = result["eval_history"][2]["auc"] - 1e-9
    argv = ["--validation-data", f"csv:{files / 'eval.csv'}", "--epochs", "4", "--target-auc", str(target)]
    stopped = _run(tmp_path, files, *argv, name="target")
    reached = next(h["step"] for h in result["eval_history"] if h["auc"] >= target)
    assert stopped["reached_target_at_step"] == stopped["steps"] == reached
    assert stopped["stopped_early"] is True
