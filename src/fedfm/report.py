"""``fedfm report RUN_DIR``: plots and a one-page summary of a run, read from its run directory.

Reads the run through :func:`fedfm.rundir.read_run` (``config.toml``,
``metrics.jsonl``, ``summary.json``), so it works on a finished run, on one
that stopped early or was killed (``summary.json`` missing or older than the
metrics), on a resumed run, and on a run still going. Writes PNG plots
(matplotlib, Agg backend) and ``report.md`` into ``RUN_DIR/report/`` unless told otherwise:

- ``global.png``: the global adapter's metrics per round (global test set);
- ``hospitals.png``: each hospital's local-test metrics and training loss per round;
- ``epsilon.png``: ε spent per round and hospital, and the client-level ε (DP runs only;
  :func:`fedfm.privacy.report.plot_epsilon`);
- ``bytes.png``: bytes up and down per round, and per hospital over the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfm import keys
from fedfm.privacy.report import ReportError, plot_epsilon
from fedfm.rundir import HospitalEntry, Metrics, RoundEntry, RunFiles, RunSummary, read_run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOTS", "ReportError", "RunFiles", "plot_bytes", "plot_epsilon", "plot_global", "plot_hospitals", "read_run",
    "unwritable", "write_report",
]

#: The plots a report may hold (``epsilon.png`` only for a run with differential privacy).
PLOTS = ("global.png", "hospitals.png", "epsilon.png", "bytes.png")
#: Metrics shown first, in this order; any others a task reports follow, sorted.
_HEADLINE = ("accuracy", "macro-f1", "weighted-f1", "perplexity", "token-accuracy", "loss")
#: Bookkeeping entries of a hospital's metrics, not scores.
_NOT_SCORES = frozenset({"num-examples", "hospital-index"})


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path``, or None; asked before any work, so nothing is lost at the end.

    Folders on the way that do not exist yet are fine (the writers create them)
    as long as the nearest existing one is a writable folder.

    Parameters
    ----------
    path : Path
        The file to be written (``--output``, ``--plot``).

    Returns
    -------
    str or None
        The reason, naming the path that is in the way; None when it can be written.
    """
    try:
        if path.is_dir():
            return f"{path} is a folder"
        if path.exists():
            return None if os.access(path, os.W_OK) else f"{path} is not writable (permission denied)"
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"folder {folder} is not writable (permission denied)"
    except OSError as err:  # e.g. a folder on the way that may not be listed
        return f"{err.filename or path}: {err.strerror or err}"
    return None


# ---------------------------------------------------------------------------------------------- reading the rounds


def _ordered(names: Iterable[str]) -> list[str]:
    names = set(names) - _NOT_SCORES
    return [n for n in _HEADLINE if n in names] + sorted(names - set(_HEADLINE))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _series(rounds: Iterable[RoundEntry], value: Callable[[RoundEntry], Any]) -> tuple[list[int], list[float]]:
    """Rounds and ``value(entry)``, where it is a number (other rounds are skipped)."""
    xs, ys = [], []
    for entry in rounds:
        number = _number(value(entry))
        if number is not None:
            xs.append(entry.round)
            ys.append(number)
    return xs, ys


def _summary(run: RunFiles) -> RunSummary:
    """The run's summary, or an empty one while it runs or after it was killed."""
    return run.summary if run.summary is not None else RunSummary()


def _latest(run: RunFiles, name: str, kind: str) -> tuple[int, Metrics]:
    """A hospital's latest non-empty ``train`` or ``evaluate`` metrics, with their round (0, {} if none)."""
    for entry in reversed(run.rounds):
        hospital = entry.per_hospital.get(name)
        metrics = (hospital.train if kind == "train" else hospital.evaluate) if hospital is not None else {}
        if metrics:
            return entry.round, metrics
    return 0, {}


def _final_global(run: RunFiles) -> tuple[int, Metrics, Metrics]:
    """The last round with global metrics, those metrics, and the hospitals' weighted mean of that round."""
    for entry in reversed(run.rounds):
        if entry.global_:
            return entry.round, entry.global_, entry.federated
    return 0, {}, {}


def _has_dp(rounds: list[RoundEntry]) -> bool:
    return any(entry.privacy for entry in rounds)


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return "nan" if math.isnan(number) else f"{number:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    escape = [[cell.replace("|", "\\|") for cell in row] for row in [head, *rows]]
    lines = ["| " + " | ".join(escape[0]) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in escape[1:]]


# ----------------------------------------------------------------------------------------------------------- plots


def _figure(panels: int, *, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` plots: one row up to three, else two per row."""
    # A Figure of its own (no pyplot): no global state, no display, Agg canvas by default.
    from matplotlib.figure import Figure

    columns = panels if panels <= 3 else 2
    rows = -(-panels // columns)
    figure = Figure(figsize=(max(5.0, 4.2 * columns), height * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for unused in axes[panels:]:
        unused.remove()
    return figure, axes[:panels]


def _finish(axes: Axes, title: str, ylabel: str, *, legend: bool = True) -> None:
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend and axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def plot_global(run: RunFiles, path: Path) -> Path | None:
    """Global metrics per round: scores in one panel, losses in another (None if no round has any).

    Solid lines are the global adapter on the global test set; dotted lines the
    hospitals' example-weighted mean on their local tests, when both were recorded.
    A generative model's perplexity has a panel of its own, on a log scale.
    Round 0 is the starting adapter, where the summary has it.

    Parameters
    ----------
    run : RunFiles
        The run, from :func:`read_run`.
    path : Path
        The PNG file to write.

    Returns
    -------
    Path or None
        ``path``, or None when the run recorded nothing to draw (no file is written then).
    """
    initial = _summary(run).initial_global or {}
    rounds = ([RoundEntry(round=0, global_=initial)] if initial else []) + run.rounds
    names = _ordered({k for entry in rounds for k in entry.global_})
    if not names:
        return None
    # Perplexity (exp of a loss: thousands before training) gets a log axis of its own, off the [0, 1] scores.
    groups = [("scores", [n for n in names if "loss" not in n and n != "perplexity"]),
              ("perplexity", [n for n in names if n == "perplexity"]), ("loss", [n for n in names if "loss" in n])]
    groups = [(label, group) for label, group in groups if group]
    figure, panels = _figure(len(groups))
    differs = any(entry.federated and entry.federated != entry.global_ for entry in run.rounds)
    for axes, (label, group) in zip(panels, groups, strict=True):
        for index, name in enumerate(group):
            color = f"C{index}"
            axes.plot(*_series(rounds, lambda e, n=name: e.global_.get(n)), marker="o", color=color,  # type: ignore[misc]
                      label=f"{name} (global test)" if differs else name)
            if differs:
                axes.plot(*_series(run.rounds, lambda e, n=name: e.federated.get(n)), linestyle=":",  # type: ignore[misc]
                          color=color, label=f"{name} (hospitals' mean)")
        if label == "perplexity":
            axes.set_yscale("log")
        _finish(axes, "Global adapter" if label == "scores" else f"Global {label}", label)
    return _save(figure, path)


def plot_hospitals(run: RunFiles, path: Path) -> Path | None:
    """Each hospital's local-test metrics and training loss per round, one panel per metric.

    Parameters
    ----------
    run : RunFiles
        The run, from :func:`read_run`.
    path : Path
        The PNG file to write.

    Returns
    -------
    Path or None
        ``path``, or None when the run recorded nothing to draw (no file is written then).
    """
    names = run.hospitals()
    evaluated = {k for e in run.rounds for h in e.per_hospital.values() for k in h.evaluate}
    metrics = [("evaluate", m) for m in _ordered(evaluated) if m in ("accuracy", "macro-f1", "perplexity", "loss")]
    if not metrics:
        metrics = [("evaluate", m) for m in _ordered(evaluated)[:3]]
    if any("train-loss" in h.train for e in run.rounds for h in e.per_hospital.values()):
        metrics.append(("train", "train-loss"))
    if not names or not metrics:
        return None
    figure, panels = _figure(len(metrics))
    for axes, (kind, metric) in zip(panels, metrics, strict=True):
        for name in names:
            xs, ys = _series(run.rounds, lambda e, n=name, k=kind, m=metric: _kind(e.hospital(n), k).get(m))  # type: ignore[misc]
            if xs:
                axes.plot(xs, ys, marker="o", color=f"C{names.index(name) % 10}", label=name)
        _finish(axes, f"{metric} ({'local test' if kind == 'evaluate' else 'training'})", metric, legend=False)
    # One legend for all panels, under them: a hospital keeps its colour everywhere.
    handles = {label: handle for axes in panels for handle, label in zip(*axes.get_legend_handles_labels(), strict=True)}
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5),
                  fontsize=8)
    return _save(figure, path)


def _unit(largest: float) -> tuple[str, float]:
    return next((unit, size) for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0)) if largest >= size)


def _bars(axes: Axes, positions: list[int], down: list[int], up: list[int]) -> str:
    """Down and up side by side at each position, in a unit that fits; returns the unit."""
    unit, size = _unit(max([1, *down, *up]))
    axes.bar([p - 0.2 for p in positions], [v / size for v in down], 0.4, label="down (to hospitals)")
    axes.bar([p + 0.2 for p in positions], [v / size for v in up], 0.4, label="up (from hospitals)")
    return unit


def plot_bytes(run: RunFiles, path: Path) -> Path:
    """Bytes sent to the hospitals (down) and by them (up): per round, and per hospital over the run.

    Parameters
    ----------
    run : RunFiles
        The run, from :func:`read_run`.
    path : Path
        The PNG file to write.

    Returns
    -------
    Path
        ``path``.
    """
    figure, (per_round, per_hospital) = _figure(2)
    unit = _bars(per_round, [e.round for e in run.rounds], [e.bytes_down for e in run.rounds],
                 [e.bytes_up for e in run.rounds])
    _finish(per_round, "Per round, all hospitals", unit)
    names = run.hospitals()
    down = [sum(e.hospital(n).bytes_down for e in run.rounds) for n in names]
    up = [sum(e.hospital(n).bytes_up for e in run.rounds) for n in names]
    unit = _bars(per_hospital, list(range(len(names))), down, up)
    tilt = len(names) > 4
    per_hospital.set_xticks(range(len(names)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                            fontsize=8)
    per_hospital.set_title("Per hospital, whole run", fontsize=10)
    per_hospital.set_ylabel(unit)
    per_hospital.grid(alpha=0.3, axis="y")
    per_hospital.legend(fontsize=7)
    compression = _summary(run).compression or run.setting("compression.method")
    if compression:
        figure.suptitle(f"Communication (compression: {compression})", fontsize=11)
    return _save(figure, path)


def _kind(hospital: HospitalEntry, kind: str) -> Metrics:
    return hospital.train if kind == "train" else hospital.evaluate


def _plot_epsilon(run: RunFiles, path: Path) -> Path | None:
    """:func:`fedfm.privacy.report.plot_epsilon` with each hospital's budget; None for a run without DP."""
    budgets = {name: target for name, ledger in _ledgers(run).items()
               if (target := _number(ledger.get(keys.DP_TARGET_EPSILON))) is not None}
    return plot_epsilon(run.rounds, path, hospitals=run.hospitals(), budgets=budgets,
                        client_label=str(run.setting("privacy.client-dp", "client-level")), skip_empty=True)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------- report


def _status(run: RunFiles) -> str:
    done, planned = len(run.rounds), run.setting("federation.num-rounds")
    of = f" of {planned}" if planned else ""
    last = run.rounds[-1].round
    summary = _summary(run)
    if run.finished:
        stopped = summary.stopped
        text = f"stopped early after round {last}: {stopped}" if stopped else f"finished: {done}{of} rounds"
    else:
        text = (f"incomplete: {done}{of} rounds recorded, no summary after round {last} "
                f"(still running, or killed: `fedfm run --resume {run.path}` continues it)")
    resumed = summary.resumed_from if run.finished else None
    return text + (f"; resumed after round {resumed}" if resumed is not None else "")


def _settings(run: RunFiles) -> list[str]:
    summary = _summary(run)
    rows = [
        ("model", summary.model or run.setting("model.name")),
        ("task", run.setting("model.task")),
        ("dataset", summary.dataset or run.setting("data.dataset")),
        ("partitioner", run.setting("data.partitioner")),
        ("strategy", summary.strategy or run.setting("federation.strategy")),
        ("rounds", f"{len(run.rounds)} recorded of {run.setting('federation.num-rounds', '?')} planned"),
        ("local training", _local_training(run)),
        ("LoRA", f"r {run.setting('lora.r')}, alpha {run.setting('lora.alpha')}" if run.setting("lora.r") else None),
        ("privacy", _privacy_setting(run)),
        ("compression", summary.compression or run.setting("compression.method")),
        ("adapter parameters", f"{summary.adapter_parameters:,} of {summary.base_parameters:,} in the base"
         if summary.adapter_parameters is not None and summary.base_parameters is not None else None),
        ("wall time", f"{summary.wall_seconds:.1f} s" if summary.wall_seconds is not None else None),
    ]
    return _table(["setting", "value"], [[name, str(value)] for name, value in rows if value not in (None, "")])


def _local_training(run: RunFiles) -> str | None:
    steps, epochs = run.setting("train.local-steps"), run.setting("train.local-epochs")
    if steps is None and epochs is None:
        return None
    amount = f"{steps} steps" if steps else f"{epochs} epoch(s)"
    batch, rate = run.setting("train.batch-size"), run.setting("train.learning-rate")
    return f"{amount} per round, batch {batch}, learning rate {rate}"


def _privacy_setting(run: RunFiles) -> str | None:
    mode, client = run.setting("privacy.mode"), run.setting("privacy.client-dp")
    if mode is None:
        return None
    parts = [f"mode {mode}"] + ([f"target ε {run.setting('privacy.target-epsilon')}"] if mode != "none" else [])
    if client not in (None, "none"):
        parts.append(f"client-level DP {client}")
    if run.setting("privacy.secure-aggregation"):
        parts.append("secure aggregation")
    return ", ".join(parts)


def _hospital_sizes(run: RunFiles) -> list[str]:
    sizes = _summary(run).hospitals
    rows = []
    for name in run.hospitals():
        known = sizes.get(name)
        train = known.train_rows if known is not None else _latest(run, name, "train")[1].get("num-examples")
        test = known.test_rows if known is not None else _latest(run, name, "evaluate")[1].get("num-examples")
        rows.append([name, "-" if train is None else str(int(train)), "-" if test is None else str(int(test))])
    return _table(["hospital", "train rows", "test rows"], rows)


def _final_metrics(run: RunFiles) -> list[str]:
    at, final, federated = _final_global(run)
    hospitals = {name: _latest(run, name, "evaluate") for name in run.hospitals()}
    summary = _summary(run)
    initial = summary.initial_global or {}
    names = _ordered(set(final) | set(federated) | {k for _, m in hospitals.values() for k in m})
    last = run.rounds[-1].round
    rows: list[list[str]] = []
    if initial:
        rows.append(["global test, before training (round 0)", *(_fmt(initial.get(n)) for n in names), "-"])
    if final:
        rows.append([f"global test (round {at})", *(_fmt(final.get(n)) for n in names),
                     str(summary.global_test_rows if summary.global_test_rows is not None else "-")])
    if federated and federated != final:
        rows.append([f"hospitals' weighted mean (round {at})", *(_fmt(federated.get(n)) for n in names), "-"])
    for name, (server_round, metrics) in hospitals.items():
        label = name if server_round == last else f"{name} (round {server_round})" if server_round else f"{name} (none)"
        examples = _number(metrics.get("num-examples"))
        rows.append([label, *(_fmt(metrics.get(n)) for n in names), "-" if examples is None else str(int(examples))])
    return _table(["", *names, "examples"], rows)


def _ledgers(run: RunFiles) -> dict[str, dict[str, Any]]:
    """Per hospital under DP-SGD: the ledger of the last round it reported, and the rounds it refused."""
    ledgers: dict[str, dict[str, Any]] = {}
    for entry in run.rounds:
        for name, replies in entry.per_hospital.items():
            train = replies.train
            if keys.DP_EPSILON not in train:
                continue
            ledger = ledgers.setdefault(name, {"refused": []})
            ledger.update(train)
            if train.get(keys.DP_REFUSED):
                ledger["refused"].append(entry.round)
    return ledgers


def _privacy_tables(run: RunFiles) -> list[str]:
    ledgers = _ledgers(run)
    lines: list[str] = []
    if ledgers:
        order = run.hospitals()
        rows = [
            [
                name, _fmt(ledger[keys.DP_EPSILON], 3), _fmt(ledger.get(keys.DP_TARGET_EPSILON), 2),
                f"{ledger[keys.DP_DELTA]:.2g}" if keys.DP_DELTA in ledger else "-",
                _fmt(ledger.get(keys.DP_NOISE_MULTIPLIER), 3), _fmt(ledger.get(keys.DP_SAMPLE_RATE), 4),
                _fmt(ledger.get(keys.DP_STEPS), 0), ", ".join(map(str, ledger["refused"])) or "-",
            ]
            for name, ledger in sorted(ledgers.items(), key=lambda item: order.index(item[0]))
        ]
        head = ["hospital", "ε", "target ε", "δ", "noise multiplier", "sample rate", "steps", "refused rounds"]
        lines += ["Sample-level DP-SGD: ε each hospital had spent by the last round it reported.", "",
                  *_table(head, rows), ""]
    levels = [e.privacy.client_level for e in run.rounds if e.privacy.client_level is not None]
    if levels:
        level = levels[-1]
        text = (
            f"Client-level DP ({run.setting('privacy.client-dp', 'on')}): ε {_fmt(level.epsilon, 3)} at "
            f"δ {level.delta:.2g} after {level.releases} release(s), noise "
            f"multiplier {_fmt(level.noise_multiplier, 3)}."
        )
        lines += [text, ""]
    return lines


def _communication(run: RunFiles) -> list[str]:
    rows = []
    for name in run.hospitals():
        up = sum(e.hospital(name).bytes_up for e in run.rounds)
        down = sum(e.hospital(name).bytes_down for e in run.rounds)
        rows.append([name, f"{up:,} ({_bytes(up)})", f"{down:,} ({_bytes(down)})"])
    up = sum(e.bytes_up for e in run.rounds)
    down = sum(e.bytes_down for e in run.rounds)
    rows.append(["**total**", f"**{up:,}** ({_bytes(up)})", f"**{down:,}** ({_bytes(down)})"])
    return _table(["hospital", "bytes up", "bytes down"], rows)


def _round_log(run: RunFiles) -> list[str]:
    rows = []
    for entry in run.rounds:
        replied = sum(1 for v in entry.per_hospital.values() if v.train)
        rows.append([
            str(entry.round), str(replied), "yes" if entry.aggregated else "no",
            str(entry.retries), _fmt(entry.seconds, 1),
            "; ".join(f"{k}: {v}" for k, v in entry.left_out.items())[:200] or "-",
        ])
    return _table(["round", "hospitals replied", "aggregated", "retries", "seconds", "left out"], rows)


def _markdown(run: RunFiles, plots: Mapping[str, Path | None]) -> str:
    def image(key: str, alt: str) -> list[str]:
        plot = plots.get(key)
        return [f"![{alt}]({plot.name})", ""] if plot is not None else []

    lines = [f"# fedfm run report: {run.path.resolve().name}", "",
             f"Run directory `{run.path}`; {_status(run)}.", "",
             "## Settings", "", *_settings(run), "",
             "## Hospitals", "", *_hospital_sizes(run), "",
             "## Final metrics", "", *_final_metrics(run), "",
             *image("global", "Global metrics per round"), *image("hospitals", "Per-hospital metrics per round")]
    if _has_dp(run.rounds):
        lines += ["## Privacy", "", *_privacy_tables(run), *image("epsilon", "ε per round")]
    lines += ["## Communication", "", *_communication(run), "", *image("bytes", "Bytes up and down"),
              "## Rounds", "", *_round_log(run), ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a run's plots and ``report.md``.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by ``fedfm run`` (finished, stopped, resumed or still running).
    out : str or Path, optional
        Where the report goes; default ``RUN_DIR/report``.

    Returns
    -------
    Path
        The ``report.md`` file; the PNG files it shows are beside it.

    Raises
    ------
    ReportError
        The run directory is missing, unreadable, or holds no completed round.
    """
    run = read_run(run_dir)
    folder = Path(out) if out is not None else run.path / "report"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plots: dict[str, Path | None] = {
            "global": plot_global(run, folder / "global.png"),
            "hospitals": plot_hospitals(run, folder / "hospitals.png"),
            "epsilon": _plot_epsilon(run, folder / "epsilon.png"),
            "bytes": plot_bytes(run, folder / "bytes.png"),
        }
        for name, plot in plots.items():
            if plot is None:
                (folder / f"{name}.png").unlink(missing_ok=True)  # left from an earlier report of this run
        report = folder / "report.md"
        report.write_text(_markdown(run, plots), encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot write the report into {folder}: {err}") from err
    return report
