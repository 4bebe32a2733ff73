"""A measured privacy check: how well does a model's loss tell its training rows from unseen ones?

The loss-threshold membership-inference attack (Yeom et al., CSF 2018) calls a
row a member when the model's loss on it is low. Its ROC AUC over a
hospital's training rows (members) and its held-out rows (non-members) is
0.5 when the model has memorized nothing that the attack can see, and
approaches 1 as the model overfits its rows. Each hospital computes it on
its own rows; only the scalar leaves.
"""

from __future__ import annotations

import numpy as np


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic)."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if positive.size == 0 or negative.size == 0:
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks (1-based) over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the attack that predicts "member" for low loss."""
    return roc_auc(-np.asarray(member_losses), -np.asarray(nonmember_losses))
