"""The hospital's DP-SGD policy: its budget, δ, batch size, the ledger it opens and the recipe it trains with.

Plain functions of the run configuration (and the SuperNode's own cap). The
ledger itself is the hospital's state: :class:`fedfm.hospital_state.HospitalSession`
loads it (from ``context.state``, else ``privacy-ledger.json`` in the
hospital's state folder) and saves it after each round, so a restarted
process or a resumed run continues it instead of starting again from zero.
The server only ever reads the ε each hospital reports.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from fedfm import keys
from fedfm.config import RunConfig, TrainSpec, hospital_epsilons, recipe_of
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import HospitalLedger, default_delta, open_ledger
from fedfm.privacy.dpsgd import sample_rate, steps_per_round

#: The ledger's file in the hospital's state folder.
LEDGER_FILE = "privacy-ledger.json"

logger = logging.getLogger("fedfm")


def budget_for(config: RunConfig, index: int, name: str, node_config: Mapping[str, Any] | None = None) -> float:
    """A hospital's ε budget: the run's, a per-hospital override, capped by the SuperNode's own."""
    overrides = hospital_epsilons(config.privacy)
    budget = overrides.get(name, overrides.get(str(index), config.privacy.target_epsilon))
    cap = (node_config or {}).get(keys.EPSILON_CAP)
    if cap is not None:
        budget = min(budget, float(cap))
    return budget


def centring_of(config: RunConfig) -> str:
    """The public rows the linear probe centres on (``auto``: the dataset's own public codebook where it has one,
    the tokenizer's vocabulary for other text, and for images ``generic``, grey images drawn in code: no public
    X-ray set exists to centre on)."""
    centring = config.privacy.probe_centring
    if centring == "auto":
        if config.model.task == "image-classification":
            return "generic"
        return "heart-codebook" if config.data.dataset == "heart_disease_uci" else "vocabulary"
    return centring


def round_shape(config: RunConfig, num_rows: int) -> tuple[float, int]:
    """The sampling rate and steps of one DP round for a hospital of ``num_rows`` rows.

    The linear probe takes full-batch steps (every row in every step: rate 1);
    DP-SGD on LoRA samples Poisson batches of ``privacy.batch-size`` expected rows.
    """
    if recipe_of(config) == "linear-probe":
        return 1.0, config.privacy.probe_steps
    batch = dp_batch_size(config)
    return sample_rate(batch, num_rows), steps_per_round(config.train, batch, num_rows)


def dp_batch_size(config: RunConfig) -> int:
    """Expected rows per DP-SGD step: ``privacy.batch-size``, else ``train.batch-size``."""
    return config.privacy.batch_size or config.train.batch_size


def delta_for(config: RunConfig, num_rows: int, node_config: Mapping[str, Any] | None = None) -> float:
    """δ of a hospital with ``num_rows`` training rows: ``privacy.delta``, else :func:`default_delta`,
    capped by the SuperNode's own (node config ``privacy-delta``)."""
    delta = config.privacy.delta or default_delta(num_rows)
    cap = (node_config or {}).get(keys.DELTA_CAP)
    return min(delta, float(cap)) if cap is not None else delta


def delta_problem(delta: float, num_rows: int, name: str) -> str | None:
    """Why ``delta`` is no guarantee for a hospital of ``num_rows`` rows (None when it is below 1/N)."""
    if delta < 1.0 / max(num_rows, 1):
        return None
    return (f"`privacy.delta` {delta:g} is not below 1/N = {1 / max(num_rows, 1):.3g} for hospital {name!r} "
            f"({num_rows} rows): a mechanism that leaks one whole row would satisfy it; lower `privacy.delta` "
            f"(0 picks 1e-5 or 1/N^1.1)")


def hospital_ledger(
    config: RunConfig,
    stored: HospitalLedger | None,
    *,
    index: int,
    name: str,
    num_rows: int,
    node_config: Mapping[str, Any] | None = None,
) -> HospitalLedger:
    """The ledger a hospital trains under this round: its stored one, or a new one at its first DP round.

    The hospital checks its own safeguards here, whatever the server checked:
    δ must be below 1/N for its own N, and a stored ledger (from this run or
    an earlier one in the same state folder) keeps its history but is held to
    the smallest budget and δ that the ledger, this run and the SuperNode's
    caps allow: a later run can lower a hospital's budget, never raise it.

    Raises
    ------
    ConfigError
        δ is not below 1/N for this hospital.
    """
    budget = budget_for(config, index, name, node_config)
    delta = delta_for(config, num_rows, node_config)
    if stored is None:
        problem = delta_problem(delta, num_rows, name)
        if problem:
            raise ConfigError(problem)
        return new_ledger(config, index=index, name=name, num_rows=num_rows, node_config=node_config)
    held = dataclasses.replace(
        stored, target_epsilon=min(stored.target_epsilon, budget), delta=min(stored.delta, delta)
    )
    problem = delta_problem(held.delta, num_rows, name)
    if problem:
        raise ConfigError(problem)
    rate, steps = round_shape(config, num_rows)
    if (held.sample_rate, held.steps_per_round) != (rate, steps):
        # A later run with another recipe or batch: its rounds are accounted as they run, and σ is
        # calibrated so that its planned rounds, after the stored history, end at the budget.
        held = dataclasses.replace(held, sample_rate=rate, steps_per_round=steps,
                                   noise_multiplier=_remaining_noise(config, held, rate, steps))
    if held.target_epsilon < stored.target_epsilon or held.delta < stored.delta:
        logger.info("%s: stored privacy ledger now held to ε %g at δ %.2g (it had ε %g at δ %.2g)",
                    name, held.target_epsilon, held.delta, stored.target_epsilon, stored.delta)
    return held


def _remaining_noise(config: RunConfig, ledger: HospitalLedger, rate: float, steps: int) -> float:
    """σ for this run's planned rounds after ``ledger``'s history (its own σ when nothing is left: it will refuse)."""
    from fedfm.privacy.probe import calibrate_next_stage

    if config.privacy.noise_multiplier > 0:
        return config.privacy.noise_multiplier
    try:
        return calibrate_next_stage(ledger.history, ledger.target_epsilon, ledger.delta, sample_rate=rate,
                                    steps=steps * config.federation.num_rounds, accountant=ledger.accountant)
    except ValueError:
        return ledger.noise_multiplier


def new_ledger(
    config: RunConfig, *, index: int, name: str, num_rows: int, node_config: Mapping[str, Any] | None = None
) -> HospitalLedger:
    """The ledger a hospital opens at its first DP round (σ calibrated for the whole run)."""
    rate, steps = round_shape(config, num_rows)
    return open_ledger(
        hospital=name,
        target_epsilon=budget_for(config, index, name, node_config),
        delta=delta_for(config, num_rows, node_config),
        sample_rate=rate,
        steps_per_round=steps,
        planned_rounds=config.federation.num_rounds,
        noise_multiplier=config.privacy.noise_multiplier,
        accountant=config.privacy.accountant,
    )


def dp_train_spec(config: RunConfig) -> TrainSpec:
    """The local training settings under DP-SGD: the privacy section's optimizer and learning rate."""
    privacy = config.privacy
    return dataclasses.replace(
        config.train,
        optimizer=privacy.optimizer,
        learning_rate=privacy.learning_rate or config.train.learning_rate,
    )
