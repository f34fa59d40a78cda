"""Evaluation metrics on host arrays: exact AUC, log-loss, normalized entropy."""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for tied scores).

    Raises ValueError when the labels hold only one class (AUC is undefined).
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"auc: {labels.size} labels but {scores.size} scores")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("auc: needs both positive and negative labels")
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    # Average rank (1-based) of each run of equal scores.
    starts = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1]]))
    ends = np.concatenate([starts[1:], [ranked.size]])
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(ranked.size)
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7]."""
    labels = np.asarray(labels, np.float64).ravel()
    probs = np.clip(np.asarray(probs, np.float64).ravel(), _EPS, 1 - _EPS)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Log-loss divided by the entropy of always predicting the base rate (He et al. 2014)."""
    rate = float(np.clip(np.mean(labels), _EPS, 1 - _EPS))
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return logloss(labels, probs) / base
