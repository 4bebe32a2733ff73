"""The Flower ServerApp: run the strategy's rounds, evaluate, record, export.

:func:`serve` is the whole server; :data:`app` is the ServerApp that ``flwr run .``
loads (it reads the run configuration from Flower's run config), and
:func:`make_server_app` builds one around a configuration for :func:`fedfm.run`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfm import export, keys, privacy, secagg, strategies
from fedfm.adapters import export_adapter, set_adapter_state, set_base_delta
from fedfm.config import RunConfig, evaluation_due, from_flat, load_config, round_learning_rate, to_flat, to_json
from fedfm.data import check_federation
from fedfm.errors import CheckpointError, FedfmError
from fedfm.interrupt import InterruptibleGrid
from fedfm.privacy.accounting import ClientLevelLedger, default_delta, sampled_hospitals
from fedfm.progress import Progress, progress_display
from fedfm.rundir import (
    Audit,
    AuditScore,
    Checkpoint,
    ClientLevel,
    FinalScores,
    HospitalEntry,
    HospitalPrivacy,
    HospitalRows,
    PrivacySummary,
    RoundEntry,
    RoundPrivacy,
    RoundScores,
    RunDirectory,
    RunSummary,
    Selection,
    SentByHospital,
    claim,
    default_run_dir,
    read_checkpoint,
)
from fedfm.strategies import GuardedStrategy
from fedfm.strategies.plan import encode_plans
from fedfm.strategies.selection import BestRound, validation_of
from fedfm.strategies.state import capture, restore
from fedfm.train import autocast
from fedfm.wire import numpy_to_record, record_to_numpy
from fedfm.workspace import Workspace, federation_for, workspace_for

logger = logging.getLogger("fedfm")

_HEADLINE = ("accuracy", "macro-f1")


def _fmt(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k} {metrics[k]:.3f}" for k in _HEADLINE if k in metrics)


def _weighted(per_hospital: dict[int, dict[str, float]]) -> dict[str, float]:
    total = sum(m.get(keys.NUM_EXAMPLES, 0.0) for m in per_hospital.values())
    if total <= 0:
        return {}
    names = {k for m in per_hospital.values() for k in m} - {keys.NUM_EXAMPLES, keys.HOSPITAL_INDEX}
    return {k: sum(m.get(k, 0.0) * m[keys.NUM_EXAMPLES] for m in per_hospital.values()) / total for k in sorted(names)}


class _Recorder:
    """Turns each finished round into a metrics line, a checkpoint and a progress line."""

    def __init__(
        self, config: RunConfig, workspace: Workspace, strategy: Any, run_dir: RunDirectory,
        progress: Progress | None = None,
    ) -> None:
        # ``strategy``: the GuardedStrategy, or secagg's legacy bridge (both keep ``rounds`` and ``hospital_of``).
        self.config = config
        self.progress = progress if progress is not None else Progress()
        self.workspace = workspace
        self.strategy = strategy
        self.run_dir = run_dir
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
            logger.info("round 0/%d  global %s (before training)", self.config.federation.num_rounds, _fmt(central))
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
        federated = _weighted({i: _plain(m) for i, m in record.evaluate.items()})
        validation = validation_of(record.evaluate.values())
        client_level = None
        if self.client_ledger is not None:
            if record.train_aggregated:
                self.client_ledger = self.client_ledger.after_round(record.train_replies, self.sampled)
            client_level = ClientLevel(
                epsilon=self.client_ledger.epsilon(),
                delta=self.client_ledger.delta,
                releases=self.client_ledger.releases,
                noise_multiplier=self.client_ledger.noise_multiplier,
                sample_rate=self.client_ledger.sample_rate,
                clipping_norm=float(getattr(self.strategy.inner, "clipping_norm", float("nan"))),
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
        if validation and self.best.observe(server_round, validation, record_to_numpy(arrays)):
            logger.info("round %d: best validation %s so far (%.4f)", server_round, self.best.metric, self.best.score)
        state, state_arrays = self.server_state()
        self.run_dir.write_checkpoint(server_round, record_to_numpy(arrays), state=state, state_arrays=state_arrays)
        hospitals = "  ".join(
            f"{name} {v.evaluate.get('accuracy', float('nan')):.3f}" for name, v in per_hospital.items() if v.evaluate
        )
        logger.info(
            "round %d/%d  global %s | %s | %.1f s",
            server_round, self.config.federation.num_rounds, _fmt(entry.global_), hospitals, entry.seconds,
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


def _plain(metrics: dict[str, float]) -> dict[str, float]:
    """A hospital's evaluate metrics without its validation and personalized ones (the global adapter on its test rows)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith((keys.VALIDATION_PREFIX, keys.PERSONALIZED_PREFIX))}


def _with_prefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The ``prefix``-ed metrics with the prefix taken off, and the row count they were measured on."""
    out = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    if out and keys.NUM_EXAMPLES in metrics:
        out[keys.NUM_EXAMPLES] = metrics[keys.NUM_EXAMPLES]
    return out


def _client_level_ledger(config: RunConfig, num_hospitals: int) -> tuple[ClientLevelLedger | None, int]:
    spec, fed = config.privacy, config.federation
    sampled = sampled_hospitals(num_hospitals, fed.fraction_train, min(fed.min_hospitals, num_hospitals))
    if spec.client_dp == "none":
        return None, sampled
    ledger = ClientLevelLedger(
        noise_multiplier=spec.client_noise_multiplier,
        sample_rate=sampled / num_hospitals,
        delta=spec.client_delta or default_delta(num_hospitals),
        accountant=spec.accountant,
    )
    return ledger, sampled


def _epsilons(per_hospital: dict[str, HospitalEntry]) -> dict[str, float]:
    """The round's sample-level ledger: ε each hospital reported (DP-SGD), by hospital name."""
    return {name: v.train[keys.DP_EPSILON] for name, v in per_hospital.items() if keys.DP_EPSILON in v.train}


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


def _initial_numpy(workspace: Workspace) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in workspace.loaded.initial_state.items()}


def load_global(
    workspace: Workspace, config: RunConfig, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Put a global record into this process's model as the server sees it; returns state and folded factors."""
    plan = strategies.client_plan(config, -1)
    state, fold = plan.materialize(_initial_numpy(workspace), arrays)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    set_base_delta(workspace.loaded, fold)
    set_adapter_state(workspace.loaded.model, tensors)
    return tensors, fold


#: Settings a resumed run may change: where it writes, how many rounds it runs in all, how it waits and
#: retries, how many workers simulate it, and the simulated failure rate. Nothing that changes what is learnt.
_RESUMABLE_CHANGES = (
    "output.", "federation.num-rounds", "federation.round-timeout", "federation.round-retries",
    "federation.num-workers", "federation.threads-per-worker", "federation.backend", "attack.failure-rate",
    # Which tracked round is exported, when to stop, and the fine-tune after the run: not what rounds learn.
    "federation.select-best", "federation.patience", "federation.personalize-epochs",
)


def resume_point(config: RunConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint a run continues from, after checking it fits ``config``.

    Raises
    ------
    CheckpointError
        No run or checkpoint in ``run_dir``, a corrupt checkpoint (named), a
        configuration that differs from the run's in more than
        :data:`_RESUMABLE_CHANGES`, a run already past ``num-rounds``,
        or secure aggregation (its rounds are Flower's legacy workflow).
    """
    saved_file = run_dir / "config.toml"
    if not saved_file.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it holds no config.toml (is it a fedfm run directory?)")
    if config.privacy.secure_aggregation:
        raise CheckpointError("resuming a run with privacy.secure-aggregation is not supported; start it afresh")
    checkpoint = read_checkpoint(run_dir)
    # The configuration the completed rounds ran under travels with the checkpoint; config.toml is only
    # the fallback for checkpoints written before that (an edited config.toml must not pass for the run's).
    saved = checkpoint.config if checkpoint.config is not None else to_flat(load_config(saved_file))
    wanted = to_flat(config)
    changed = sorted(
        k for k in set(saved) | set(wanted)
        if saved.get(k) != wanted.get(k) and not k.startswith(_RESUMABLE_CHANGES)
    )
    if changed:
        detail = "; ".join(f"{k} = {saved.get(k)!r} in the run, {wanted.get(k)!r} now" for k in changed)
        raise CheckpointError(
            f"cannot resume {run_dir} with a different configuration ({len(changed)} setting(s) differ: {detail}); "
            f"only {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in _RESUMABLE_CHANGES)} may change"
        )
    if checkpoint.server_round > config.federation.num_rounds:
        raise CheckpointError(
            f"{run_dir} already completed round {checkpoint.server_round}, past federation.num-rounds "
            f"= {config.federation.num_rounds}"
        )
    return checkpoint


def round_instructions(config: RunConfig) -> Callable[[int], dict[str, Any]]:
    """Train-config entries that change with the round: its local learning rate (``federation.lr-decay``).

    A function of the round number alone, so a resumed run continues the same schedule.
    """
    return lambda server_round: {keys.LEARNING_RATE: round_learning_rate(config, server_round)}


def _build_strategy(config: RunConfig, workspace: Workspace) -> GuardedStrategy:
    fed = config.federation
    num_hospitals = len(workspace.federation.hospitals)
    minimum = min(fed.min_hospitals, num_hospitals)
    inner = strategies.create(
        config,
        num_hospitals=num_hospitals,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=minimum,
        min_evaluate_nodes=minimum if fed.fraction_evaluate > 0 else 0,
        # Wait for no more than the fewest hospitals a round needs: a hospital that is down must not stall the run.
        min_available_nodes=minimum,
    )
    return GuardedStrategy(
        inner,
        min_replies=minimum,
        initial=_initial_numpy(workspace),
        plan_of=lambda hospital: strategies.client_plan(config, hospital),
        evaluate_when=lambda server_round: evaluation_due(fed, server_round),
        uniform_weights=config.privacy.client_dp != "none",
        compression=config.compression.method,
        update_norm_limit=fed.update_norm_limit,
    )


def serve(
    grid: Grid, config: RunConfig, run_dir: Path, context: Context | None = None, *, progress: Progress | None = None
) -> RunSummary:
    """Run a whole federation on a Flower grid and write the run directory.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation engine or SuperLink).
    config : RunConfig
        The validated run configuration.
    run_dir : Path
        Where the run's files go.
    context : Context, optional
        The ServerApp's context (SecAgg+ keeps its workflow state there).
    progress : Progress, optional
        Shows the rounds as they finish (:func:`fedfm.progress.progress_display`); none by default.

    Returns
    -------
    RunSummary
        The summary also written to ``summary.json``.
    """
    started = time.perf_counter()
    strategies.check(config)
    federation = federation_for(config.data)
    check_federation(config, federation)
    plans = privacy.check(config, federation)
    if plans:
        logger.info("DP-SGD in every hospital (%s accountant):\n%s", config.privacy.accountant, privacy.describe(plans))
    # Held for the whole run: inside fedfm.run this process holds it already, under `flwr run` this takes it.
    with claim(run_dir, resume=config.output.resume, overwrite=config.output.overwrite):
        # A Grid in all but name: the wait for replies gives up on Ctrl-C (fedfm.interrupt).
        return _serve(cast(Grid, InterruptibleGrid(grid)), config, Path(run_dir), context, progress=progress, started=started)


def _serve(
    grid: Grid, config: RunConfig, run_dir: Path, context: Context | None, *, progress: Progress | None,
    started: float,
) -> RunSummary:
    checkpoint = resume_point(config, Path(run_dir)) if config.output.resume else None
    directory = RunDirectory(run_dir)
    if checkpoint is not None:
        directory.restart_from(checkpoint.server_round)
        logger.info("resuming %s after round %d of %d", run_dir, checkpoint.server_round, config.federation.num_rounds)
    directory.write_config(config.replace(**{"output.resume": False, "output.overwrite": False}))
    # Hospitals keep their own state (the privacy ledger) under the run directory in a simulation.
    config = config.replace(**{"output.dir": str(Path(run_dir).resolve())})
    workspace = workspace_for(config)
    hospitals = workspace.federation.hospitals
    progress = progress if progress is not None else Progress()
    progress.begin(done=checkpoint.server_round if checkpoint is not None else 0,
                   total_rounds=config.federation.num_rounds, hospitals=len(hospitals))
    client_plans = encode_plans([strategies.client_plan(config, i) for i in range(len(hospitals))])
    flwr_config = ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.CLIENT_PLANS: client_plans})
    strategy: Any
    if config.privacy.secure_aggregation:
        strategy = secagg.bridge(config, num_hospitals=len(hospitals), initial=_initial_numpy(workspace),
                                 instructions=dict(flwr_config))
        recorder = strategy.recorder = _Recorder(config, workspace, strategy, directory, progress)
        final_arrays = secagg.run(grid, context, config, strategy, max_weight=max(len(h.train) for h in hospitals))
        stopped = None
    else:
        strategy = _build_strategy(config, workspace)
        recorder = _Recorder(config, workspace, strategy, directory, progress)
        initial = strategies.initial_arrays(strategy.inner, config, _initial_numpy(workspace))
        first_round = 1
        if checkpoint is not None:
            try:
                restore(strategy, checkpoint.state.get("strategy") or {"levels": []}, checkpoint.state_arrays)
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"the checkpoint of {run_dir} does not fit this run's strategy: {err}") from err
            recorder.resume_from(checkpoint)
            initial, first_round = checkpoint.arrays, checkpoint.server_round + 1
        final, stopped = strategy.run(
            grid,
            numpy_to_record(initial),
            first_round=first_round,
            num_rounds=config.federation.num_rounds,
            timeout=config.federation.round_timeout,
            retries=config.federation.round_retries,
            train_config=flwr_config,
            evaluate_config=ConfigRecord(dict(flwr_config)),
            evaluate_fn=recorder,
            stop_fn=recorder.early_stop,
            round_config=round_instructions(config),
            evaluate_initial=recorder.initial is None,
        )
        final_arrays = record_to_numpy(final)
        if stopped and recorder.early_stopped:
            logger.info("the run stopped early: %s", stopped)
        elif stopped:
            logger.error("the run stopped early: %s; resume it with: fedfm run --resume %s", stopped, run_dir)
    last = recorder.rounds[-1] if recorder.rounds else None
    last_round = last.round if last is not None else checkpoint.server_round if checkpoint is not None else 0
    exported_round = last_round
    if config.federation.select_best == "validation" and recorder.best.arrays is not None:
        exported_round, final_arrays = int(recorder.best.round), recorder.best.arrays  # type: ignore[arg-type]
        logger.info("exporting round %d's adapter: best validation %s %.4f (the last round was %d)",
                    exported_round, recorder.best.metric, recorder.best.score, last_round)
    audit = run_audit(grid, config, final_arrays, flwr_config, workspace.hospital_names) if config.privacy.audit else None
    personalized = (
        run_personalization(grid, config, final_arrays, flwr_config, workspace.hospital_names, server_round=last_round)
        if config.federation.personalize_epochs > 0
        else {name: p for name, v in (last.per_hospital if last is not None else {}).items()
              if (p := _with_prefix(v.evaluate, keys.PERSONALIZED_PREFIX))}
    )
    final_state, fold = load_global(workspace, config, final_arrays)
    export_adapter(
        workspace.loaded,
        final_state,
        directory.adapter_dir,
        merged_dir=directory.merged_dir if config.output.merged_model else None,
        fold=fold,
    )
    summary = RunSummary(
        rounds=len(recorder.rounds),
        stopped=stopped,
        early_stopped=bool(stopped and recorder.early_stopped),
        best_round=recorder.best.round,
        selection=selection_summary(config, recorder.rounds, recorder.best, exported_round),
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
        hospitals=_hospital_rows(config, workspace, recorder.rounds),
        global_test_rows=len(workspace.federation.global_test),
        # Without it, "global" above is the hospitals' weighted mean on their local test splits.
        central_evaluation=config.federation.central_evaluation,
        bytes_up=int(sum(e.bytes_up for e in recorder.rounds)),
        bytes_down=int(sum(e.bytes_down for e in recorder.rounds)),
        sent_by_hospital=_sent_by_hospital(strategy, recorder.rounds, workspace.hospital_names),
        adapter_parameters=workspace.loaded.adapter_parameters,
        base_parameters=workspace.loaded.base_parameters,
        adapter_tensors=len(workspace.loaded.initial_state),
        adapter_bytes=int(sum(v.nbytes for v in final_arrays.values())),
        personalized=bool(getattr(strategy.inner, "personalized", False)),
        privacy=PrivacySummary(
            mode=config.privacy.mode,
            hospitals=privacy_summary(recorder.rounds),
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
    directory.write_summary(summary)
    try:  # the adapter and summary are safe on disk already: a failing card must not fail the run
        export.write_model_card(directory.path, label_names=list(workspace.federation.source.label_names))
    except (FedfmError, OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("the model card of %s was not written: %s", directory.adapter_dir, err)
    return summary


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
            per_hospital={name: _plain(v.evaluate) for name, v in entry.per_hospital.items()},
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


def _selection_summary(
    config: RunConfig, history: list[dict[str, Any]], best: BestRound, exported_round: int
) -> dict[str, Any]:
    """:func:`selection_summary` on ``metrics.jsonl`` lines, as JSON (what tests/test_personalization.py reads)."""
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
        hospitals[name] = _with_prefix({k: float(v) for k, v in metrics.items()}, keys.PERSONALIZED_PREFIX)
    hospitals = dict(sorted(hospitals.items()))
    logger.info("personalized (%d local epoch(s)): %s", config.federation.personalize_epochs,
                "  ".join(f"{name} {_fmt(m)}" for name, m in hospitals.items()))
    return hospitals


def make_server_app(
    config: RunConfig, run_dir: Path, *, progress: str | bool = "auto", verbose: bool = False
) -> ServerApp:
    """A ServerApp that runs ``config`` and writes ``run_dir`` (used by :func:`fedfm.run`).

    ``progress`` and ``verbose`` choose the progress display (:func:`fedfm.progress.progress_display`).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        with progress_display(progress, verbose=verbose) as display:
            serve(grid, config, run_dir, context, progress=display)

    return server_app


app = ServerApp()


@app.main()
def _flwr_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the configuration comes from Flower's run config."""
    config = from_flat(dict(context.run_config))
    run_dir = Path(config.output.dir) if config.output.dir else default_run_dir()
    logger.info("fedfm run directory: %s", run_dir.resolve())
    with progress_display() as display:
        serve(grid, config, run_dir, context, progress=display)
