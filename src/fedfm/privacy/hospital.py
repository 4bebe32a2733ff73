"""The hospital's side of DP-SGD: its budget, its ledger, and the round it agrees to train.

The ledger is the hospital's own. It lives in the hospital's persistent Flower
context (``context.state``) and in ``privacy-ledger.json`` in the hospital's
state folder (node config ``state-dir`` on a SuperNode; in a simulation,
``<run dir>/hospitals/<name>/``), so a restarted process or a resumed run
continues it instead of starting again from zero. The server only ever reads
the ε each hospital reports.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedfm import keys
from fedfm.config import RunConfig, TrainSpec, hospital_epsilons
from fedfm.data.local import DATA_PATH
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import HospitalLedger, default_delta, open_ledger
from fedfm.privacy.dpsgd import DpSgd, sample_rate, steps_per_round

logger = logging.getLogger("fedfm")

LEDGER_FILE = "privacy-ledger.json"

#: node config a SuperNode may set: its state folder, and a cap on its own ε.
STATE_DIR = "state-dir"
EPSILON_CAP = "privacy-epsilon"


def budget_for(config: RunConfig, index: int, name: str, node_config: dict[str, Any] | None = None) -> float:
    """A hospital's ε budget: the run's, a per-hospital override, capped by the SuperNode's own."""
    overrides = hospital_epsilons(config.privacy)
    budget = overrides.get(name, overrides.get(str(index), config.privacy.target_epsilon))
    cap = (node_config or {}).get(EPSILON_CAP)
    if cap is not None:
        budget = min(budget, float(cap))
    return budget


def dp_batch_size(config: RunConfig) -> int:
    """Expected rows per DP-SGD step: ``privacy.batch-size``, else ``train.batch-size``."""
    return config.privacy.batch_size or config.train.batch_size


def delta_for(config: RunConfig, num_rows: int) -> float:
    return config.privacy.delta or default_delta(num_rows)


def state_dir(config: RunConfig, node_config: dict[str, Any], name: str) -> Path | None:
    """Where this hospital keeps state that must outlive the process, if anywhere.

    A SuperNode with its own data (node config ``data-path``) writes only
    where its own node config says (``state-dir``), never where the run
    configuration, which the coordinator chose, points. In a simulation it is
    ``<output.dir>/hospitals/<name>``; a hospital name that is not a plain
    file name (``/``, ``..``) is refused rather than followed.
    """
    if node_config.get(STATE_DIR):
        return Path(str(node_config[STATE_DIR]))
    if node_config.get(DATA_PATH) or not config.output.dir:
        return None
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"hospital name {name!r} cannot name a state folder: use a plain name without / or ..")
    return Path(config.output.dir) / "hospitals" / name


def new_ledger(config: RunConfig, *, index: int, name: str, num_rows: int, node_config: dict[str, Any] | None = None) -> HospitalLedger:
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


def ledger_for(config: RunConfig, context: Context, *, index: int, name: str, num_rows: int) -> HospitalLedger:
    """This hospital's ledger: from its context state, else its state file, else a new one."""
    record = context.state.get(keys.PRIVACY_LEDGER)
    if isinstance(record, ConfigRecord) and "ledger" in record:
        return HospitalLedger.from_json(str(record["ledger"]))
    folder = state_dir(config, dict(context.node_config), name)
    if folder is not None:
        stored = HospitalLedger.load(folder / LEDGER_FILE)
        if stored is not None:
            logger.info("%s: privacy ledger continues from %s (ε %.3f spent)", name, folder / LEDGER_FILE, stored.epsilon())
            return stored
    return new_ledger(config, index=index, name=name, num_rows=num_rows, node_config=dict(context.node_config))


def keep_ledger(config: RunConfig, context: Context, ledger: HospitalLedger) -> None:
    """Store the ledger in the context state and, where there is one, the state folder."""
    context.state[keys.PRIVACY_LEDGER] = ConfigRecord({"ledger": ledger.to_json()})
    folder = state_dir(config, dict(context.node_config), ledger.hospital)
    if folder is not None:
        ledger.save(folder / LEDGER_FILE)


def dp_train_spec(config: RunConfig) -> TrainSpec:
    """The local training settings under DP-SGD: the privacy section's optimizer and learning rate."""
    privacy = config.privacy
    return dataclasses.replace(
        config.train,
        optimizer=privacy.optimizer,
        learning_rate=privacy.learning_rate or config.train.learning_rate,
    )


def round_plan(ledger: HospitalLedger, config: RunConfig) -> DpSgd:
    return DpSgd(
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=config.privacy.max_grad_norm,
        sample_rate=ledger.sample_rate,
        steps=ledger.steps_per_round,
    )


def ledger_metrics(ledger: HospitalLedger, *, refused: bool = False) -> dict[str, float | int]:
    """What a hospital reports of its ledger each round (scalars only)."""
    return {
        keys.DP_EPSILON: ledger.epsilon(),
        keys.DP_DELTA: ledger.delta,
        keys.DP_TARGET_EPSILON: ledger.target_epsilon,
        keys.DP_NOISE_MULTIPLIER: ledger.noise_multiplier,
        keys.DP_SAMPLE_RATE: ledger.sample_rate,
        keys.DP_STEPS: ledger.steps,
        keys.DP_REFUSED: int(refused),
    }
