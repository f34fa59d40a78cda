import numpy as np
import pytest

from recsys import metrics


def brute_force_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # rounding makes many ties
    assert metrics.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_edge_cases():
    assert metrics.auc([0, 1], [0.1, 0.9]) == 1.0
    assert metrics.auc([0, 1], [0.9, 0.1]) == 0.0
    assert metrics.auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.auc([1, 1], [0.2, 0.3])


def test_logloss_and_normalized_entropy():
    labels = np.array([1, 0, 1, 1])
    probs = np.array([0.9, 0.2, 0.6, 0.99])
    want = -np.mean(np.log([0.9, 0.8, 0.6, 0.99]))
    assert metrics.logloss(labels, probs) == pytest.approx(want)
    base = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert metrics.normalized_entropy(labels, probs) == pytest.approx(want / base)
    assert metrics.normalized_entropy(labels, np.full(4, 0.75)) == pytest.approx(1.0)
