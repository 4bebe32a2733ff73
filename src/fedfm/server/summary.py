"""The run's summary (``summary.json``), built from the recorded rounds and what the run exported."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from fedfm import keys
from fedfm.config import RunConfig
from fedfm.rundir import (
    Audit,
    Checkpoint,
    FinalScores,
    HospitalPrivacy,
    HospitalRows,
    Metrics,
    PrivacySummary,
    RoundEntry,
    RoundScores,
    RunSummary,
    Selection,
    SentByHospital,
)
from fedfm.server.metrics import plain, with_prefix
from fedfm.server.recorder import Recorder
from fedfm.strategies import GuardedStrategy
from fedfm.strategies.selection import BestRound
from fedfm.workspace import Workspace


def kept_parts_scores(last: RoundEntry | None) -> dict[str, Metrics]:
    """Each hospital's scores with its kept parts (FedSA-LoRA's B) on its local test rows, from the last round."""
    if last is None:
        return {}
    return {name: p for name, v in last.per_hospital.items()
            if (p := with_prefix(v.evaluate, keys.PERSONALIZED_PREFIX))}


def build_summary(
    config: RunConfig,
    workspace: Workspace,
    recorder: Recorder,
    strategy: Any,
    *,
    stopped: str | None,
    checkpoint: Checkpoint | None,
    exported_round: int,
    final_arrays: dict[str, np.ndarray],
    personalized: dict[str, Metrics],
    audit: Audit | None,
    started: float,
) -> RunSummary:
    """The summary of a finished run.

    Parameters
    ----------
    config : RunConfig
        The run's configuration.
    workspace : Workspace
        The server's federation and model.
    recorder : Recorder
        The rounds it recorded, the best round, the starting scores.
    strategy : GuardedStrategy or secagg's legacy bridge
        What the hospitals had to send (:meth:`GuardedStrategy.template`), SecAgg+'s distinct updates.
    stopped : str or None
        Why the run stopped before its last round.
    checkpoint : Checkpoint or None
        The checkpoint a resumed run continued from.
    exported_round : int
        The round whose adapter was exported.
    final_arrays : dict of str to ndarray
        The exported adapter's arrays.
    personalized : dict of str to dict
        Each hospital's personalized scores (a local fine-tune, or its kept parts).
    audit : Audit or None
        The privacy audit's result.
    started : float
        ``time.perf_counter()`` when the server started.
    """
    rounds = recorder.rounds
    last = rounds[-1] if rounds else None
    return RunSummary(
        rounds=len(rounds),
        stopped=stopped,
        early_stopped=bool(stopped and recorder.early_stopped),
        best_round=recorder.best.round,
        selection=selection_summary(config, rounds, recorder.best, exported_round),
        resumed_from=checkpoint.server_round if checkpoint is not None else None,
        initial_global=recorder.initial,
        final=FinalScores(
            global_=last.global_ if last is not None else {},
            federated=last.federated if last is not None else {},
            per_hospital={name: v.evaluate for name, v in last.per_hospital.items()} if last is not None else {},
            # Each hospital's own model on its local test rows: a local fine-tune of the exported adapter
            # (federation.personalize-epochs), else the strategy's kept parts (FedSA-LoRA's B); {} for neither.
            personalized=personalized,
            personalized_by=(
                f"fine-tune ({config.federation.personalize_epochs} epoch(s))"
                if config.federation.personalize_epochs > 0 else "kept parts" if personalized else None
            ),
        ),
        hospitals=_hospital_rows(config, workspace, rounds),
        global_test_rows=len(workspace.federation.global_test),
        # Without it, "global" above is the hospitals' weighted mean on their local test splits.
        central_evaluation=config.federation.central_evaluation,
        bytes_up=int(sum(e.bytes_up for e in rounds)),
        bytes_down=int(sum(e.bytes_down for e in rounds)),
        sent_by_hospital=_sent_by_hospital(strategy, rounds, workspace.hospital_names),
        adapter_parameters=workspace.loaded.adapter_parameters,
        base_parameters=workspace.loaded.base_parameters,
        adapter_tensors=len(workspace.loaded.initial_state),
        adapter_bytes=int(sum(v.nbytes for v in final_arrays.values())),
        personalized=bool(getattr(strategy.inner, "personalized", False)),
        privacy=PrivacySummary(
            mode=config.privacy.mode,
            hospitals=privacy_summary(rounds),
            client_dp=config.privacy.client_dp,
            secure_aggregation=config.privacy.secure_aggregation,
            # SecAgg+: how many different adapters the server's strategy was handed per round (1: only the sum).
            server_saw_distinct_updates=dict(getattr(strategy, "distinct_vectors", {})) or None,
            client_level=last.privacy.client_level if last is not None else None,
            audit=audit,
        ),
        wall_seconds=round(time.perf_counter() - started + recorder.earlier_seconds, 3),
        model=config.model.name,
        dataset=config.data.dataset,
        strategy=config.federation.strategy,
        compression=config.compression.method,
    )


def privacy_summary(rounds: list[RoundEntry]) -> dict[str, HospitalPrivacy]:
    """Per hospital: the last ledger it reported, the rounds it trained in and those it refused."""
    ledger: dict[str, HospitalPrivacy] = {}
    for entry in rounds:
        for name, v in entry.per_hospital.items():
            train = v.train
            if keys.DP_EPSILON not in train:
                continue
            earlier = ledger.get(name)
            trained, refused = (earlier.rounds_trained, earlier.rounds_refused) if earlier else ((), ())
            if train.get(keys.DP_REFUSED):
                refused += (entry.round,)
            else:
                trained += (entry.round,)
            ledger[name] = HospitalPrivacy(
                epsilon=train[keys.DP_EPSILON],
                delta=train[keys.DP_DELTA],
                target_epsilon=train[keys.DP_TARGET_EPSILON],
                noise_multiplier=train[keys.DP_NOISE_MULTIPLIER],
                sample_rate=train[keys.DP_SAMPLE_RATE],
                steps=int(train[keys.DP_STEPS]),
                rounds_trained=trained,
                rounds_refused=refused,
            )
    return ledger


def selection_summary(config: RunConfig, rounds: list[RoundEntry], best: BestRound, exported_round: int) -> Selection:
    """Which round was exported and why; the best (by validation) and last rounds' test scores, side by side."""
    by_round = {e.round: e for e in rounds}

    def scores(server_round: int | None) -> RoundScores | None:
        entry = by_round.get(server_round) if server_round is not None else None
        if entry is None:
            return None
        return RoundScores(
            round=entry.round,
            validation=entry.validation,
            global_=entry.global_,
            federated=entry.federated,
            per_hospital={name: plain(v.evaluate) for name, v in entry.per_hospital.items()},
        )

    return Selection(
        select_best=config.federation.select_best,
        metric=best.metric,
        patience=config.federation.patience,
        best_round=best.round,
        best_validation=best.score,
        exported_round=exported_round,
        validation_by_round={str(e.round): e.validation.get(best.metric) for e in rounds if e.validation},
        best=scores(best.round),
        last=scores(rounds[-1].round) if rounds else None,
    )


def selection_json(
    config: RunConfig, history: list[dict[str, Any]], best: BestRound, exported_round: int
) -> dict[str, Any]:
    """:func:`selection_summary` on ``metrics.jsonl`` lines, as the JSON of ``summary.json``'s ``selection``."""
    return selection_summary(config, [RoundEntry.from_json(e) for e in history], best, exported_round).to_json()


def _hospital_rows(config: RunConfig, workspace: Workspace, rounds: list[RoundEntry]) -> dict[str, HospitalRows]:
    """Each hospital's train and test rows: as the hospitals reported them in a deployment, else the federation's.

    With ``data.hospitals`` the server holds no rows; the counts are the latest
    ``num-examples`` of each hospital's train and evaluate replies (None if it never sent one).
    """
    hospitals = workspace.federation.hospitals
    if not config.data.hospitals:
        return {h.name: HospitalRows(train_rows=len(h.train), test_rows=len(h.test),
                                     validation_rows=len(h.validation) if h.validation is not None else None)
                for h in hospitals}
    rows = {h.name: HospitalRows() for h in hospitals}
    for entry in rounds:
        for name, replies in entry.per_hospital.items():
            counts = rows.get(name, HospitalRows())
            if keys.NUM_EXAMPLES in replies.train:
                counts = dataclasses.replace(counts, train_rows=int(replies.train[keys.NUM_EXAMPLES]))
            if keys.NUM_EXAMPLES in replies.evaluate:
                counts = dataclasses.replace(counts, test_rows=int(replies.evaluate[keys.NUM_EXAMPLES]))
            if name in rows or counts != HospitalRows():
                rows[name] = counts
    return rows


def _sent_by_hospital(strategy: GuardedStrategy, rounds: list[RoundEntry], names: list[str]) -> dict[str, SentByHospital]:
    """The tensor names each hospital's replies had to hold (the guard rejects any other) and its bytes up."""
    return {
        name: SentByHospital(
            tensors=tuple(sorted(strategy.template(index))),
            bytes_up=int(sum(e.hospital(name).bytes_up for e in rounds)),
        )
        for index, name in enumerate(names)
    }
