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
from collections.abc import Mapping
from typing import Any

from fedfm import keys
from fedfm.config import RunConfig, TrainSpec, hospital_epsilons
from fedfm.privacy.accounting import HospitalLedger, default_delta, open_ledger
from fedfm.privacy.dpsgd import sample_rate, steps_per_round

#: The ledger's file in the hospital's state folder.
LEDGER_FILE = "privacy-ledger.json"


def budget_for(config: RunConfig, index: int, name: str, node_config: Mapping[str, Any] | None = None) -> float:
    """A hospital's ε budget: the run's, a per-hospital override, capped by the SuperNode's own."""
    overrides = hospital_epsilons(config.privacy)
    budget = overrides.get(name, overrides.get(str(index), config.privacy.target_epsilon))
    cap = (node_config or {}).get(keys.EPSILON_CAP)
    if cap is not None:
        budget = min(budget, float(cap))
    return budget


def dp_batch_size(config: RunConfig) -> int:
    """Expected rows per DP-SGD step: ``privacy.batch-size``, else ``train.batch-size``."""
    return config.privacy.batch_size or config.train.batch_size


def delta_for(config: RunConfig, num_rows: int) -> float:
    """δ of a hospital with ``num_rows`` training rows: ``privacy.delta``, else :func:`default_delta`."""
    return config.privacy.delta or default_delta(num_rows)


def new_ledger(
    config: RunConfig, *, index: int, name: str, num_rows: int, node_config: Mapping[str, Any] | None = None
) -> HospitalLedger:
    """The ledger a hospital opens at its first DP round (σ calibrated for the whole run)."""
    spec: TrainSpec = config.train
    return open_ledger(
        hospital=name,
        target_epsilon=budget_for(config, index, name, node_config),
        delta=delta_for(config, num_rows),
        sample_rate=sample_rate(dp_batch_size(config), num_rows),
        steps_per_round=steps_per_round(spec, dp_batch_size(config), num_rows),
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
