"""The strategy registry: a name in the config maps to a Flower strategy class and what it can do.

Each registration states the strategy's capabilities, and they are kept in its
:class:`Entry`, where every other module reads them:

``linear``
    True when the aggregate is a weighted sum of the hospitals' updates (then
    secure aggregation and central DP can be combined with it).
``options(config, num_hospitals)``
    Extra constructor keywords read from the configuration (Flower's own strategies).
``plan(config, hospital)``
    The :class:`~fedfm.strategies.plan.ClientPlan` hospitals follow (what they train, keep and send).
``heterogeneous_ranks``
    Whether hospitals may train different LoRA ranks (``federation.client-ranks``).

A class registered without stating them says them itself, as class attributes
``linear`` and ``heterogeneous_ranks`` and a classmethod ``client_plan``; these are
read once, at registration (:func:`declared`). A class named in a config as
``module:Class`` is registered that way, and counts as non-linear unless it says
otherwise (the safe side). A class may also define the classmethods
``from_config(config, **sampling)`` (how it is built) and ``config_problems(config)``
(what in a configuration it cannot run with).

Modelled on Opacus's ``register_accountant``: a name is never replaced silently.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.serverapp.strategy import Strategy

from fedfm.errors import ConfigError
from fedfm.strategies.plan import ClientPlan

if TYPE_CHECKING:
    from fedfm.config import RunConfig

#: Builds a strategy's own keyword arguments from the config and the number of hospitals.
Options = Callable[["RunConfig", int], dict[str, Any]]
#: The plan hospital ``hospital`` follows (-1: the server's view).
Plan = Callable[["RunConfig", int], ClientPlan]


def _shares_everything(config: RunConfig, hospital: int) -> ClientPlan:
    return ClientPlan()


@dataclass(frozen=True)
class Entry:
    """One registered strategy and its capabilities."""

    name: str
    cls: type[Strategy]
    linear: bool
    options: Options | None = None
    plan: Plan = _shares_everything
    heterogeneous_ranks: bool = False


_REGISTRY: dict[str, Entry] = {}


def declared(cls: type) -> dict[str, Any]:
    """The capabilities class ``cls`` states itself: ``linear``, ``heterogeneous_ranks``, ``client_plan``.

    An attribute the class (or a base of it) does not define means no: not linear,
    one rank for all, a plan that trains and sends everything.
    """
    method = getattr(cls, "client_plan", None)
    return {
        "linear": bool(getattr(cls, "linear", False)),
        "heterogeneous_ranks": bool(getattr(cls, "heterogeneous_ranks", False)),
        "plan": method if callable(method) else _shares_everything,
    }


def register(
    name: str,
    cls: type[Strategy],
    *,
    linear: bool | None = None,
    options: Options | None = None,
    plan: Plan | None = None,
    heterogeneous_ranks: bool | None = None,
    force: bool = False,
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
        Whether the aggregate is a weighted sum of the updates. None: what the
        class states (its ``linear`` attribute), else False.
    options : callable, optional
        ``(config, num_hospitals) -> dict`` of extra constructor keywords.
    plan : callable, optional
        ``(config, hospital) -> ClientPlan``. None: the class's ``client_plan``
        classmethod, else a plan that trains and sends everything.
    heterogeneous_ranks : bool, optional
        Whether hospitals may train different ranks (``federation.client-ranks``).
        None: the class's ``heterogeneous_ranks`` attribute, else False.
    force : bool
        Replace a strategy registered under ``name`` already; without it that is refused.

    Raises
    ------
    TypeError
        ``cls`` is not a Flower strategy class.
    ConfigError
        ``name`` is registered already and ``force`` is False.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"strategy `{name}` must be a flwr.serverapp.strategy.Strategy subclass, got {cls!r}")
    if name in _REGISTRY and not force:
        old = _REGISTRY[name].cls
        raise ConfigError(
            f"strategy {name!r} is registered already (as {old.__module__}.{old.__qualname__}); choose another "
            f"name, or pass force=True to replace it"
        )
    own = declared(cls)
    _REGISTRY[name] = Entry(
        name,
        cls,
        linear=own["linear"] if linear is None else linear,
        options=options,
        plan=own["plan"] if plan is None else plan,
        heterogeneous_ranks=own["heterogeneous_ranks"] if heterogeneous_ranks is None else heterogeneous_ranks,
    )


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


def with_heterogeneous_ranks() -> list[str]:
    """Sorted names of the strategies whose hospitals may train different ranks."""
    return [n for n in available() if _REGISTRY[n].heterogeneous_ranks]


def client_plan(config: RunConfig, hospital: int) -> ClientPlan:
    """The plan hospital ``hospital`` follows under the configured strategy (-1: the server's view)."""
    return entry(config.federation.strategy).plan(config, hospital)
