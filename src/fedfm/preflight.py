"""Every check a run's configuration gets before any model loads, in one call.

A :class:`~fedfm.config.RunConfig` is validated field by field when it is built
(:func:`fedfm.config.validate`); what needs more than the configuration itself
is checked here, in this order, and reported at once:

1. the strategy: its name in the registry, and what it cannot be combined with
   (:func:`fedfm.strategies.config_problems`: client-level DP, secure aggregation,
   ``federation.client-ranks``, a quantized base under a strategy that folds into it);
   this machine: the model's weights must be there (:func:`fedfm.adapters.model_problems`: the package an
   alias ships in, or a model folder), a quantized base needs a CUDA GPU and bitsandbytes
   (:func:`fedfm.adapters.hardware_problems`), simulated hospitals' GPU shares a GPU; in a
   simulation, ``data.hospitals`` (a deployment's hospitals) is refused;
2. the data: the federation is read and split (:func:`fedfm.workspace.federation_for`;
   an unreadable or one-class file is a :class:`~fedfm.errors.DataError`), then
   checked against the rounds asked for (:func:`fedfm.data.check_federation`);
3. privacy: what each hospital's DP-SGD budget allows (:func:`fedfm.privacy.check`).

``fedfm run`` (:func:`fedfm.run`), the ServerApp (``flwr run``, SuperLink) and
``fedfm check`` all call :func:`preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfm import privacy, strategies, tracking
from fedfm.adapters import hardware_problems, model_problems
from fedfm.config import RunConfig
from fedfm.data import Federation, check_federation
from fedfm.errors import ConfigError
from fedfm.privacy import PlannedBudget
from fedfm.tasks import get_task
from fedfm.workspace import federation_for

__all__ = ["Preflight", "config_problems", "preflight"]


@dataclass(frozen=True)
class Preflight:
    """What the checks computed, for the run to use rather than compute again.

    Attributes
    ----------
    federation : Federation
        The run's hospitals and global test set (cached per process).
    privacy : list of PlannedBudget
        Each hospital's DP-SGD plan; empty without DP-SGD, and in a deployment
        (its hospitals plan their own).
    """

    federation: Federation
    privacy: list[PlannedBudget]


def config_problems(config: RunConfig, *, simulation: bool = False) -> list[str]:
    """Every problem found from the configuration and the code alone (no data read).

    Parameters
    ----------
    config : RunConfig
        A configuration (valid field by field, as every ``RunConfig`` is).
    simulation : bool
        The hospitals are simulated from ``data.dataset`` (``fedfm run``), so
        ``data.hospitals`` (a deployment's) is refused.
    """
    problems = strategies.config_problems(config)
    problems.extend(tracking.problems(config))
    problems.extend(model_problems(config.model))
    problems.extend(hardware_problems(config.model))
    if config.model.quantization != "none" and not problems and strategies.client_plan(config, 0).fold:
        problems.append(
            f"`model.quantization` {config.model.quantization!r} cannot be combined with strategy "
            f"{config.federation.strategy!r}: it folds each round's update into the base weights, which a "
            f"quantized base cannot take; use model.quantization = \"none\" or another strategy"
        )
    if simulation and config.federation.gpus_per_hospital > 0 and not torch.cuda.is_available():
        problems.append(
            f"`federation.gpus-per-hospital` ({config.federation.gpus_per_hospital}) reserves GPUs for the "
            f"simulated hospitals, but torch sees no CUDA GPU on this machine; set it to 0"
        )
    if simulation and config.data.hospitals:
        problems.append(
            f"`data.hospitals` {list(config.data.hospitals)} lists a deployment's hospitals, whose rows are on their "
            "own SuperNodes (docs/how-to/deploy.md); a simulation splits `data.dataset` into hospitals: leave "
            "`data.hospitals` empty"
        )
    return problems


def preflight(config: RunConfig, *, simulation: bool = False) -> Preflight:
    """Run every check that needs no model, in order, and return what they computed.

    Parameters
    ----------
    config : RunConfig
        The run's configuration.
    simulation : bool
        True for ``fedfm.run`` (hospitals simulated from ``data.dataset``).

    Returns
    -------
    Preflight
        The federation and the hospitals' DP-SGD plans.

    Raises
    ------
    ConfigError
        Listing every problem of the strategy and the configuration (before any data is
        read), or else every problem of the federation and the privacy budgets.
    DataError
        The dataset cannot be read or split into hospitals.
    """
    problems = config_problems(config, simulation=simulation)
    if problems:
        raise ConfigError(problems)
    federation = federation_for(config.data, kind=get_task(config.model.task).data_kind)
    plans: list[PlannedBudget] = []
    try:
        check_federation(config, federation)
    except ConfigError as err:
        problems.extend(err.problems)
    try:
        plans = privacy.check(config, federation)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return Preflight(federation, plans)
