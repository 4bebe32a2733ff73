"""Building the configured strategy and its round-0 global record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedfm.privacy.accounting import sampled_hospitals
from fedfm.strategies import client_dp
from fedfm.strategies.checks import check
from fedfm.strategies.registry import client_plan, entry

if TYPE_CHECKING:
    from fedfm.config import RunConfig


def create(config: RunConfig, *, num_hospitals: int, **sampling: Any) -> Strategy:
    """The configured strategy, built with Flower's sampling keywords.

    Raises
    ------
    ConfigError
        For an unknown name or a configuration the strategy cannot run with.
    """
    check(config)
    item = entry(config.federation.strategy)
    factory = getattr(item.cls, "from_config", None)
    if item.options is not None:
        strategy = item.cls(**sampling, **item.options(config, num_hospitals))
    elif callable(factory):
        strategy = factory(config, num_hospitals=num_hospitals, **sampling)
    else:
        strategy = item.cls(**sampling)
    sampled = sampled_hospitals(num_hospitals, sampling.get("fraction_train", 1.0), sampling.get("min_train_nodes", 2))
    return client_dp.wrap(strategy, config, sampled)


def initial_arrays(strategy: Strategy, config: RunConfig, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The round-0 global record of ``strategy``, from the model's full initial adapter.

    A strategy may define ``initial_arrays(initial)`` (FLoRA starts from empty
    stacked factors); otherwise it is what the server's plan shares.
    """
    method = getattr(strategy, "initial_arrays", None)
    if callable(method):
        return method(initial)  # type: ignore[no-any-return]
    return client_plan(config, -1).shared(initial)
