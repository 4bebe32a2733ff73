"""The strategy registry: a name in the config maps to a Flower strategy class.

A registered class may declare, as class attributes, what fedfm needs beyond
Flower's interface (all optional; plain Flower strategies work as they are):

``linear``
    True when the aggregate is a weighted sum of the hospitals' updates (then
    secure aggregation and central DP can be combined with it). Unknown
    classes count as non-linear, the safe side.
``from_config(config, **sampling)``
    A classmethod building the strategy from a :class:`~fedfm.config.RunConfig`
    and Flower's sampling keywords; without it the class is called with the
    sampling keywords only.
``client_plan(config, hospital)``
    A classmethod returning the :class:`~fedfm.strategies.plan.ClientPlan`
    hospitals follow (what they train, keep and send).
``config_problems(config)``
    A classmethod listing what in a configuration this strategy cannot run with.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedfm.errors import ConfigError
from fedfm.privacy.accounting import sampled_hospitals
from fedfm.strategies import client_dp
from fedfm.strategies.plan import ClientPlan

if TYPE_CHECKING:
    from fedfm.config import RunConfig

#: Builds a strategy's own keyword arguments from the config and the number of hospitals.
Options = Callable[["RunConfig", int], dict[str, Any]]


@dataclass(frozen=True)
class Entry:
    """One registered strategy."""

    name: str
    cls: type[Strategy]
    linear: bool
    options: Options | None = None
    plan: Callable[[RunConfig, int], ClientPlan] | None = None


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    cls: type[Strategy],
    *,
    linear: bool | None = None,
    options: Options | None = None,
    plan: Callable[[RunConfig, int], ClientPlan] | None = None,
) -> None:
    """Make ``cls`` available as ``federation.strategy = name``.

    Parameters
    ----------
    name : str
        The name used in configs.
    cls : type
        A ``flwr.serverapp.strategy.Strategy`` subclass. It is built with
        Flower's sampling keywords (``fraction_train``, ``fraction_evaluate``,
        ``min_train_nodes``, ``min_evaluate_nodes``, ``min_available_nodes``),
        plus ``options(config, num_hospitals)`` when given, or by its own
        ``from_config`` classmethod.
    linear : bool, optional
        Whether the aggregate is a weighted sum of the updates; defaults to the
        class's ``linear`` attribute, else False.
    options : callable, optional
        ``(config, num_hospitals) -> dict`` of extra constructor keywords.
    plan : callable, optional
        ``(config, hospital) -> ClientPlan``; defaults to the class's
        ``client_plan`` classmethod, else a plan that trains and sends everything.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"strategy `{name}` must be a flwr.serverapp.strategy.Strategy subclass, got {cls!r}")
    is_linear = bool(getattr(cls, "linear", False)) if linear is None else linear
    _REGISTRY[name] = Entry(name, cls, is_linear, options, plan)


def available() -> list[str]:
    """Sorted names of the registered strategies."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> str:
    return (
        f"`federation.strategy` must be one of {available()} or `module:Class` of a Flower strategy, got {name!r}"
    )


def entry(name: str) -> Entry:
    """The registered entry of ``name``; ``module:Class`` imports and registers a user's class.

    Raises
    ------
    ConfigError
        For an unknown name (listing the known ones) or an import that fails.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"`federation.strategy` {name!r} cannot be imported: {err}") from err
        # The import may have registered it under this name already.
        if name not in _REGISTRY:
            try:
                register(name, cls)
            except TypeError as err:
                raise ConfigError(f"`federation.strategy` {name!r}: {err}") from err
        return _REGISTRY[name]
    raise ConfigError(_unknown(name))


def is_linear(name: str) -> bool:
    """Whether the strategy ``name`` aggregates by a weighted sum of the hospitals' updates."""
    return entry(name).linear


def require_linear(name: str, feature: str) -> str | None:
    """Why ``feature`` (e.g. secure aggregation) cannot run with strategy ``name``; None when it can.

    Secure aggregation reveals only the sum of the updates to the server, and
    central DP adds noise calibrated to one hospital's share of a sum: both
    need an aggregate that is a weighted sum.
    """
    try:
        linear = is_linear(name)
    except ConfigError as err:
        return str(err)
    if linear:
        return None
    linear_names = [n for n in available() if _REGISTRY[n].linear]
    return (
        f"{feature} needs a strategy whose aggregate is a weighted sum of the hospitals' updates, "
        f"because the server only sees that sum; `federation.strategy` {name!r} is not linear "
        f"(linear strategies: {linear_names})"
    )


def config_problems(config: RunConfig) -> list[str]:
    """What in ``config`` the chosen strategy cannot run with (an unknown name included)."""
    try:
        item = entry(config.federation.strategy)
    except ConfigError as err:
        return list(err.problems)
    check = getattr(item.cls, "config_problems", None)
    problems = list(check(config)) if callable(check) else []
    plan = client_plan(config, 0)
    shares_everything = not (plan.fixed or plan.private or plan.fold) and plan.rank is None
    problems.extend(client_dp.problems(config, item.cls, shares_everything))
    from fedfm.strategies import secure  # imports require_linear from this module

    problems.extend(secure.problems(config))
    if config.federation.client_ranks and not getattr(item.cls, "heterogeneous_ranks", False):
        ranked = [n for n in available() if getattr(_REGISTRY[n].cls, "heterogeneous_ranks", False)]
        problems.append(
            f"`federation.client-ranks` is set, but strategy {item.name!r} gives every hospital the same rank; "
            f"use one of {ranked} or leave it empty"
        )
    return problems


def check(config: RunConfig) -> None:
    """Raise :class:`ConfigError` listing :func:`config_problems`, if any."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems)


def client_plan(config: RunConfig, hospital: int) -> ClientPlan:
    """The plan hospital ``hospital`` follows under the configured strategy (-1: the server's view)."""
    item = entry(config.federation.strategy)
    if item.plan is not None:
        return item.plan(config, hospital)
    method = getattr(item.cls, "client_plan", None)
    return method(config, hospital) if callable(method) else ClientPlan()


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
