import json
import shutil

import numpy as np
import pytest

from recsys import train
from tests.conftest import cli_error

SMALL = [
    "--train-samples",
    "4096",
    "--eval-samples",
    "1024",
    "--batch-size",
    "128",
    "--num-tables",
    "3",
    "--rows",
    "100",
    "--no-progress",
]


def test_cli_writes_metrics_and_is_deterministic(tmp_path, capsys):
    results = []
    for i in range(2):
        out = tmp_path / f"m{i}.json"
        assert train.main([*SMALL, "--steps", "20", "--metrics-out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    for key in ("auc", "logloss", "train_loss", "steps", "samples_per_s", "normalized_entropy"):
        assert key in results[0]
    assert results[0]["steps"] == 20
    for key in ("auc", "logloss", "train_loss"):
        assert results[0][key] == results[1][key]
    assert "AUC" in capsys.readouterr().out


def test_cli_profiles_a_few_steps(tmp_path):
    out, traces = tmp_path / "m.json", tmp_path / "trace"
    argv = [*SMALL, "--steps", "5", "--profile", "2", "--profile-dir", str(traces), "--metrics-out", str(out)]
    assert train.main(argv) == 0
    assert json.loads(out.read_text())["profile_dir"] == str(traces)
    assert list(traces.glob("plugins/profile/*/*.trace.json.gz"))


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} read back from TensorBoard event files (TFRecords of Events)."""
    from tensorboardX.proto import event_pb2

    out: dict = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            length = int.from_bytes(data[at : at + 8], "little")
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_cli_writes_its_curves_for_tensorboard(tmp_path):
    logs = tmp_path / "logs"
    assert train.main([*SMALL, "--steps", "40", "--log-dir", str(logs)]) == 0
    curves = _scalars(logs)
    assert [step for step, _ in curves["train/loss"]] == [20, 40]
    assert [step for step, _ in curves["train/samples_per_s"]] == [20, 40]
    assert curves["eval/auc"][0][0] == 40 and 0.5 < curves["eval/auc"][0][1] <= 1


def test_cli_single_step_has_no_timed_rate(tmp_path):
    out = tmp_path / "m.json"
    assert train.main([*SMALL, "--steps", "1", "--metrics-out", str(out)]) == 0
    assert json.loads(out.read_text())["samples_per_s"] is None  # strict JSON, no NaN


@pytest.mark.parametrize("model", ["dcnv2"])
def test_cli_other_model_and_optimizers(model):
    for optimizer in ("sgd", "adam"):
        assert train.main([*SMALL, "--steps", "3", "--model", model, "--optimizer", optimizer]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "lamb"], "invalid choice"),
        (["--model", "mlp"], "invalid choice"),
        (["--bottom-mlp", "32,8"], "must end in --embedding-dim"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--plan", "p.json", "--sharding", "grid"], "not both"),
        (["--mesh", "host=2,device"], "expected name=size"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    assert message in cli_error(capsys, argv)


@pytest.mark.slow
def test_trainer_learns_the_planted_model(tmp_path):
    out = tmp_path / "m.json"
    # No row weight decay: one epoch over planted data cannot overfit, and the test is about
    # the optimizer reaching the truth, not about regularization.
    train.main(["--rows", "500", "--weight-decay", "0", "--no-progress", "--metrics-out", str(out)])
    result = json.loads(out.read_text())
    # The planted model's own AUC is the ceiling; a correct trainer comes close to it.
    assert result["planted_auc"] - result["auc"] < 0.035, result
    assert result["auc"] > 0.8


SHARD_RUN = ["--steps", "20", "--train-samples", "2560", "--eval-samples", "512", "--batch-size", "64"]
SHARD_RUN += ["--num-tables", "3", "--rows", "50", "--no-progress"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The single-device run every sharded run is compared with (computed once)."""
    return _metrics(tmp_path_factory.mktemp("one"), "one")


def _metrics(tmp_path, name, *argv):
    out = tmp_path / f"{name}.json"
    assert train.main([*SHARD_RUN, *argv, "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cli_sharded_runs_match_one_device(tmp_path, one_device):
    one = one_device
    assert one["devices"] == 1 and one["plan"] is None
    # The CLI plumbing on one flat and one two-level mesh; every strategy is checked against
    # one device in tests/test_sharded_training.py.
    for strategy in ("row_wise",):
        got = _metrics(tmp_path, strategy, "--devices", "8", "--sharding", strategy)
        assert got["devices"] == 8 and got["plan"]["tables"]["t0"]["strategy"] == strategy
        assert got["pipeline"] == "sparse_dist" and one["pipeline"] == "none"
        assert got["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5), strategy
        assert got["auc"] == pytest.approx(one["auc"], abs=1e-4), strategy
    for strategy in ("grid",):
        # The broadcast route: with compressed results "auto" may pick another route below.
        got = _metrics(
            tmp_path, strategy, "--mesh", "host=2,device=4", "--sharding", strategy, "--route", "broadcast"
        )
        assert got["mesh"] == "host=2,device=4"
        assert got["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5), strategy
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(got["plan"]))
    # The same plan from its file, with compressed collectives and bf16 tables.
    again = _metrics(
        tmp_path, "plan", "--mesh", "host=2,device=4", "--plan", str(plan_file),
        "--comm", "fwd=fp16,bwd=bf16,ids=packed", "--table-dtype", "bf16", "--state-dtype", "bf16",
        "--route", "broadcast",
    )  # fmt: skip
    assert again["plan"] == got["plan"] and again["comm"] == "fwd=fp16,bwd=bf16,allreduce=fp32,ids=packed"
    assert again["table_dtype"] == again["state_dtype"] == "bf16"
    assert again["train_loss"] == pytest.approx(got["train_loss"], rel=2e-2)
    for purpose in ("fwd", "bwd"):  # half the bytes; the dense all-reduce unchanged
        assert again["comm_bytes"][purpose] == got["comm_bytes"][purpose] // 2
    # 50-row tables: each id in 1 byte instead of 4; its pooling coefficient keeps its 4.
    assert again["comm_bytes"]["ids"] == got["comm_bytes"]["ids"] * 5 // 8
    assert again["comm_bytes"]["allreduce"] == got["comm_bytes"]["allreduce"] > 0
    assert got["comm_bytes_per_step"] == sum(got["comm_bytes"].values())
    assert got["comm_bytes_fallback_per_step"] == got["comm_bytes_per_step"]  # the broadcast route: no branch


@pytest.mark.parametrize("model", ["lr", "fm", "deepfm", "wide_deep"])
def test_cli_trains_the_baselines_on_one_device_and_sharded(tmp_path, model):
    """Logistic regression, the factorization machine, DeepFM and Wide & Deep learn the
    planted data, and shard like DLRM (their per-id weights live in the embedding tables)."""
    one = _metrics(tmp_path, f"{model}_one", "--model", model, "--lr", "0.05")
    assert one["model"] == model and one["auc"] > 0.6
    sharded = _metrics(
        tmp_path, f"{model}_8", "--model", model, "--lr", "0.05", "--devices", "8", "--sharding", "row_wise"
    )
    assert sharded["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert sharded["auc"] == pytest.approx(one["auc"], abs=1e-4)


def test_cli_compression_errors(capsys):
    cases = {
        ("--devices", "8", "--comm", "fwd=fp4"): "the codec must be one of fp32, fp16, bf16, fp8_e4m3",
        ("--devices", "8", "--comm", "up=fp16"): "DIRECTION one of fwd, bwd, allreduce",
        ("--comm", "fwd=fp16"): "--comm compresses the collectives of a sharded run",
        ("--table-dtype", "fp64"): "invalid choice: 'fp64' (choose from 'fp32', 'bf16', 'fp16')",
        ("--state-dtype", "int8"): "invalid choice: 'int8' (choose from 'fp32', 'bf16', 'fp16')",
        ("--devices", "8", "--comm", "ids=int16"): "ids='int16': the codec must be one of int32, packed",
    }
    for argv, message in cases.items():
        assert message in cli_error(capsys, list(argv))


def test_cli_sharding_errors(tmp_path, capsys):
    line = cli_error(capsys, [*SHARD_RUN, "--devices", "8", "--batch-size", "60"])
    assert line == "recsys-train: error: --batch-size 60 must be a multiple of the 8 devices"
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text(json.dumps({"tables": {"t0": {"strategy": "table_wise", "shards": []}}}))
    line = cli_error(capsys, [*SHARD_RUN, "--devices", "8", "--plan", str(bad_plan)])
    assert f"--plan {bad_plan}: sharding plan: unknown tables [], tables without a plan" in line
    bad_plan.write_text('{"tables": {')
    line = cli_error(capsys, [*SHARD_RUN, "--devices", "8", "--plan", str(bad_plan)])
    assert line.startswith(f"recsys-train: error: --plan {bad_plan} is not JSON: Expecting")
    missing = tmp_path / "missing.json"
    line = cli_error(capsys, [*SHARD_RUN, "--devices", "8", "--plan", str(missing)])
    assert line == f"recsys-train: error: {missing}: no such file or directory"


def test_cli_reports_input_errors_in_one_line(tmp_path, capsys):
    """Bad data found while training is still an input error (2), located by file and line;
    --debug adds the traceback."""
    data = tmp_path / "bad.libfm"
    data.write_text("".join(f"{i % 2} {i % 7}:1 {10 + i % 5}:1\n" for i in range(300)) + "1 abc:1 12:1\n")
    argv = ["--data", f"libfm:{data}", "--batch-size", "32", "--epochs", "1", "--no-progress"]
    line = cli_error(capsys, argv)
    assert line == f"recsys-train: error: {data}:301: column 'position 1': 'abc:1' is not index:value"
    line = cli_error(capsys, ["--data", f"criteo:{tmp_path / 'nothing.tsv'}", "--no-progress"])
    assert "nothing.tsv" in line
    assert train.main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("is not index:value")


@pytest.mark.slow
def test_cli_checkpoint_from_a_sharded_run_resumes_on_another_layout(tmp_path, one_device):
    one = one_device
    directory = tmp_path / "ck"
    argv = ["--checkpoint-dir", str(directory), "--checkpoint-every", "10", "--keep-checkpoints", "5"]
    # The default sparse_dist pipeline: a checkpoint holds no batch routed ahead.
    _metrics(tmp_path, "tw8", "--devices", "8", "--sharding", "table_wise", *argv)
    shutil.rmtree(directory / "20")  # as if the run died after step 10
    resumed = _metrics(tmp_path, "grid", "--mesh", "host=2,device=4", "--sharding", "grid", *argv, "--resume")
    assert resumed["resumed_from_step"] == 10 and resumed["pipeline"] == "sparse_dist"
    assert resumed["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    # Restoring on one device: tests/test_sharded_checkpoint.py and tests/test_multiprocess.py.


def test_cli_auto_sharding_plans_and_matches_one_device(tmp_path, one_device):
    """The planner's plan, from bandwidths measured on these devices first, trains like one device."""
    one = one_device
    auto = _metrics(tmp_path, "auto", "--devices", "8", "--sharding", "auto", "--plan-topology", "calibrate")
    assert auto["devices"] == 8 and len(auto["plan"]["tables"]) == 3
    assert auto["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    """A CSV whose `history` column lists items a user saw (multi-hot, '|'-separated)."""
    rng = np.random.default_rng(0)
    rows = ["label,age,user,item,history"]
    for _ in range(1600):
        user, item = rng.integers(40), rng.integers(60)
        seen = rng.integers(0, 60, rng.integers(0, 6))
        p = 1 / (1 + np.exp(-(0.8 * np.sum(seen % 3 == item % 3) - 1)))
        rows.append(
            f"{int(rng.random() < p)},{rng.integers(18, 70)},u{user},i{item},{'|'.join(f'i{s}' for s in seen)}"
        )
    path = tmp_path_factory.mktemp("histories") / "h.csv"
    path.write_text("\n".join(rows) + "\n")
    return ["--data", f"csv:{path}", "--dense", "age", "--multi-hot-sep", "|", "--sequence", "history"]


@pytest.mark.slow
def test_cli_din_attends_over_a_history_column_sharded_as_on_one_device(tmp_path, histories):
    base = [*histories, "--model", "din", "--batch-size", "64", "--epochs", "2", "--no-progress"]
    results = []
    for name, extra in (("one", []), ("sharded", ["--devices", "8", "--sharding", "row_wise"])):
        out = tmp_path / f"{name}.json"
        assert train.main([*base, *extra, "--metrics-out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    one, sharded = results
    assert one["model"] == sharded["model"] == "din" and sharded["devices"] == 8
    assert sharded["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert sharded["auc"] == pytest.approx(one["auc"], abs=1e-4)


def test_cli_sequence_columns_need_a_model_that_reads_histories(histories, capsys):
    assert "(histories: --model din)" in cli_error(capsys, [*histories, "--steps", "1"])
    unknown = [*histories[:-1], "hist", "--steps", "1"]
    assert "sequence columns ['hist'] are not sparse columns" in cli_error(capsys, unknown)
    assert "--sequence names csv or parquet columns" in cli_error(capsys, ["--sequence", "x"])


def test_deterministic_runs_ask_xla_gpu_for_deterministic_ops(tmp_path):
    from recsys.cli.build import xla_deterministic

    assert xla_deterministic(True, "--a=1") == "--a=1 --xla_gpu_deterministic_ops=true"
    assert xla_deterministic(True, "--xla_gpu_deterministic_ops=false") == "--xla_gpu_deterministic_ops=false"
    assert xla_deterministic(False, "--a=1") == "--a=1"
    out = tmp_path / "m.json"
    assert train.main([*SMALL, "--steps", "2", "--no-deterministic", "--metrics-out", str(out)]) == 0
    assert json.loads(out.read_text())["deterministic"] is False
