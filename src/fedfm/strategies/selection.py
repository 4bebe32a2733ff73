"""Best-round selection and early stopping on the hospitals' validation scores (pure: numpy only).

In every evaluated round each hospital scores the new global adapter on its
validation split (rows held out of its training rows, ``data.validation-fraction``)
and sends ``val-<metric>`` with ``val-examples``. The server weights them by
rows (:func:`validation_of`), and :class:`BestRound` keeps the round with the
best score and that round's adapter, and says when ``federation.patience``
rounds have passed without a better one. Test scores never enter: they are
reported for the chosen and the last round, not used to choose.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfm import keys

#: Metrics where a smaller value is better; every other metric is better when larger.
LOWER_IS_BETTER = frozenset({"loss"})


def validation_of(per_hospital: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The hospitals' validation metrics, averaged with their validation rows as weights.

    Parameters
    ----------
    per_hospital : iterable of mappings
        Each hospital's evaluate metrics; only ``val-*`` entries with a positive
        ``val-examples`` count.

    Returns
    -------
    dict
        Metric name (without the ``val-`` prefix) to its weighted mean, and
        ``examples``, the validation rows in all; empty when no hospital sent any.
    """
    prefix = keys.VALIDATION_PREFIX
    rows = [m for m in per_hospital if float(m.get(keys.VALIDATION_EXAMPLES, 0.0)) > 0]
    if not rows:
        return {}
    total = sum(float(m[keys.VALIDATION_EXAMPLES]) for m in rows)
    # Only what every hospital reports: a missing metric (AUC of one-class rows) must not count as 0.
    common = set.intersection(*(set(m) for m in rows))
    names = sorted(k for k in common if k.startswith(prefix) and k != keys.VALIDATION_EXAMPLES)
    out = {
        name[len(prefix):]: sum(float(m[name]) * float(m[keys.VALIDATION_EXAMPLES]) for m in rows) / total
        for name in names
    }
    out["examples"] = total
    return out


def improves(metric: str, new: float | None, old: float | None) -> bool:
    """Whether ``new`` is strictly better than ``old`` on ``metric`` (a non-finite ``new`` never is)."""
    if new is None or not math.isfinite(new):
        return False
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


def best_round(history: Iterable[Mapping[str, Any]], metric: str) -> tuple[int | None, float | None]:
    """The round of ``metrics.jsonl`` lines with the best validation score (the earliest on ties).

    Parameters
    ----------
    history : iterable of mappings
        Round lines: ``round`` and, for validated rounds, ``validation`` (:func:`validation_of`).
        Their test scores (``global``, ``federated``) are never read.
    metric : str
        ``loss``, ``accuracy``, ``macro-f1`` (``federation.select-metric``).

    Returns
    -------
    tuple
        The best round and its score, or (None, None) when no round was validated.
    """
    chosen: tuple[int | None, float | None] = (None, None)
    for entry in history:
        score = (entry.get("validation") or {}).get(metric)
        if improves(metric, score, chosen[1]):
            chosen = (int(entry["round"]), float(score))  # type: ignore[arg-type]
    return chosen


@dataclass
class BestRound:
    """The best validated round so far and its global adapter; early stopping after ``patience`` rounds.

    Parameters
    ----------
    metric : str
        The validation metric that decides (``federation.select-metric``).
    patience : int
        Rounds without a better score after which :meth:`stop_reason` stops the run; 0 never.
    """

    metric: str
    patience: int = 0
    round: int | None = None
    score: float | None = None
    arrays: dict[str, np.ndarray] | None = None

    def observe(self, server_round: int, validation: Mapping[str, float], arrays: Mapping[str, np.ndarray]) -> bool:
        """Take round ``server_round``'s weighted validation metrics; keep its adapter if it is the best so far."""
        score = validation.get(self.metric)
        if not improves(self.metric, score, self.score):
            return False
        self.round, self.score = server_round, float(score)  # type: ignore[arg-type]
        self.arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        return True

    def stop_reason(self, server_round: int, num_rounds: int) -> str | None:
        """Why to stop after ``server_round``: ``patience`` rounds since the best one (None: go on)."""
        if self.patience <= 0 or self.round is None or server_round >= num_rounds:
            return None
        if server_round - self.round < self.patience:
            return None
        return (f"early stopping: validation {self.metric} did not improve for {server_round - self.round} round(s) "
                f"after round {self.round} ({self.score:.4f}); federation.patience = {self.patience}")

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able state and the best adapter's arrays (for the server's checkpoint)."""
        state = {"metric": self.metric, "round": self.round, "score": self.score}
        return state, {f"best/{k}": v for k, v in (self.arrays or {}).items()}

    def load_state_dict(self, state: Mapping[str, Any] | None, arrays: Mapping[str, np.ndarray]) -> None:
        """Put back what :meth:`state_dict` gave (a checkpoint of another metric is ignored)."""
        if not state or state.get("metric") != self.metric or state.get("round") is None:
            return
        self.round, self.score = int(state["round"]), float(state["score"])
        self.arrays = {k[len("best/"):]: np.asarray(v) for k, v in arrays.items() if k.startswith("best/")}
