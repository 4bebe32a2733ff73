"""Aggregation strategies: a registry of Flower strategies wired to adapters.

``federation.strategy = "name"`` picks a class registered with :func:`register`;
:class:`GuardedStrategy` wraps whichever is chosen so that bad replies are left
out of the round.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from fedfm.errors import ConfigError
from fedfm.strategies.guard import GuardedStrategy, RoundRecord
from fedfm.strategies.validation import update_problems

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str, cls: type[Strategy]) -> None:
    """Make ``cls`` available as ``federation.strategy = name``.

    The class is built with Flower's sampling keywords (``fraction_train``,
    ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
    ``min_available_nodes``), as Flower's FedAvg family accepts them.
    """
    _REGISTRY[name] = cls


def available() -> list[str]:
    """Sorted names of the registered strategies."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Strategy:
    """An instance of the strategy registered as ``name``.

    Raises
    ------
    ConfigError
        For an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"`federation.strategy` must be one of {available()}, got {name!r}")
    return _REGISTRY[name](**kwargs)


register("fedavg", FedAvg)

__all__ = ["GuardedStrategy", "RoundRecord", "available", "create", "register", "update_problems"]
