"""The shell shared by fedfm's own strategies: Flower's FedAvg sampling, a pure aggregation function inside.

A subclass implements :meth:`AdapterStrategy.aggregate_arrays` over named numpy
arrays (no Flower, no torch) and, where hospitals must behave differently,
:meth:`AdapterStrategy.client_plan`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedfm import keys
from fedfm.strategies.plan import ClientPlan
from fedfm.wire import numpy_to_record, record_to_numpy

if TYPE_CHECKING:
    from fedfm.config import RunConfig


@dataclass(frozen=True)
class Update:
    """One hospital's reply, as the pure aggregation functions see it."""

    arrays: dict[str, np.ndarray]
    weight: float  # the hospital's training examples
    hospital: int


def weighted_mean(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-tensor weighted mean of same-shaped named arrays.

    Parameters
    ----------
    arrays : sequence of mapping of str to ndarray
        One mapping per hospital, all with the same names and shapes.
    weights : sequence of float
        Non-negative weights (e.g. example counts), not all zero.

    Returns
    -------
    dict of str to ndarray
        ``sum_k w_k x_k / sum_k w_k`` per name, in float32.
    """
    total = float(sum(weights))
    if not arrays or total <= 0:
        raise ValueError("weighted_mean needs at least one array set and a positive total weight")
    out: dict[str, np.ndarray] = {}
    for name in arrays[0]:
        acc = np.zeros(np.shape(arrays[0][name]), dtype=np.float64)
        for values, w in zip(arrays, weights, strict=True):
            acc += (w / total) * np.asarray(values[name], dtype=np.float64)
        out[name] = acc.astype(np.float32)
    return out


class AdapterStrategy(FedAvg):
    """FedAvg's sampling and messages around a pure aggregation of named adapter tensors.

    Parameters
    ----------
    config : RunConfig
        The run's configuration (strategy parameters, ranks).
    **sampling
        Flower's FedAvg keywords (``fraction_train``, ``min_train_nodes``, ...).
    """

    #: The aggregate is a weighted sum of the updates (secure aggregation and central DP can wrap it).
    linear: ClassVar[bool] = True
    #: Hospitals may train different LoRA ranks (``federation.client-ranks``).
    heterogeneous_ranks: ClassVar[bool] = False
    #: Hospitals keep part of the model; the global adapter alone is not the model they use.
    personalized: ClassVar[bool] = False

    def __init__(self, *, config: RunConfig, **sampling: Any) -> None:
        super().__init__(**sampling)
        self.config = config
        self.current: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, config: RunConfig, *, num_hospitals: int, **sampling: Any) -> AdapterStrategy:
        return cls(config=config, **sampling)

    @classmethod
    def client_plan(cls, config: RunConfig, hospital: int) -> ClientPlan:
        """What hospital ``hospital`` trains, keeps and sends (-1: the server's view)."""
        return ClientPlan()

    def initial_arrays(self, initial: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global record of round 0, from the model's full initial adapter."""
        return self.client_plan(self.config, -1).shared(initial)

    def aggregate_arrays(self, server_round: int, updates: list[Update]) -> dict[str, np.ndarray]:
        """The next global arrays from the valid updates (pure numpy); subclasses implement it."""
        raise NotImplementedError

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Iterable[Message]:
        self.current = record_to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Shapes may differ between hospitals (heterogeneous ranks): Flower's consistency check
        # compares record names only, and GuardedStrategy has checked every shape already.
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        updates = []
        for msg in valid:
            metrics = next(iter(msg.content.metric_records.values()))
            arrays = next(iter(msg.content.array_records.values()))
            updates.append(
                Update(
                    record_to_numpy(arrays),
                    float(metrics[self.weighted_by_key]),  # type: ignore[arg-type]
                    int(metrics.get(keys.HOSPITAL_INDEX, -1)),  # type: ignore[arg-type]
                )
            )
        merged = self.aggregate_arrays(server_round, updates)
        metrics = self.train_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)
        return numpy_to_record(merged), metrics
