"""Secure aggregation: Flower's SecAgg+ workflow driving fedfm's rounds.

With ``privacy.secure-aggregation`` the server runs Flower's
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` instead of the
Message-API strategy loop. Hospitals quantize their (example-weighted)
adapters and add pairwise masks that cancel in the sum; the server unmasks
only the sum, so it never sees one hospital's update. That is why the
strategy must be linear, and why per-hospital screening of updates (NaN,
shape, norm) is not possible on this path: each hospital checks its own.

The SecAgg+ workflow is written for Flower's legacy strategies, so the
linear strategies are mapped to their legacy counterparts (FedAvg's mean for
fedavg, fedprox, ffa-lora and fedsa-lora, whose aggregate is the plain mean
of what is shared). :class:`Bridge` records each round for fedfm's run
directory as the Message-API path does (bytes are not measured here).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context

from fedfm import keys, strategies
from fedfm.config import RunConfig, evaluation_due, round_learning_rate
from fedfm.errors import ConfigError
from fedfm.strategies import RoundRecord
from fedfm.strategies.secure import LEGACY, problems
from fedfm.wire import numpy_to_record

logger = logging.getLogger("fedfm")

class _Recording:
    """Mixin for a legacy Flower strategy: records fedfm's per-round ledger and drives its recorder."""

    recorder: Any
    config: RunConfig
    names: list[str]
    initial: dict[str, np.ndarray]

    def setup(self, config: RunConfig, initial: dict[str, np.ndarray], shared_names: list[str]) -> None:
        self.config = config
        self.initial = initial
        self.names = shared_names
        self.rounds: dict[int, RoundRecord] = {}
        self._node_to_hospital: dict[int, int] = {}
        self._pending: dict[int, tuple[ArrayRecord, dict[str, float] | None]] = {}
        self.final: dict[str, np.ndarray] | None = None
        #: Per round: how many different parameter vectors the server's strategy received (1 = only the sum).
        self.distinct_vectors: dict[int, int] = {}

    @property
    def inner(self) -> Any:
        return self

    def hospital_of(self, node_id: int) -> int | None:
        return self._node_to_hospital.get(node_id)

    def template(self, index: int) -> dict[str, np.ndarray]:
        return strategies.client_plan(self.config, index).shared(self.initial)

    def _arrays(self, parameters: Any) -> ArrayRecord:
        from flwr.common import parameters_to_ndarrays

        return numpy_to_record(dict(zip(self.names, parameters_to_ndarrays(parameters), strict=True)))

    def _record(self, server_round: int, results: list[Any], failures: list[Any], phase: str) -> RoundRecord:
        record = self.rounds.setdefault(server_round, RoundRecord())
        into = record.train if phase == "train" else record.evaluate
        for proxy, res in results:
            metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
            metrics[keys.NUM_EXAMPLES] = float(res.num_examples)
            index = int(metrics.get(keys.HOSPITAL_INDEX, -1))
            self._node_to_hospital[proxy.node_id] = index
            into[index] = metrics
        for number, failure in enumerate(failures):
            record.left_out[f"{phase}:failure {number}"] = str(failure)
            logger.warning("round %d: a hospital failed in %s: %s", server_round, phase, failure)
        return record

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        # Under SecAgg+ every result carries the same unmasked *sum* as its parameters, never its own update.
        record = self._record(server_round, results, failures, "train")
        record.train_replies = len(results)
        self.distinct_vectors[server_round] = len({b"".join(res.parameters.tensors) for _, res in results})
        parameters, metrics = super().aggregate_fit(server_round, results, failures)  # type: ignore[misc]
        record.train_aggregated = parameters is not None
        return parameters, metrics

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        """Centralized evaluation (Flower calls it after each round's fit): fedfm's recorder scores it."""
        arrays = self._arrays(parameters)
        self.final = {k: v.numpy() for k, v in arrays.items()}
        if server_round == 0:
            self.recorder(0, arrays)
            return None
        self._pending[server_round] = (arrays, self.recorder.central(server_round, arrays))
        if not self._federated_due(server_round):
            self.flush(server_round)
        return None

    def _federated_due(self, server_round: int) -> bool:
        return self.config.federation.fraction_evaluate > 0 and evaluation_due(self.config.federation, server_round)

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        if not self._federated_due(server_round):
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        self._record(server_round, results, failures, "evaluate")
        self.flush(server_round)
        return super().aggregate_evaluate(server_round, results, failures)  # type: ignore[misc]

    def flush(self, server_round: int | None = None) -> None:
        """Write the metrics line of a finished round (all pending rounds when ``None``)."""
        for r in [server_round] if server_round is not None else sorted(self._pending):
            if r in self._pending:
                arrays, central = self._pending.pop(r)
                self.recorder.record_round(r, arrays, central)


def bridge(config: RunConfig, *, num_hospitals: int, initial: dict[str, np.ndarray], instructions: dict[str, Any]) -> Any:
    """The legacy strategy of ``config``'s linear strategy, recording for fedfm."""
    from flwr.common import ndarrays_to_parameters

    if config.federation.strategy not in LEGACY:
        raise ConfigError(problems(config) or [f"no SecAgg+ mapping for {config.federation.strategy!r}"])
    cls, options = LEGACY[config.federation.strategy]
    fed = config.federation
    minimum = min(fed.min_hospitals, num_hospitals)
    shared = strategies.client_plan(config, -1).shared(initial)
    recording = type(f"Recording{cls.__name__}", (_Recording, cls), {})

    def round_config(server_round: int) -> dict[str, Any]:
        # The round's local learning rate travels as in the message API (federation.lr-decay).
        return {**instructions, keys.SERVER_ROUND: server_round,
                keys.LEARNING_RATE: round_learning_rate(config, server_round)}

    strategy = recording(
        fraction_fit=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_fit_clients=max(minimum, 2),
        min_evaluate_clients=minimum,
        min_available_clients=num_hospitals,
        initial_parameters=ndarrays_to_parameters(list(shared.values())),
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
        accept_failures=True,
        **options(config),
    )
    strategy.setup(config, initial, list(shared))
    return strategy


def run(grid: Any, context: Context | None, config: RunConfig, strategy: Any, *, max_weight: int) -> dict[str, np.ndarray]:
    """Run every round through SecAgg+; returns the final global record (by name)."""
    from flwr.app import RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    base = context or Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(
        base,
        config=ServerConfig(num_rounds=config.federation.num_rounds, round_timeout=config.federation.round_timeout),
        strategy=strategy,
    )
    spec = config.privacy
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled hospital holds a share of every other's keys
            reconstruction_threshold=spec.secagg_reconstruction_threshold,
            max_weight=float(max(max_weight, 1)),
            clipping_range=spec.secagg_clipping_range,
            quantization_range=spec.secagg_quantization_range,
            timeout=config.federation.round_timeout,
        )
    )
    workflow(grid, legacy)
    strategy.flush()
    assert strategy.final is not None
    return strategy.final  # type: ignore[no-any-return]

