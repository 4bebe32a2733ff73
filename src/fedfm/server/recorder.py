"""The recorder: each finished round becomes a metrics line, a checkpoint and a progress line.

The round loop (:func:`fedfm.strategies.rounds.run_rounds`, or SecAgg+'s legacy
workflow in :mod:`fedfm.secagg`) calls it after every round: it scores the
global adapter centrally when due, builds the round's
:class:`~fedfm.rundir.RoundEntry` from what the guard recorded, appends it to
``metrics.jsonl``, writes the checkpoint (with the server state a resumed run
needs) and tells the progress display.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedfm import keys, strategies
from fedfm.config import RunConfig, evaluation_due
from fedfm.privacy.accounting import ClientLevelLedger, default_delta, sampled_hospitals
from fedfm.progress import Progress
from fedfm.rundir import Checkpoint, ClientLevel, HospitalEntry, RoundEntry, RoundPrivacy, RunDirectory
from fedfm.server.metrics import headline, lead, plain, weighted
from fedfm.server.model import load_global
from fedfm.strategies import GuardedStrategy
from fedfm.strategies.selection import BestRound, validation_of
from fedfm.strategies.state import capture
from fedfm.tracking import Tracking
from fedfm.train import autocast
from fedfm.wire import record_to_numpy
from fedfm.workspace import Workspace

logger = logging.getLogger("fedfm")


class Recorder:
    """Turns each finished round into a metrics line, a checkpoint and a progress line."""

    def __init__(
        self, config: RunConfig, workspace: Workspace, strategy: Any, run_dir: RunDirectory,
        progress: Progress | None = None, tracking: Tracking | None = None,
    ) -> None:
        # ``strategy``: the GuardedStrategy, or secagg's legacy bridge (both keep ``rounds`` and ``hospital_of``).
        self.config = config
        self.progress = progress if progress is not None else Progress()
        self.workspace = workspace
        self.strategy = strategy
        self.run_dir = run_dir
        self.tracking = tracking  # the experiment tracker (`output.tracking`), if any
        self.names = workspace.hospital_names
        self.rounds: list[RoundEntry] = []
        self.initial: dict[str, float] | None = None
        self.started = time.perf_counter()
        self.last = self.started
        self.earlier_seconds = 0.0
        self.client_ledger, self.sampled = _client_level_ledger(config, len(self.names))
        # Tracked whenever hospitals report validation scores, so select-best may change on resume.
        self.best = BestRound(metric=config.federation.select_metric, patience=config.federation.patience)
        self.early_stopped: str | None = None

    def server_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a resumed run needs besides the global adapter: strategy, random generators, ledger, history."""
        arrays: dict[str, np.ndarray] = {}
        strategy: dict[str, Any] | None = None
        if isinstance(self.strategy, GuardedStrategy):
            strategy, arrays = capture(self.strategy)
        version, internal, gauss = random.getstate()
        name, keys_, position, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
        arrays["numpy-random"] = np.asarray(keys_)
        selection, best_arrays = self.best.state_dict()
        arrays.update(best_arrays)
        state = {
            "selection": selection,
            "strategy": strategy,
            "python_random": [version, list(internal), gauss],
            "numpy_random": [name, int(position), int(has_gauss), float(cached)],
            "client_ledger": dataclasses.asdict(self.client_ledger) if self.client_ledger is not None else None,
            "initial": self.initial,
            "seconds": time.perf_counter() - self.started + self.earlier_seconds,
        }
        return state, arrays

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Continue after ``checkpoint``: its history, ledger and random generators (the strategy: see serve)."""
        state, arrays = checkpoint.state, checkpoint.state_arrays
        self.rounds = [e for e in self.run_dir.rounds() if e.round <= checkpoint.server_round]
        self.initial = state.get("initial")
        self.earlier_seconds = float(state.get("seconds", 0.0))
        self.best.load_state_dict(state.get("selection"), arrays)
        if state.get("client_ledger") is not None and self.client_ledger is not None:
            saved = dict(state["client_ledger"])
            saved["history"] = [tuple(h) for h in saved.get("history", [])]
            self.client_ledger = ClientLevelLedger(**saved)
        if "python_random" in state:
            version, internal, gauss = state["python_random"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy_random" in state and "numpy-random" in arrays:
            name, position, has_gauss, cached = state["numpy_random"]
            np.random.set_state((name, arrays["numpy-random"], position, has_gauss, cached))

    def central(self, server_round: int, arrays: ArrayRecord) -> dict[str, float] | None:
        if not self.config.federation.central_evaluation:
            return None
        if not evaluation_due(self.config.federation, server_round):
            return None
        loaded = self.workspace.loaded
        load_global(self.workspace, self.config, record_to_numpy(arrays))
        with autocast(loaded.device, self.config.model.dtype):
            return self.workspace.task.evaluate(
                loaded.model,
                self.workspace.hospital_rows("test", -1),
                loaded.tokenizer,
                batch_size=self.config.train.eval_batch_size,
                device=loaded.device,
            )

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        central = self.central(server_round, arrays)
        if server_round == 0:
            self.initial = central
            logger.info("round 0/%d  global %s (before training)", self.config.federation.num_rounds, headline(central))
            if self.tracking is not None:
                self.tracking.initial(central)
            # Round 0's checkpoint: a run stopped in its first round resumes too.
            state, state_arrays = self.server_state()
            self.run_dir.write_checkpoint(0, record_to_numpy(arrays), state=state, state_arrays=state_arrays)
        else:
            self.record_round(server_round, arrays, central)
        return MetricRecord(dict(central)) if central else None  # type: ignore[arg-type]

    def record_round(self, server_round: int, arrays: ArrayRecord, central: dict[str, float] | None) -> None:
        record = self.strategy.rounds.get(server_round) or strategies.RoundRecord()
        bytes_down: dict[int, int] = {}
        for node, count in record.bytes_down.items():
            index = self.strategy.hospital_of(node)
            key = index if index is not None else -1
            bytes_down[key] = bytes_down.get(key, 0) + count
        per_hospital: dict[str, HospitalEntry] = {}
        for index in sorted(set(record.train) | set(record.evaluate) | set(record.bytes_up) | set(bytes_down) - {-1}):
            name = self.names[index] if 0 <= index < len(self.names) else f"hospital-{index}"
            per_hospital[name] = HospitalEntry(
                train=record.train.get(index, {}),
                evaluate=record.evaluate.get(index, {}),
                bytes_up=record.bytes_up.get(index, 0),
                bytes_down=bytes_down.get(index, 0),
            )
        federated = weighted({i: plain(m) for i, m in record.evaluate.items()})
        validation = validation_of(record.evaluate.values())
        client_level = None
        if self.client_ledger is not None:
            if record.train_aggregated:
                self.client_ledger = self.client_ledger.after_round()
            client_level = ClientLevel(
                epsilon=self.client_ledger.epsilon(),
                delta=self.client_ledger.delta,
                releases=self.client_ledger.releases,
                noise_multiplier=self.client_ledger.noise_multiplier,
                sample_rate=self.client_ledger.sample_rate,
                clipping_norm=float(getattr(self.strategy.inner, "clipping_norm", float("nan"))),
                epsilon_replace_one=self.client_ledger.epsilon_replace_one(),
            )
        now = time.perf_counter()
        entry = RoundEntry(
            round=server_round,
            global_=central if central is not None else federated,
            federated=federated,
            validation=validation,
            per_hospital=per_hospital,
            bytes_up=int(sum(record.bytes_up.values())),
            bytes_down=int(sum(record.bytes_down.values())),
            aggregated=record.train_aggregated,
            left_out=record.left_out,
            retries=record.retries,
            seconds=round(now - self.last, 3),
            privacy=RoundPrivacy(sample_level_epsilon=_epsilons(per_hospital), client_level=client_level),
        )
        self.last = now
        self.rounds.append(entry)
        self.run_dir.append_round(entry)
        if self.tracking is not None:
            self.tracking.round(entry)
        if validation and self.best.observe(server_round, validation, record_to_numpy(arrays)):
            logger.info("round %d: best validation %s so far (%.4f)", server_round, self.best.metric, self.best.score)
        state, state_arrays = self.server_state()
        self.run_dir.write_checkpoint(server_round, record_to_numpy(arrays), state=state, state_arrays=state_arrays)
        hospitals = "  ".join(
            f"{name} {lead(v.evaluate)}" for name, v in per_hospital.items() if v.evaluate
        )
        logger.info(
            "round %d/%d  global %s | %s | %.1f s",
            server_round, self.config.federation.num_rounds, headline(entry.global_), hospitals, entry.seconds,
        )
        self.progress.round_done(entry, total_rounds=self.config.federation.num_rounds, hospitals=len(self.names),
                                 replied=record.train_replies)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The rounds recorded so far as the JSON of their ``metrics.jsonl`` lines."""
        return [entry.to_json() for entry in self.rounds]

    def early_stop(self, server_round: int) -> str | None:
        """Why the run stops after ``server_round`` (``federation.patience``), or None."""
        self.early_stopped = self.best.stop_reason(server_round, self.config.federation.num_rounds)
        return self.early_stopped


def _client_level_ledger(config: RunConfig, num_hospitals: int) -> tuple[ClientLevelLedger | None, int]:
    spec, fed = config.privacy, config.federation
    sampled = sampled_hospitals(num_hospitals, fed.fraction_train, min(fed.min_hospitals, num_hospitals))
    if spec.client_dp == "none":
        return None, sampled
    ledger = ClientLevelLedger(
        noise_multiplier=spec.client_noise_multiplier,
        delta=spec.client_delta or default_delta(num_hospitals),
        accountant=spec.accountant,
    )
    return ledger, sampled


def _epsilons(per_hospital: dict[str, HospitalEntry]) -> dict[str, float]:
    """The round's sample-level ledger: ε each hospital reported (DP-SGD), by hospital name."""
    return {name: v.train[keys.DP_EPSILON] for name, v in per_hospital.items() if keys.DP_EPSILON in v.train}
