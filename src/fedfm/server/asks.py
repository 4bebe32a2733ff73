"""What the server asks every hospital after the last round: the privacy audit and the personalized scores."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedfm import keys
from fedfm.config import RunConfig
from fedfm.rundir import Audit, AuditScore
from fedfm.server.metrics import headline, with_prefix
from fedfm.wire import numpy_to_record

logger = logging.getLogger("fedfm")


def _ask_every_hospital(
    grid: Grid, config: RunConfig, arrays: dict[str, np.ndarray], instructions: dict[str, Any], names: list[str],
    what: str,
) -> list[tuple[str, Any]]:
    """One evaluate-type message with ``arrays`` to every node; (hospital name, reply metrics) of each success."""
    messages = [
        Message(
            RecordDict({keys.ARRAYS: numpy_to_record(arrays), keys.CONFIG: ConfigRecord(dict(instructions))}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in grid.get_node_ids()
    ]
    answers = []
    for reply in grid.send_and_receive(messages, timeout=config.federation.round_timeout):
        if reply.has_error():
            logger.warning("%s: node %d failed: %s", what, reply.metadata.src_node_id, reply.error.reason)
            continue
        metrics = reply.content[keys.METRICS]
        index = int(metrics[keys.HOSPITAL_INDEX])  # type: ignore[arg-type]
        answers.append((names[index] if 0 <= index < len(names) else f"hospital-{index}", metrics))
    return answers


def run_audit(
    grid: Grid, config: RunConfig, arrays: dict[str, np.ndarray], flwr_config: ConfigRecord, names: list[str]
) -> Audit:
    """Ask every hospital for the membership-inference AUC of the final model on its own rows."""
    instructions = {
        **dict(flwr_config), keys.SERVER_ROUND: config.federation.num_rounds, keys.AUDIT: True,
    }
    hospitals: dict[str, AuditScore] = {}
    for name, metrics in _ask_every_hospital(grid, config, arrays, instructions, names, "privacy audit"):
        hospitals[name] = AuditScore(
            auc=float(metrics[keys.AUDIT_AUC]),  # type: ignore[arg-type]
            members=int(metrics[keys.AUDIT_MEMBERS]),  # type: ignore[call-overload]
            nonmembers=int(metrics[keys.AUDIT_NONMEMBERS]),  # type: ignore[call-overload]
        )
    hospitals = dict(sorted(hospitals.items()))
    aucs = [v.auc for v in hospitals.values() if np.isfinite(v.auc)]
    logger.info("privacy audit: membership-inference AUC %s (0.5 = nothing visible)",
                "  ".join(f"{name} {v.auc:.3f}" for name, v in hospitals.items()))
    return Audit(attack="loss threshold", hospitals=hospitals, mean_auc=float(np.mean(aucs)) if aucs else None)


def run_personalization(
    grid: Grid, config: RunConfig, arrays: dict[str, np.ndarray], flwr_config: ConfigRecord, names: list[str],
    *, server_round: int,
) -> dict[str, dict[str, float]]:
    """Ask every hospital to fine-tune ``arrays`` on its own training rows and score it on its local test rows.

    Each hospital trains ``federation.personalize-epochs`` epochs from the exported
    adapter (with its kept parts, if its strategy keeps any) and replies only the
    scores; the personalized tensors never leave it.

    Returns
    -------
    dict
        Hospital name to its personalized metrics (``accuracy``, ``macro-f1``, ``loss``, ``num-examples``, ...).
    """
    instructions = {
        **dict(flwr_config), keys.SERVER_ROUND: server_round,
        keys.PERSONALIZE_EPOCHS: config.federation.personalize_epochs,
    }
    hospitals: dict[str, dict[str, float]] = {}
    for name, metrics in _ask_every_hospital(grid, config, arrays, instructions, names, "personalization"):
        hospitals[name] = with_prefix({k: float(v) for k, v in metrics.items()}, keys.PERSONALIZED_PREFIX)
    hospitals = dict(sorted(hospitals.items()))
    logger.info("personalized (%d local epoch(s)): %s", config.federation.personalize_epochs,
                "  ".join(f"{name} {headline(m)}" for name, m in hospitals.items()))
    return hospitals
