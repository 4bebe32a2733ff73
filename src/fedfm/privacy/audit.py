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

from fedfm.tasks.metrics import roc_auc

__all__ = ["loss_threshold_auc", "roc_auc"]


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the attack that predicts "member" for low loss."""
    return roc_auc(-np.asarray(member_losses), -np.asarray(nonmember_losses))
