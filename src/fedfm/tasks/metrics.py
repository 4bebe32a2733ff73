"""Classification and entity metrics as plain numpy / Python functions."""

from __future__ import annotations

from collections.abc import Sequence

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


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic); NaN without both."""
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


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int, loss: float) -> dict[str, float]:
    """The standard metric set every task reports."""
    return {
        "loss": float(loss),
        "accuracy": accuracy(labels, predictions),
        "macro-f1": macro_f1(labels, predictions, num_classes),
        "weighted-f1": weighted_f1(labels, predictions, num_classes),
    }


def binary_rates(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Sensitivity (recall of class 1, the positive class as AUC counts it) and specificity (recall of class 0)
    of a two-class prediction; each only when the labels hold its class.

    Parameters
    ----------
    labels, predictions : numpy.ndarray
        Class ids 0 or 1, one per row.

    Returns
    -------
    dict
        ``sensitivity`` and/or ``specificity``, in [0, 1].
    """
    rates = {}
    for name, cls in (("sensitivity", 1), ("specificity", 0)):
        rows = labels == cls
        if rows.any():
            rates[name] = float(np.mean(predictions[rows] == cls))
    return rates


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entity spans of one BIO-tagged sequence, as ``(type, start, end)`` with ``end`` exclusive.

    ``B-X`` starts an entity of type ``X``; ``I-X`` continues the entity just
    before it when that entity has type ``X``, and otherwise starts a new one
    (an ``I-`` after ``O`` or after another type counts, as in CoNLL's
    ``conlleval``, rather than being dropped). Any other tag (``O``, or a tag
    without a ``B-``/``I-`` prefix) is outside every entity.

    Parameters
    ----------
    tags : Sequence[str]
        One tag per word.

    Returns
    -------
    set of (str, int, int)
        The spans.
    """
    spans: set[tuple[str, int, int]] = set()
    kind: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and bool(name) and kind == name
        if continues:
            continue
        if kind is not None:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and name:
            kind, start = name, i
    if kind is not None:
        spans.add((kind, start, len(tags)))
    return spans


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (exact span and type match), micro over all entities.

    A predicted entity counts only when its type, first and last word all equal
    a gold entity's; a partly overlapping prediction is one false positive and
    leaves the gold entity a false negative.

    Parameters
    ----------
    gold, predicted : Sequence of Sequence of str
        BIO tags per sentence, the two sides of equal shape.

    Returns
    -------
    dict[str, float]
        ``entity-precision``, ``entity-recall``, ``entity-f1`` (0 where undefined)
        and the counts ``entity-true``, ``entity-predicted``, ``entity-correct``.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predicted")
    n_gold = n_pred = n_correct = 0
    for g, p in zip(gold, predicted, strict=True):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(g)} gold tags but {len(p)} predicted")
        g_spans, p_spans = bio_entities(g), bio_entities(p)
        n_gold += len(g_spans)
        n_pred += len(p_spans)
        n_correct += len(g_spans & p_spans)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * n_correct / (n_gold + n_pred) if n_gold + n_pred else 0.0
    return {
        "entity-precision": precision,
        "entity-recall": recall,
        "entity-f1": f1,
        "entity-true": float(n_gold),
        "entity-predicted": float(n_pred),
        "entity-correct": float(n_correct),
    }
