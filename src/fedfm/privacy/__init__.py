"""Differential privacy for fedfm: DP-SGD in each hospital and a privacy ledger that survives restarts.

- :mod:`fedfm.privacy.accounting`: the ledger, ε from Opacus's accountants, calibration.
- :mod:`fedfm.privacy.dpsgd`: Poisson sampling, per-example clipping and noise (Opacus).
- :mod:`fedfm.privacy.hospital`: a hospital's DP policy (budget, δ, batch size, recipe); its ledger is kept by
  :class:`fedfm.hospital_state.HospitalSession`.

:func:`check` is called before any model loads: it refuses settings that
cannot work for this federation and says what each hospital will spend.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfm.config import RunConfig, hospital_epsilons
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import HospitalLedger, calibrate, compose, epsilon_of, sampled_hospitals
from fedfm.privacy.dpsgd import DpSgd

if TYPE_CHECKING:
    from fedfm.data import Federation

__all__ = ["DpSgd", "HospitalLedger", "PlannedBudget", "calibrate", "check", "compose", "describe", "epsilon_of"]

logger = logging.getLogger("fedfm")


@dataclass(frozen=True)
class PlannedBudget:
    """What DP-SGD will do in one hospital over the planned run."""

    hospital: str
    rows: int
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    epsilon_after_first_round: float


def check(config: RunConfig, federation: Federation) -> list[PlannedBudget]:
    """Refuse DP settings that cannot work for these hospitals, before any model loads.

    Returns
    -------
    list of PlannedBudget
        Each hospital's plan (empty when ``privacy.mode`` is ``none``, and when the
        server holds no hospital rows: a deployment's hospitals plan their own).

    Raises
    ------
    ConfigError
        Opacus is missing, a δ is not below 1/N, a per-hospital budget names
        no hospital, or a budget cannot pay for even one round.
    """
    from fedfm.privacy.hospital import budget_for, delta_for, delta_problem, round_shape

    spec = config.privacy
    if spec.mode == "none" and spec.client_dp == "none":
        return []
    if importlib.util.find_spec("opacus") is None:
        raise ConfigError("fedfm's privacy accounting needs Opacus: pip install 'fedfm[dp]' (or opacus==1.6.0)")
    problems = _client_level_problems(config, len(federation.hospitals))
    if spec.mode == "none":
        if problems:
            raise ConfigError(problems)
        return []
    names = [h.name for h in federation.hospitals]
    known = set(names) | {str(i) for i in range(len(names))}
    for key in hospital_epsilons(spec):
        if key not in known:
            problems.append(f"`privacy.hospital-epsilon` names {key!r}, which is no hospital of this run; hospitals: {names}")
    if not any(len(h.train) for h in federation.hospitals):
        if problems:
            raise ConfigError(problems)
        # A deployment (`data.hospitals`): the rows are on the SuperNodes, and each hospital checks its δ
        # against its own row count and calibrates σ at its first round (privacy.hospital.hospital_ledger).
        logger.info("DP-SGD in every hospital (%s accountant): the server holds no hospital rows, so each hospital "
                    "checks δ against its own rows and calibrates its own noise at its first round; no plan here",
                    spec.accountant)
        return []
    plans: list[PlannedBudget] = []
    for index, hospital in enumerate(federation.hospitals):
        rows = len(hospital.train)
        delta = delta_for(config, rows)
        problem = delta_problem(delta, rows, hospital.name)
        if problem:
            problems.append(problem)
            continue
        budget = budget_for(config, index, hospital.name)
        q, steps = round_shape(config, rows)
        sigma = spec.noise_multiplier
        if sigma <= 0:
            try:
                sigma = calibrate(budget, delta, q, steps * config.federation.num_rounds, spec.accountant)
            except ConfigError as err:
                problems.append(f"hospital {hospital.name!r}: {err.problems[0]}")
                continue
        first = epsilon_of(compose([], sigma, q, steps), delta, spec.accountant)
        if first > budget:
            problems.append(
                f"hospital {hospital.name!r} cannot train one round within ε {budget:g}: one round of {steps} "
                f"steps at noise multiplier {sigma:g} spends ε {first:.3g}; raise `privacy.noise-multiplier` "
                f"or set it to 0 to calibrate"
            )
            continue
        plans.append(PlannedBudget(hospital.name, rows, budget, delta, sigma, q, steps, first))
    if problems:
        raise ConfigError(problems)
    return plans


def _client_level_problems(config: RunConfig, num_hospitals: int) -> list[str]:
    spec, fed = config.privacy, config.federation
    if not spec.client_dp.endswith("adaptive"):
        return []
    sampled = sampled_hospitals(num_hospitals, fed.fraction_train, min(fed.min_hospitals, num_hospitals))
    count_stddev = spec.client_clipped_count_stddev or sampled / 20
    if spec.client_noise_multiplier < 2 * count_stddev:
        return []
    default = " = hospitals sampled / 20" if not spec.client_clipped_count_stddev else ""
    message = (
        f"`privacy.client-dp` {spec.client_dp!r} splits its noise between the update and the count of clipped "
        f"updates (Andrew et al. 2021): `privacy.client-noise-multiplier` ({spec.client_noise_multiplier:g}) must be "
        f"below twice `privacy.client-clipped-count-stddev` ({count_stddev:g}{default}); raise the latter or "
        "lower the noise"
    )
    return [message]


def describe(plans: list[PlannedBudget]) -> str:
    """One line per hospital: budget, δ, noise and sampling."""
    return "\n".join(
        f"  {p.hospital}: ε budget {p.target_epsilon:g} at δ {p.delta:.2g}, noise multiplier {p.noise_multiplier:.3f}, "
        f"sample rate {p.sample_rate:.4f}, {p.steps_per_round} steps/round (ε {p.epsilon_after_first_round:.2f} after round 1)"
        for p in plans
    )
