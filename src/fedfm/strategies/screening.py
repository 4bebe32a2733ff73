"""The checks a hospital's reply must pass before it may enter a round, each a pure function.

Every check takes plain data (metrics as a mapping, arrays as numpy) and
returns why the reply is left out of the round, or None when it passes.
:class:`fedfm.strategies.guard.GuardedStrategy` unpacks Flower's messages,
calls them in order, and records and logs each reason with the hospital's id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedfm import keys
from fedfm.strategies.validation import update_problems

__all__ = [
    "NO_REPLY", "error_reason", "evaluate_reason", "examples_reason", "norm_reasons", "refusal_reason",
    "shape_reason", "update_norm", "update_reason",
]

#: Why a hospital asked to train is left out when no reply came.
NO_REPLY = "no reply within federation.round-timeout (down, disconnected or too slow)"


def error_reason(reason: str | None, limit: int = 300) -> str:
    """An error reply's reason: the exception's own message, without the traceback a simulation wraps it in."""
    text = str(reason)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.strip().strip("'>").splitlines() if line.strip()]
    text = lines[-1] if lines else text
    return "error reply: " + (text if len(text) <= limit else text[: limit - 3] + "...")


def refusal_reason(metrics: Mapping[str, Any] | None) -> str | None:
    """A hospital that refused to train because its DP-SGD budget is spent (its ledger still counts)."""
    if metrics is None or not metrics.get(keys.DP_REFUSED):
        return None
    return (f"refused to train: its DP budget ε {metrics.get(keys.DP_TARGET_EPSILON)} is spent "
            f"(ε {float(metrics.get(keys.DP_EPSILON, 0.0)):.3f} so far)")


def shape_reason(array_records: int, metrics: Mapping[str, Any] | None) -> str | None:
    """A training reply holds exactly one ArrayRecord and one MetricRecord."""
    if array_records != 1 or metrics is None:
        return "reply must hold exactly one ArrayRecord and one MetricRecord"
    return None


def examples_reason(metrics: Mapping[str, Any]) -> str | None:
    """A training reply's example count is a positive number (the aggregate's weight)."""
    examples = metrics.get(keys.NUM_EXAMPLES)
    if not isinstance(examples, (int, float)) or examples <= 0:
        return f"`{keys.NUM_EXAMPLES}` must be a positive number, got {examples!r}"
    return None


def update_reason(update: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> str | None:
    """An update has the names and shapes the hospital had to send, numbers only, all finite."""
    problems = update_problems(dict(update), dict(template))
    return "; ".join(problems) if problems else None


def update_norm(update: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of an update's change to what its hospital started the round from."""
    return float(np.sqrt(sum(
        np.sum((update[k].astype(np.float64) - start[k].astype(np.float64)) ** 2) for k in update
    )))


def norm_reasons(norms: Sequence[float], limit: float) -> list[str | None]:
    """For each update's change norm: why it is too large for the round (``limit`` x the median), or None.

    Needs three updates at least (with two, each is within 2x of the median) and ``limit`` > 0.
    """
    if limit <= 0 or len(norms) < 3:
        return [None] * len(norms)
    median = float(np.median(norms))
    if median <= 0:
        return [None] * len(norms)
    return [
        f"update norm {norm:.3g} is {norm / median:.1f}x the round's median {median:.3g} "
        f"(federation.update-norm-limit {limit:g})" if norm > limit * median else None
        for norm in norms
    ]


def evaluate_reason(metrics: Mapping[str, Any] | None) -> str | None:
    """An evaluation reply holds one MetricRecord with its example count."""
    if metrics is None or not isinstance(metrics.get(keys.NUM_EXAMPLES), (int, float)):
        return "reply must hold one MetricRecord with `num-examples`"
    return None
