"""Classification metrics as plain numpy functions."""

from __future__ import annotations

import numpy as np


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Share of predictions equal to the labels (0 for no rows)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return float((labels == predictions).mean()) if labels.size else 0.0


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scores = []
    for c in range(num_classes):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent on both sides: no evidence either way
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def weighted_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Per-class F1 averaged with the classes' support in the labels."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    total, acc = 0, 0.0
    for c in range(num_classes):
        support = int((labels == c).sum())
        if support == 0:
            continue
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = support - tp
        acc += support * (2 * tp / (2 * tp + fp + fn))
        total += support
    return acc / total if total else 0.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int, loss: float) -> dict[str, float]:
    """The standard metric set every task reports."""
    return {
        "loss": float(loss),
        "accuracy": accuracy(labels, predictions),
        "macro-f1": macro_f1(labels, predictions, num_classes),
        "weighted-f1": weighted_f1(labels, predictions, num_classes),
    }
