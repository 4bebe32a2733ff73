"""Experiment tracking: a run's rounds, settings and exported files in MLflow or TensorBoard.

``[output] tracking = "mlflow"`` (or ``"tensorboard"``) sends what the run
directory records to the tracker people already use to compare experiments;
the run directory stays the record fedfm itself reads (``fedfm report``,
resume, the model card).

Per round (``step`` = the server round; round 0 is the global adapter before
training): ``global/<metric>``, ``federated/<metric>``, ``validation/<metric>``,
``hospital/<name>/<train|evaluate>/<metric>``, ``privacy/epsilon/<name>`` (a
hospital's DP-SGD ε) and ``privacy/client-level-epsilon``, ``bytes/up``,
``bytes/down``, ``bytes/<name>/up|down``, ``round/seconds``. Once: every
resolved setting as a parameter (``model.name``, ...; TensorBoard gets them
as a text summary); at the end, the exported ``adapter/`` and the run's
``report/`` (from :func:`fedfm.report.write_report`) as MLflow artifacts.

MLflow needs no server: with ``output.tracking-uri`` empty, runs go to a
SQLite store beside the run directory (``<parent>/mlflow.db``, artifacts in
``<parent>/mlartifacts``), so every run under ``runs/`` lands in one store
(``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``). A URI
(``http://mlflow.example.org``, ``sqlite:///...``) points elsewhere. A resumed
run continues its MLflow run (the run id is kept in ``tracking.json``).
TensorBoard writes event files into ``<run dir>/tensorboard`` (or
``<tracking-uri>/<run name>``).

A tracker that fails during the run (a server gone) logs one warning and
stops tracking; the run itself goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfm.config import RunConfig
from fedfm.interrupt import RunInterrupted
from fedfm.rundir import RoundEntry
from fedfm.rundir.files import atomic_write_text

logger = logging.getLogger("fedfm")

#: Which package each tracker needs, and the extra that installs it.
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
#: Where a run directory keeps its MLflow run id, so a resumed run continues the same MLflow run.
STATE_FILE = "tracking.json"
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


def problems(config: RunConfig) -> list[str]:
    """What this environment lacks for ``output.tracking`` (asked before any model loads)."""
    kind = config.output.tracking
    if kind == "none" or importlib.util.find_spec(PACKAGES[kind]) is not None:
        return []
    return [(f"`output.tracking` {kind!r} needs the {PACKAGES[kind]} package, which is not installed: "
             f'pip install "fedfm[tracking]" (or set output.tracking = "none")')]


def _key(*parts: str) -> str:
    """A metric name both trackers accept (MLflow allows letters, digits, ``_-. /``)."""
    return "/".join(_UNSAFE.sub("_", part) for part in parts)


def round_values(entry: RoundEntry) -> dict[str, float]:
    """The numbers of one round, by metric name (see the module's docstring)."""
    values: dict[str, float] = {}
    for group, metrics in (("global", entry.global_), ("federated", entry.federated),
                           ("validation", entry.validation)):
        values.update({_key(group, name): value for name, value in metrics.items()})
    for hospital, row in entry.per_hospital.items():
        for kind, metrics in (("train", row.train), ("evaluate", row.evaluate)):
            values.update({_key("hospital", hospital, kind, name): value for name, value in metrics.items()})
        values[_key("bytes", hospital, "up")] = row.bytes_up
        values[_key("bytes", hospital, "down")] = row.bytes_down
    for hospital, epsilon in entry.privacy.sample_level_epsilon.items():
        values[_key("privacy", "epsilon", hospital)] = epsilon
    if entry.privacy.client_level is not None:
        values["privacy/client-level-epsilon"] = entry.privacy.client_level.epsilon
    values.update({"bytes/up": entry.bytes_up, "bytes/down": entry.bytes_down, "round/seconds": entry.seconds})
    return {name: float(value) for name, value in values.items() if isinstance(value, (int, float))}


class Tracker:
    """Sends a run to an experiment tracker; a no-op for ``output.tracking = "none"``."""

    def log_params(self, params: dict[str, str]) -> None:
        """The run's resolved settings."""

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """One round's numbers."""

    def log_folder(self, folder: Path, name: str) -> None:
        """A folder of files the run wrote (the adapter, the report)."""

    def close(self, status: str) -> None:
        """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``."""


class MlflowTracker(Tracker):
    """One MLflow run per fedfm run, through an explicit ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, config: RunConfig, run_dir: Path, *, resumed: bool) -> None:
        from mlflow import MlflowClient

        parent = run_dir.resolve().parent
        uri = config.output.tracking_uri or f"sqlite:///{parent / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        name = config.output.tracking_experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None if config.output.tracking_uri else (parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        state = run_dir / STATE_FILE
        stored = json.loads(state.read_text()) if resumed and state.is_file() else {}
        if stored.get("tracking") == "mlflow" and stored.get("uri") == uri:
            self.run_id = str(stored["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            self.new = False
        else:
            run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name,
                                         tags={"fedfm.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            self.new = True
            atomic_write_text(state, json.dumps({"tracking": "mlflow", "uri": uri, "run_id": self.run_id}) + "\n")
        logger.info("fedfm: tracking this run in MLflow at %s (experiment %r, run %s)", uri, name, self.run_id)

    def log_params(self, params: dict[str, str]) -> None:
        if not self.new:  # a resumed run logged them at its start (only operational settings may differ)
            return
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(items), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_folder(self, folder: Path, name: str) -> None:
        if folder.is_dir():
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker(Tracker):
    """Event files for TensorBoard, one folder per run."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = config.output.tracking_uri
        self.folder = Path(root) / run_dir.resolve().name if root else run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.folder))
        logger.info("fedfm: tracking this run in TensorBoard: tensorboard --logdir %s", self.folder.parent)

    def log_params(self, params: dict[str, str]) -> None:
        table = "\n".join(["| setting | value |", "| --- | --- |",
                           *(f"| {key} | {value} |" for key, value in params.items())])
        self.writer.add_text("config", table, global_step=0)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class Tracking:
    """The run's tracker, made safe: a failure logs one warning and turns tracking off for the rest of the run."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker: Tracker | None = tracker

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001  # a tracking server down must not cost the run
            logger.warning("tracking stopped: %s failed (%s: %s); the run directory has everything",
                           what, type(err).__name__, err)
            self.tracker = None

    def round(self, entry: RoundEntry) -> None:
        """Log a finished round."""
        self._call(f"logging round {entry.round}", "log_metrics", round_values(entry), entry.round)

    def initial(self, metrics: dict[str, float] | None) -> None:
        """Log the global adapter's scores before training (step 0)."""
        if metrics:
            self._call("logging round 0", "log_metrics", {_key("global", k): float(v) for k, v in metrics.items()}, 0)

    def finish(self, run_dir: Path, adapter_dir: Path) -> None:
        """Log the exported adapter and the run's report (written now into ``<run dir>/report``)."""
        if not isinstance(self.tracker, MlflowTracker):
            return
        from fedfm.report import write_report

        self._call("writing the report", "log_folder", write_report(run_dir, run_dir / "report").parent, "report")
        self._call("logging the adapter", "log_folder", adapter_dir, "adapter")


@contextmanager
def tracked(config: RunConfig, run_dir: Path, *, resumed: bool) -> Iterator[Tracking | None]:
    """The run's tracking for the block, or ``None`` without ``output.tracking``; the tracker run ends with it.

    The block's outcome is the tracker run's status: ``FINISHED``, ``KILLED`` (Ctrl-C) or ``FAILED``.
    """
    kind = config.output.tracking
    if kind == "none":
        yield None
        return
    try:
        tracker: Tracker = (MlflowTracker(config, run_dir, resumed=resumed) if kind == "mlflow"
                            else TensorBoardTracker(config, run_dir))
    except Exception as err:  # noqa: BLE001  # nor a tracker that cannot start
        logger.warning("tracking is off for this run: %s could not start (%s: %s)", kind, type(err).__name__, err)
        yield None
        return
    tracking = Tracking(tracker)
    tracking._call("logging the settings", "log_params", {k: str(v) for k, v in config.to_flat().items()})
    status = "FAILED"
    try:
        yield tracking
        status = "FINISHED"
    except (KeyboardInterrupt, RunInterrupted):
        status = "KILLED"
        raise
    finally:
        tracking._call("ending the run", "close", status)
