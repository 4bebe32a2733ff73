"""Metric dicts as the server combines and shows them (pure: no Flower, no model)."""

from __future__ import annotations

from fedfm import keys

#: The metrics a log line shows, where a run has them (a classifier's, then a generative model's).
_HEADLINE = ("accuracy", "macro-f1", "perplexity")


def headline(metrics: dict[str, float] | None) -> str:
    """``accuracy 0.812 macro-f1 0.790`` (``perplexity 7.41`` for a generative model) for a log line; ``-`` for none."""
    if not metrics:
        return "-"
    return " ".join(f"{k} {metrics[k]:.3f}" for k in _HEADLINE if k in metrics)


def lead(metrics: dict[str, float]) -> str:
    """The first headline metric's value (``0.812``), for a hospital's entry on a log line; ``-`` for none."""
    return next((f"{metrics[k]:.3f}" for k in _HEADLINE if k in metrics), "-")


def weighted(per_hospital: dict[int, dict[str, float]]) -> dict[str, float]:
    """The metrics every hospital reports, averaged with their ``num-examples`` as weights ({} without examples).

    A metric some hospitals cannot report (an image classifier's AUC needs both classes among a hospital's
    test rows) is left out rather than counted as 0 for them, as ``GuardedStrategy.aggregate_evaluate`` does.
    """
    total = sum(m.get(keys.NUM_EXAMPLES, 0.0) for m in per_hospital.values())
    if total <= 0:
        return {}
    names = set.intersection(*(set(m) for m in per_hospital.values())) - {keys.NUM_EXAMPLES, keys.HOSPITAL_INDEX}
    return {k: sum(m[k] * m.get(keys.NUM_EXAMPLES, 0.0) for m in per_hospital.values()) / total for k in sorted(names)}


def plain(metrics: dict[str, float]) -> dict[str, float]:
    """A hospital's evaluate metrics without its validation and personalized ones (the global adapter on its test rows)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith((keys.VALIDATION_PREFIX, keys.PERSONALIZED_PREFIX))}


def with_prefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The ``prefix``-ed metrics with the prefix taken off, and the row count they were measured on."""
    out = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    if out and keys.NUM_EXAMPLES in metrics:
        out[keys.NUM_EXAMPLES] = metrics[keys.NUM_EXAMPLES]
    return out
