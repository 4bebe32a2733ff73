"""Which strategies secure aggregation (Flower's SecAgg+) can run, and with which legacy Flower class.

The SecAgg+ workflow reveals only the weighted *sum* of the hospitals'
adapters and is written for Flower's legacy strategies; fedfm runs a linear
strategy there by its legacy counterpart (see :mod:`fedfm.secagg`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedfm.config import RunConfig
from fedfm.strategies.flower import server_eta
from fedfm.strategies.registry import require_linear

#: Linear strategies the SecAgg+ path runs, with their legacy Flower class and its options.
LEGACY: dict[str, tuple[type, Callable[[RunConfig], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda c: {}),
    "fedprox": (FedAvg, lambda c: {}),  # the proximal term is in each hospital's loss; the aggregate is the mean
    "ffa-lora": (FedAvg, lambda c: {}),  # the mean of the B factors (A is frozen and never sent)
    "fedsa-lora": (FedAvg, lambda c: {}),  # the mean of the A factors (each B stays home)
    "fedavgm": (FedAvgM, lambda c: {"server_learning_rate": c.strategy.server_learning_rate,
                                    "server_momentum": c.strategy.server_momentum}),
    "fedadam": (FedAdam, lambda c: {"eta": server_eta(c, "fedadam"), "beta_1": c.strategy.beta_1,
                                    "beta_2": c.strategy.beta_2, "tau": c.strategy.tau}),
    "fedyogi": (FedYogi, lambda c: {"eta": server_eta(c, "fedyogi"), "beta_1": c.strategy.beta_1,
                                    "beta_2": c.strategy.beta_2, "tau": c.strategy.tau}),
    "fedadagrad": (FedAdagrad, lambda c: {"eta": server_eta(c, "fedadagrad"), "tau": c.strategy.tau}),
}


def problems(config: RunConfig) -> list[str]:
    """Why secure aggregation cannot run with this configuration (empty when it can)."""
    if not config.privacy.secure_aggregation:
        return []
    name = config.federation.strategy
    reason = require_linear(name, "`privacy.secure-aggregation`")
    if reason is not None:
        return [reason]
    if name not in LEGACY:
        message = (
            f"`privacy.secure-aggregation` runs Flower's SecAgg+ workflow, which fedfm wires to {sorted(LEGACY)}; "
            f"strategy {name!r} is linear but not one of them"
        )
        return [message]
    return []
