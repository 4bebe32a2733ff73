"""What in a configuration the chosen strategy cannot run with, found before anything is built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedfm.errors import ConfigError
from fedfm.strategies import client_dp, secure
from fedfm.strategies.registry import client_plan, entry, with_heterogeneous_ranks

if TYPE_CHECKING:
    from fedfm.config import RunConfig


def config_problems(config: RunConfig) -> list[str]:
    """What in ``config`` the chosen strategy cannot run with (an unknown name included)."""
    try:
        item = entry(config.federation.strategy)
    except ConfigError as err:
        return list(err.problems)
    check_own = getattr(item.cls, "config_problems", None)
    problems = list(check_own(config)) if callable(check_own) else []
    plan = client_plan(config, 0)
    shares_everything = not (plan.fixed or plan.private or plan.fold) and plan.rank is None
    problems.extend(client_dp.problems(config, item.cls, shares_everything))
    problems.extend(secure.problems(config))
    if config.federation.client_ranks and not item.heterogeneous_ranks:
        problems.append(
            f"`federation.client-ranks` is set, but strategy {item.name!r} gives every hospital the same rank; "
            f"use one of {with_heterogeneous_ranks()} or leave it empty"
        )
    return problems


def check(config: RunConfig) -> None:
    """Raise :class:`ConfigError` listing :func:`config_problems`, if any."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems)
