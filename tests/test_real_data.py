"""Training on the shared research data samples (never part of this repository).

They are looked up at ../shared/data next to the checkout; every test here skips, saying
so, when that folder is absent.
"""

import json
import pathlib

import pytest

from recsys import train

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _need(relative: str) -> pathlib.Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared research data is not redistributed with the repo")
    return path


def _train(tmp_path, *argv):
    out = tmp_path / "m.json"
    assert train.main([*argv, "--no-progress", "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())


def test_criteo_sample_trains_with_a_held_out_tail(tmp_path):
    path = _need("criteo/kaggle_train_10k.tsv")
    result = _train(tmp_path, "--data", f"criteo:{path}")
    assert (result["train_examples"], result["eval_samples"]) == (8000, 2000)
    assert result["auc"] > 0.65, result  # logistic regression on one-hot features: 0.726


def test_avazu_sample_through_the_csv_reader(tmp_path):
    path = _need("avazu/train_10k.csv")
    result = _train(tmp_path, "--data", f"csv:{path}", "--label", "click", "--ignore", "id")
    assert (result["train_examples"], result["eval_samples"]) == (7999, 2000)
    assert result["auc"] > 0.65, result  # logistic regression: 0.710


@pytest.mark.slow
def test_frappe_reaches_auc_095_with_default_settings(tmp_path):
    train_file, test_file = _need("frappe/frappe.validation.libfm"), _need("frappe/frappe.test.libfm")
    result = _train(
        tmp_path, "--data", f"libfm:{train_file}", "--eval-data", f"libfm:{test_file}", "--epochs", "10"
    )
    assert result["eval_samples"] == 28860
    assert result["auc"] >= 0.95, result  # logistic regression: 0.931
