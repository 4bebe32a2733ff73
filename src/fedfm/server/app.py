"""The ServerApp: its orchestration of a run, from the claim on the run directory to the summary.

:func:`serve` is the whole server; :data:`app` is the ServerApp that ``flwr run .``
loads (``[tool.flwr.app.components]``: ``fedfm.server:app``; it reads the run
configuration from Flower's run config), and :func:`make_server_app` builds one
around a configuration for :func:`fedfm.run`. The jobs it orchestrates live beside it:
the round loop (:func:`fedfm.strategies.rounds.run_rounds`, through the guard), the recorder
(:mod:`fedfm.server.recorder`), the summary (:mod:`fedfm.server.summary`), resuming
(:mod:`fedfm.server.resume`) and the asks after the last round (:mod:`fedfm.server.asks`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedfm import export, keys, privacy, secagg, strategies, tracking
from fedfm.adapters import export_adapter
from fedfm.config import RunConfig, evaluation_due, from_flat, round_learning_rate, to_json
from fedfm.errors import CheckpointError, FedfmError
from fedfm.interrupt import InterruptibleGrid
from fedfm.preflight import Preflight, preflight
from fedfm.progress import Progress, progress_display
from fedfm.rundir import Checkpoint, RunDirectory, RunSummary, claim, default_run_dir
from fedfm.server.asks import run_audit, run_personalization
from fedfm.server.model import initial_arrays, load_global
from fedfm.server.recorder import Recorder
from fedfm.server.resume import resume_point
from fedfm.server.summary import build_summary, kept_parts_scores
from fedfm.strategies import GuardedStrategy
from fedfm.strategies.plan import encode_plans
from fedfm.strategies.state import restore
from fedfm.wire import numpy_to_record, record_to_numpy
from fedfm.workspace import Workspace, workspace_for

logger = logging.getLogger("fedfm")


def round_instructions(config: RunConfig) -> Callable[[int], dict[str, Any]]:
    """Train-config entries that change with the round: its local learning rate (``federation.lr-decay``).

    A function of the round number alone, so a resumed run continues the same schedule.
    """
    return lambda server_round: {keys.LEARNING_RATE: round_learning_rate(config, server_round)}


def build_strategy(config: RunConfig, workspace: Workspace) -> GuardedStrategy:
    """The configured strategy inside the guard, waiting for no more hospitals than a round needs."""
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
    client_level = config.privacy.client_dp != "none"
    return GuardedStrategy(
        inner,
        # Under client-level DP every round releases its noised mean over the hospitals sampled, whoever
        # replied, and no reply is left out for how it compares with the others (strategies.client_dp).
        min_replies=0 if client_level else minimum,
        initial=initial_arrays(workspace, config),
        plan_of=lambda hospital: strategies.client_plan(config, hospital),
        evaluate_when=lambda server_round: evaluation_due(fed, server_round),
        uniform_weights=client_level,
        compression=config.compression.method,
        update_norm_limit=0.0 if client_level else fed.update_norm_limit,
    )


def serve(
    grid: Grid,
    config: RunConfig,
    run_dir: Path,
    context: Context | None = None,
    *,
    progress: Progress | None = None,
    checked: Preflight | None = None,
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
    checked : Preflight, optional
        What :func:`fedfm.preflight.preflight` found for ``config`` when the caller ran it
        already (:func:`fedfm.run`); without it ``serve`` runs it (``flwr run``, a SuperLink).

    Returns
    -------
    RunSummary
        The summary also written to ``summary.json``.
    """
    started = time.perf_counter()
    # Every config-time check, in one call, unless the caller ran it (fedfm.run does, before Ray starts).
    checked = checked if checked is not None else preflight(config)
    if checked.privacy:
        logger.info("DP-SGD in every hospital (%s accountant):\n%s", config.privacy.accountant,
                    privacy.describe(checked.privacy))
    # Held for the whole run: inside fedfm.run this process holds it already, under `flwr run` this takes it.
    with claim(run_dir, resume=config.output.resume, overwrite=config.output.overwrite):
        # A Grid in all but name: the wait for replies gives up on Ctrl-C (fedfm.interrupt).
        return _serve(cast(Grid, InterruptibleGrid(grid)), config, Path(run_dir), context, progress=progress,
                      started=started)


def _serve(
    grid: Grid, config: RunConfig, run_dir: Path, context: Context | None, *, progress: Progress | None,
    started: float,
) -> RunSummary:
    checkpoint = resume_point(config, run_dir) if config.output.resume else None
    directory = RunDirectory(run_dir)
    # Hospitals keep their own state (the privacy ledger) under the run directory in a simulation.
    run_config = config.replace(**{"output.dir": str(run_dir.resolve())})
    # Data and model first: one that cannot load (a package missing for a model alias) leaves no run
    # behind, so the same command works again once it is fixed (no --overwrite, nothing to resume).
    workspace = workspace_for(run_config)
    if checkpoint is not None:
        directory.restart_from(checkpoint.server_round)
        logger.info("resuming %s after round %d of %d", run_dir, checkpoint.server_round, config.federation.num_rounds)
    directory.write_config(config.replace(**{"output.resume": False, "output.overwrite": False}))
    config = run_config
    hospitals = workspace.federation.hospitals
    progress = progress if progress is not None else Progress()
    progress.begin(done=checkpoint.server_round if checkpoint is not None else 0,
                   total_rounds=config.federation.num_rounds, hospitals=len(hospitals))
    client_plans = encode_plans([strategies.client_plan(config, i) for i in range(len(hospitals))])
    flwr_config = ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.CLIENT_PLANS: client_plans})
    strategy: Any
    stopped: str | None = None
    with tracking.tracked(config, run_dir, resumed=checkpoint is not None) as tracker:
        if config.privacy.secure_aggregation:
            strategy = secagg.bridge(config, num_hospitals=len(hospitals), initial=initial_arrays(workspace, config),
                                     instructions=dict(flwr_config))
            recorder = strategy.recorder = Recorder(config, workspace, strategy, directory, progress, tracker)
            final_arrays = secagg.run(grid, context, config, strategy,
                                      max_weight=max(len(h.train) for h in hospitals))
        else:
            strategy = build_strategy(config, workspace)
            recorder = Recorder(config, workspace, strategy, directory, progress, tracker)
            final_arrays, stopped = _run_rounds(grid, config, run_dir, strategy, recorder, workspace, checkpoint,
                                                flwr_config)
        summary = _finish(grid, config, directory, workspace, strategy, recorder, checkpoint, flwr_config,
                          final_arrays=final_arrays, stopped=stopped, started=started)
        if tracker is not None:
            tracker.finish(run_dir, directory.adapter_dir)
        return summary


def _run_rounds(
    grid: Grid, config: RunConfig, run_dir: Path, strategy: GuardedStrategy, recorder: Recorder,
    workspace: Workspace, checkpoint: Checkpoint | None, flwr_config: ConfigRecord,
) -> tuple[dict[str, np.ndarray], str | None]:
    """The rounds of a run (from a resumed run's checkpoint on): the final global adapter and why it stopped early."""
    initial = strategies.initial_arrays(strategy.inner, config, initial_arrays(workspace, config))
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
    if stopped and recorder.early_stopped:
        logger.info("the run stopped early: %s", stopped)
    elif stopped:
        logger.error("the run stopped early: %s; resume it with: fedfm run --resume %s", stopped, run_dir)
    return record_to_numpy(final), stopped


def _finish(
    grid: Grid, config: RunConfig, directory: RunDirectory, workspace: Workspace, strategy: Any, recorder: Recorder,
    checkpoint: Checkpoint | None, flwr_config: ConfigRecord, *, final_arrays: dict[str, np.ndarray],
    stopped: str | None, started: float,
) -> RunSummary:
    """After the rounds: choose the round to export, ask the hospitals, export, write the summary and the card."""
    last = recorder.rounds[-1] if recorder.rounds else None
    last_round = last.round if last is not None else checkpoint.server_round if checkpoint is not None else 0
    exported_round = last_round
    if config.federation.select_best == "validation" and recorder.best.arrays is not None:
        exported_round, final_arrays = int(recorder.best.round), recorder.best.arrays  # type: ignore[arg-type]
        logger.info("exporting round %d's adapter: best validation %s %.4f (the last round was %d)",
                    exported_round, recorder.best.metric, recorder.best.score, last_round)
    names = workspace.hospital_names
    audit = run_audit(grid, config, final_arrays, flwr_config, names) if config.privacy.audit else None
    personalized = (
        run_personalization(grid, config, final_arrays, flwr_config, names, server_round=last_round)
        if config.federation.personalize_epochs > 0
        else kept_parts_scores(last)
    )
    final_state, fold = load_global(workspace, config, final_arrays)
    export_adapter(
        workspace.loaded,
        final_state,
        directory.adapter_dir,
        merged_dir=directory.merged_dir if config.output.merged_model else None,
        fold=fold,
    )
    summary = build_summary(
        config, workspace, recorder, strategy, stopped=stopped, checkpoint=checkpoint, exported_round=exported_round,
        final_arrays=final_arrays, personalized=personalized, audit=audit, started=started,
    )
    directory.write_summary(summary)
    try:  # the adapter and summary are safe on disk already: a failing card must not fail the run
        export.write_model_card(directory.path, label_names=list(workspace.federation.source.label_names))
    except (FedfmError, OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("the model card of %s was not written: %s", directory.adapter_dir, err)
    return summary


def make_server_app(
    config: RunConfig, run_dir: Path, *, progress: str | bool = "auto", verbose: bool = False,
    checked: Preflight | None = None,
) -> ServerApp:
    """A ServerApp that runs ``config`` and writes ``run_dir`` (used by :func:`fedfm.run`).

    ``progress`` and ``verbose`` choose the progress display (:func:`fedfm.progress.progress_display`);
    ``checked``, the caller's :func:`fedfm.preflight.preflight` of ``config``, spares :func:`serve` running it again.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        with progress_display(progress, verbose=verbose) as display:
            serve(grid, config, run_dir, context, progress=display, checked=checked)

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
