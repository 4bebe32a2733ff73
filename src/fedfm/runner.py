"""``fedfm.run(config)``: a whole federated fine-tune in Flower's simulation engine."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfm import interrupt, rundir
from fedfm.config import RunConfig, load_config, resolve_parallelism
from fedfm.errors import FedfmError
from fedfm.progress import check_mode
from fedfm.rundir import RoundEntry, RunSummary, default_run_dir

if TYPE_CHECKING:
    from fedfm.preflight import Preflight

logger = logging.getLogger("fedfm")


@dataclass(frozen=True)
class RunResult:
    """What a run produced; everything is also in ``run_dir``.

    Attributes
    ----------
    run_dir : Path
        The run directory (config.toml, metrics.jsonl, summary.json, adapter/, checkpoints/).
    summary : dict
        The content of ``summary.json`` (typed: :attr:`run_summary`).
    history : list of dict
        One entry per round, as in ``metrics.jsonl`` (typed: :attr:`rounds`).
    """

    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResult:
        """Read a finished run's directory (through :func:`fedfm.rundir.read_run`)."""
        files = rundir.read_run(run_dir, need_rounds=False)
        if files.summary is None:
            raise FedfmError(f"{files.path} holds no summary.json: the run did not finish")
        # As the files hold them (JSON object keys are strings, e.g. SecAgg+'s rounds in the summary).
        return cls(files.path, json.loads(rundir.summary_text(files.summary)),
                   [json.loads(rundir.round_line(entry)) for entry in files.rounds])

    @property
    def run_summary(self) -> RunSummary:
        """``summary.json`` as its typed record."""
        return RunSummary.from_json(self.summary)

    @property
    def rounds(self) -> list[RoundEntry]:
        """The rounds of ``metrics.jsonl`` as typed records."""
        return [RoundEntry.from_json(entry) for entry in self.history]

    @property
    def final_global(self) -> dict[str, float]:
        """Metrics of the final global adapter on the global test set."""
        return dict(self.run_summary.final.global_)

    @property
    def final_per_hospital(self) -> dict[str, dict[str, float]]:
        """Metrics of the final global adapter on each hospital's local test split."""
        return {k: dict(v) for k, v in self.run_summary.final.per_hospital.items()}

    @property
    def adapter_dir(self) -> Path:
        """Folder loadable with ``peft.PeftModel.from_pretrained(base, adapter_dir)``."""
        return self.run_dir / "adapter"

    @property
    def final_personalized(self) -> dict[str, dict[str, float]]:
        """Each hospital's personalized model on its local test split (a local fine-tune or its kept parts); may be empty."""
        return {k: dict(v) for k, v in self.run_summary.final.personalized.items()}

    def table(self) -> str:
        """The final scores as a plain-text table: the global adapter, and each hospital's personalized model if any."""
        summary = self.run_summary
        # Without central evaluation the "global" scores are the hospitals' weighted mean on their local
        # test splits; hospitals that did not evaluate (federation.fraction-evaluate = 0) have no row.
        central = summary.central_evaluation
        first = "global test" if central else "hospitals' mean"
        hospitals = self.final_per_hospital
        scored = [(first, self.final_global), *hospitals.items()]
        # A classifier is read by accuracy and macro-F1; a generative model by its held-out loss and perplexity.
        columns = (("loss", "perplexity") if any("perplexity" in m for _, m in scored)
                   else ("accuracy", "macro-f1"))
        rows = [(name, m) for name, m in scored if any(c in m for c in columns)]
        if not rows:
            return ("no test scores: federation.central-evaluation is false and no hospital evaluated "
                    f"(federation.fraction-evaluate); score the adapter with `fedfm evaluate --adapter "
                    f"{self.adapter_dir}`")
        personalized = self.final_personalized
        width = max(len(name) for name, _ in rows)
        widths = [max(8, len(c)) for c in columns]
        mine = [f"personalized {_SHORT[c]}" for c in columns]
        header = f"{'':{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + f"  {'examples':>8}"
        lines = [header + ("".join(f"  {c}" for c in mine) if personalized else "")]
        for name, m in rows:
            if name == first:
                examples = (summary.global_test_rows or 0 if central
                            else sum(h.get("num-examples", 0) for h in hospitals.values()))
            else:
                examples = m.get("num-examples", 0)
            line = (f"{name:{width}}  " + "  ".join(f"{m.get(c, float('nan')):{w}.3f}" for c, w in zip(columns, widths))
                    + f"  {int(examples):8d}")
            if name in personalized:
                line += "".join(f"  {personalized[name].get(c, float('nan')):{len(h)}.3f}" for c, h in zip(columns, mine))
            lines.append(line)
        selection = summary.selection
        if selection.best_round is not None:
            best = selection.best.global_ if selection.best is not None else {}
            lines.append(
                f"best round by validation {selection.metric}: {selection.best_round} "
                f"({selection.best_validation:.4f}; global test {columns[0]} {best.get(columns[0], float('nan')):.3f}); "
                f"exported adapter: round {selection.exported_round} (select-best {selection.select_best})"
            )
        return "\n".join(lines)


#: How the final table's personalized columns name a metric.
_SHORT = {"accuracy": "acc", "macro-f1": "f1", "loss": "loss", "perplexity": "perplexity"}


class _FlowerFilter(logging.Filter):
    """Keep Flower's warnings and errors; drop its per-round INFO lines and the run_simulation notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return "DEPRECATED FEATURE" not in record.getMessage() and "deprecated feature" not in record.getMessage()


_FLOWER_FILTER = _FlowerFilter()


def setup_logging(verbose: bool = False) -> None:
    """Plain progress lines from fedfm; Flower's and Ray's chatter only when ``verbose``."""
    if not any(getattr(h, "_fedfm", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._fedfm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # Each base-model load, with its time and process: what --verbose adds to fedfm's own lines.
    logging.getLogger("fedfm.adapters").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # A filter on Flower's logger holds whatever handlers Flower installs later.
    flower = logging.getLogger("flwr")
    if verbose:
        flower.removeFilter(_FLOWER_FILTER)
    else:
        flower.addFilter(_FLOWER_FILTER)


def _environment() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray lowers its workers to nice 15; here they do the federation's real work.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # OpenMP's default busy-waiting makes two torch threads 6-10x slower than one as soon as
    # another process shares the cores (heart smoke benchmark: 7 min 54 s -> 2 min 06 s, same metrics).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def run(
    config: RunConfig | str | Path | None = None,
    *,
    out: str | Path | None = None,
    verbose: bool = False,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | str = True,
) -> RunResult:
    """Run a federated fine-tune in Flower's simulation engine, one simulated SuperNode per hospital.

    Parameters
    ----------
    config : RunConfig or path, optional
        A configuration, or a TOML file to load one from. With ``resume`` and
        no configuration, the run directory's own ``config.toml``.
    out : str or Path, optional
        Run directory; overrides ``output.dir`` (default ``runs/<timestamp>``).
    verbose : bool
        Show Flower's and Ray's own logs.
    resume : str or Path, optional
        A run directory to continue from its last complete round (its
        checkpoint: global adapter, strategy state, random generators,
        privacy ledgers). Only operational settings (``output.*``,
        ``federation.num-rounds`` and the others docs/reliability.md lists)
        may differ from the configuration stored with that checkpoint.
    overwrite : bool
        Delete the fedfm run already in the run directory and start afresh
        (``output.overwrite``). Without it, or ``resume``, a run directory
        that holds anything is refused.
    progress : bool or str
        Show the rounds as they finish on stderr: a live line on a terminal,
        a plain line per round elsewhere (``"auto"``, the same as True), or
        ``"live"``, ``"lines"``, ``"off"`` (False); see :mod:`fedfm.progress`.

    Returns
    -------
    RunResult
        Final global and per-hospital metrics, history, and the run directory.

    Raises
    ------
    RunInterrupted
        Ctrl-C (SIGINT) stopped the run: the round in flight was abandoned,
        the last complete round's checkpoint stands, and the message says how
        to resume. A second Ctrl-C raises ``KeyboardInterrupt`` at once.
    RunDirectoryError
        The run directory is a file, cannot be written, is in use by another
        process, or already holds files (and neither ``resume`` nor ``overwrite`` is given).
    """
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise FedfmError(f"a resumed run writes into its own directory {resume}, not {out}")
        out = resume
        if config is None:
            config = Path(resume) / "config.toml"
    if config is None:
        config = RunConfig()
    if not isinstance(config, RunConfig):
        config = load_config(config)
    if resume is not None:
        config = config.replace(**{"output.resume": True, "output.dir": str(resume)})
    if overwrite:
        config = config.replace(**{"output.overwrite": True})
    _environment()
    setup_logging(verbose)
    check_mode(progress)  # a bad mode is refused here, not inside the ServerApp's thread

    from fedfm.preflight import preflight
    from fedfm.server import resume_point

    run_dir = Path(out) if out else Path(config.output.dir) if config.output.dir else default_run_dir()
    rundir.check_usable(run_dir, resume=config.output.resume, overwrite=config.output.overwrite)
    # Every check that needs no model (strategy, data, hospitals, DP budgets), before Ray or any model starts.
    checked = preflight(config, simulation=True)
    # One process at a time in a run directory, and a run in it is never replaced by accident (an old run is
    # deleted only with output.overwrite, and only now that the new configuration and data have passed).
    with rundir.claim(run_dir, resume=config.output.resume, overwrite=config.output.overwrite):
        if config.output.resume:
            resume_point(config, run_dir)  # a missing, corrupt or mismatched checkpoint is refused here, before Ray
        _simulate(config, run_dir, checked=checked, verbose=verbose, progress=progress)
    return RunResult.load(run_dir)


def _simulate(config: RunConfig, run_dir: Path, *, checked: Preflight, verbose: bool, progress: bool | str) -> None:
    """Run ``config``'s federation in Flower's simulation engine; Ctrl-C abandons the round in flight."""
    import torch
    from flwr.simulation import run_simulation

    from fedfm import client, engine
    from fedfm.server import make_server_app

    federation = checked.federation
    num_hospitals = len(federation.hospitals)
    workers, threads = resolve_parallelism(config.federation)
    fed = config.federation
    address = fed.ray_address.strip()
    backend = engine.resolve(fed.backend, workers=workers, ray_settings=bool(address) or fed.gpus_per_hospital > 0)
    torch.set_num_threads(threads)
    gpus = torch.cuda.device_count() if config.model.device != "cpu" and torch.cuda.is_available() else 0
    backend_config = engine.ray_options(workers=workers, threads=threads, gpus_per_hospital=fed.gpus_per_hospital,
                                        address=address, gpus=gpus, quiet=not verbose)
    logger.info(
        "fedfm: %d hospitals (%s), %d rounds, model %s, %s; run directory %s",
        num_hospitals, ", ".join(h.name for h in federation.hospitals), config.federation.num_rounds,
        config.model.name,
        f"in this process, {threads} thread(s)" if backend == "in-process"
        else f"{workers} Ray worker(s) x {threads} thread(s)" + (f" on the Ray cluster at {address}" if address else ""),
        run_dir,
    )
    with warnings.catch_warnings(), engine.backend(backend), interrupt.stop_on_sigint():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=make_server_app(config, run_dir, progress=progress, verbose=verbose, checked=checked),
                client_app=client.app,
                num_supernodes=num_hospitals,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        except interrupt.RunInterrupted:
            done = rundir.completed_round(run_dir)
            kept = (f"round {done}'s checkpoint is complete" if done
                    else "no round completed" if done is None else "only the round-0 checkpoint is complete")
            raise interrupt.RunInterrupted(
                f"interrupted (Ctrl-C): the round in flight was abandoned and {kept}; "
                + (f"resume with: fedfm run --resume {run_dir}" if done is not None
                   else f"start it afresh with --overwrite --out {run_dir}"),
                run_dir=str(run_dir), last_round=done,
            ) from None
