"""``fedfm report RUN_DIR``: plots and a one-page summary of a run, read from its run directory.

Reads only what a run writes (``config.toml``, ``metrics.jsonl``,
``summary.json``), so it works on a finished run, on one that stopped early or
was killed (``summary.json`` missing or older than the metrics), on a resumed
run, and on a run still going. Writes PNG plots (matplotlib, Agg backend) and
``report.md`` into ``RUN_DIR/report/`` unless told otherwise:

- ``global.png``: the global adapter's metrics per round (global test set);
- ``hospitals.png``: each hospital's local-test metrics and training loss per round;
- ``epsilon.png``: ε spent per round and hospital, and the client-level ε (DP runs only);
- ``bytes.png``: bytes up and down per round, and per hospital over the run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from fedfm import keys
from fedfm.privacy.report import ReportError

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
_HEADLINE = ("accuracy", "macro-f1", "weighted-f1", "loss")
#: Bookkeeping entries of a hospital's metrics, not scores.
_NOT_SCORES = frozenset({"num-examples", "hospital-index"})


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds, as read by :func:`read_run`.

    Attributes
    ----------
    path : Path
        The run directory.
    rounds : list of dict
        The ``metrics.jsonl`` lines, one per completed round, in round order.
    summary : dict
        ``summary.json``; empty while the run goes on or after it was killed.
    config : dict
        ``config.toml`` as plain TOML tables (empty if the file is missing).
    """

    path: Path
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def finished(self) -> bool:
        """True when ``summary.json`` was written after the last recorded round."""
        return bool(self.summary) and self.summary.get("rounds") == len(self.rounds)

    def setting(self, key: str, default: Any = None) -> Any:
        """One setting of ``config.toml`` by its dotted name, e.g. ``"federation.num-rounds"``."""
        section, _, name = key.partition(".")
        return self.config.get(section, {}).get(name, default)


#: What a user can do about a run file that cannot be read (fedfm writes each one whole, atomically).
_RESTORE = "it was changed or damaged after the run wrote it; restore it from a copy of the run directory"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} cannot be read ({err}): {_RESTORE}, or move it away to report without it") from err
    if not isinstance(value, dict):
        raise ReportError(f"{path} does not hold a JSON object: {_RESTORE}, or move it away to report without it")
    return value


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


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory for a report.

    Parameters
    ----------
    run_dir : str or Path
        A directory written by ``fedfm run`` (finished, stopped, resumed or still running).

    Returns
    -------
    RunFiles
        The recorded rounds, the summary (empty if none yet) and the configuration.

    Raises
    ------
    ReportError
        The directory is missing, holds no completed round, or one of its files
        cannot be read (the message names the file).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist" if not path.exists() else f"{path} is not a directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        if (path / "config.toml").is_file():
            raise ReportError(f"{path} has no completed round yet: {metrics} is missing")
        raise ReportError(f"{path} is not a fedfm run directory: it has no metrics.jsonl (nor config.toml)")
    try:
        text = metrics.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{metrics} cannot be read ({err}): {_RESTORE}") from err
    by_round: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            server_round = int(entry["round"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ReportError(f"{metrics} line {number} is not a round record ({err}): {_RESTORE}") from err
        by_round[server_round] = entry  # a round written twice (a resumed run): the later line holds
    if not by_round:
        raise ReportError(f"{path} has no completed round yet: {metrics} is empty")
    summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else {}
    config: dict[str, Any] = {}
    if (path / "config.toml").is_file():
        try:
            config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ReportError(f"{path / 'config.toml'} cannot be read ({err}): {_RESTORE}") from err
    return RunFiles(path, [by_round[k] for k in sorted(by_round)], summary, config)


# ---------------------------------------------------------------------------------------------- reading the rounds


def _ordered(names: Iterable[str]) -> list[str]:
    names = set(names) - _NOT_SCORES
    return [n for n in _HEADLINE if n in names] + sorted(names - set(_HEADLINE))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _series(rounds: list[dict[str, Any]], *keys: str) -> tuple[list[int], list[float]]:
    """Rounds and the value at ``entry[keys[0]][keys[1]]...``, where it is a number (other rounds are skipped)."""
    xs, ys = [], []
    for entry in rounds:
        value: Any = entry
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        number = _number(value)
        if number is not None:
            xs.append(int(entry["round"]))
            ys.append(number)
    return xs, ys


def _hospitals(run: RunFiles) -> list[str]:
    names = list(run.summary.get("hospitals", {}))
    for entry in run.rounds:
        names += [n for n in entry.get("per_hospital", {}) if n not in names]
    return names


def _latest(run: RunFiles, name: str, kind: str) -> tuple[int, dict[str, Any]]:
    """A hospital's latest non-empty ``train`` or ``evaluate`` metrics, with their round (0, {} if none)."""
    for entry in reversed(run.rounds):
        metrics = entry.get("per_hospital", {}).get(name, {}).get(kind)
        if metrics:
            return int(entry["round"]), metrics
    return 0, {}


def _final_global(run: RunFiles) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """The last round with global metrics, those metrics, and the hospitals' weighted mean of that round."""
    for entry in reversed(run.rounds):
        if entry.get("global"):
            return int(entry["round"]), entry["global"], entry.get("federated") or {}
    return 0, {}, {}


def _has_dp(rounds: list[dict[str, Any]]) -> bool:
    return any(
        entry.get("privacy", {}).get("sample_level_epsilon") or entry.get("privacy", {}).get("client_level")
        for entry in rounds
    )


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
    initial = run.summary.get("initial", {}).get("global") or {}
    rounds = ([{"round": 0, "global": initial}] if initial else []) + run.rounds
    names = _ordered({k for entry in rounds for k in (entry.get("global") or {})})
    if not names:
        return None
    groups = [("scores", [n for n in names if "loss" not in n]), ("loss", [n for n in names if "loss" in n])]
    groups = [(label, group) for label, group in groups if group]
    figure, panels = _figure(len(groups))
    differs = any(entry.get("federated") and entry.get("federated") != entry.get("global") for entry in run.rounds)
    for axes, (label, group) in zip(panels, groups, strict=True):
        for index, name in enumerate(group):
            color = f"C{index}"
            axes.plot(*_series(rounds, "global", name), marker="o", color=color,
                      label=f"{name} (global test)" if differs else name)
            if differs:
                axes.plot(*_series(run.rounds, "federated", name), linestyle=":",
                          color=color, label=f"{name} (hospitals' mean)")
        _finish(axes, "Global adapter" if label == "scores" else "Global loss", label)
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
    names = _hospitals(run)
    evaluated = {k for e in run.rounds for h in e.get("per_hospital", {}).values() for k in h.get("evaluate", {})}
    metrics = [("evaluate", m) for m in _ordered(evaluated) if m in ("accuracy", "macro-f1", "loss")]
    if not metrics:
        metrics = [("evaluate", m) for m in _ordered(evaluated)[:3]]
    if any("train-loss" in h.get("train", {}) for e in run.rounds for h in e.get("per_hospital", {}).values()):
        metrics.append(("train", "train-loss"))
    if not names or not metrics:
        return None
    figure, panels = _figure(len(metrics))
    for axes, (kind, metric) in zip(panels, metrics, strict=True):
        for name in names:
            xs, ys = _series(run.rounds, "per_hospital", name, kind, metric)
            if xs:
                axes.plot(xs, ys, marker="o", color=f"C{names.index(name) % 10}", label=name)
        _finish(axes, f"{metric} ({'local test' if kind == 'evaluate' else 'training'})", metric, legend=False)
    # One legend for all panels, under them: a hospital keeps its colour everywhere.
    handles = {label: handle for axes in panels for handle, label in zip(*axes.get_legend_handles_labels(), strict=True)}
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5),
                  fontsize=8)
    return _save(figure, path)


def plot_epsilon(run: RunFiles, path: Path) -> Path | None:
    """ε spent per round: each hospital's sample-level ε (DP-SGD), and the client-level ε, one panel each.

    A dashed line marks each hospital's budget (its ``privacy.target-epsilon`` or ``hospital-epsilon``).

    Parameters
    ----------
    run : RunFiles
        The run, from :func:`read_run`.
    path : Path
        The PNG file to write.

    Returns
    -------
    Path or None
        ``path``, or None when the run had no differential privacy (no file is written then).
    """
    spent = {n for e in run.rounds for n in e.get("privacy", {}).get("sample_level_epsilon", {})}
    names = [n for n in _hospitals(run) if n in spent]
    client = _series(run.rounds, "privacy", "client_level", "epsilon")
    panels = int(bool(names)) + int(bool(client[0]))
    if not panels:
        return None
    figure, axes = _figure(panels)
    if names:
        ledgers = _ledgers(run)
        for index, name in enumerate(names):
            color = f"C{index % 10}"
            xs, ys = _series(run.rounds, "privacy", "sample_level_epsilon", name)
            axes[0].plot(xs, ys, marker="o", color=color, label=name)
            target = _number(ledgers.get(name, {}).get(keys.DP_TARGET_EPSILON))
            if target is not None:
                axes[0].axhline(target, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        _finish(axes[0], "Sample-level ε (DP-SGD; dashed: budget)", "ε")
    if client[0]:
        axes[-1].plot(*client, marker="s", color="black", label=str(run.setting("privacy.client-dp", "client-level")))
        _finish(axes[-1], "Client-level ε (whole hospitals)", "ε")
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
    unit = _bars(per_round, [int(e["round"]) for e in run.rounds],
                 [int(e.get("bytes_down", 0)) for e in run.rounds], [int(e.get("bytes_up", 0)) for e in run.rounds])
    _finish(per_round, "Per round, all hospitals", unit)
    names = _hospitals(run)
    down, up = ([sum(int(e.get("per_hospital", {}).get(n, {}).get(kind, 0)) for e in run.rounds) for n in names]
                for kind in ("bytes_down", "bytes_up"))
    unit = _bars(per_hospital, list(range(len(names))), down, up)
    tilt = len(names) > 4
    per_hospital.set_xticks(range(len(names)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                            fontsize=8)
    per_hospital.set_title("Per hospital, whole run", fontsize=10)
    per_hospital.set_ylabel(unit)
    per_hospital.grid(alpha=0.3, axis="y")
    per_hospital.legend(fontsize=7)
    compression = run.summary.get("compression") or run.setting("compression.method")
    if compression:
        figure.suptitle(f"Communication (compression: {compression})", fontsize=11)
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------- report


def _status(run: RunFiles) -> str:
    done, planned = len(run.rounds), run.setting("federation.num-rounds")
    of = f" of {planned}" if planned else ""
    last = run.rounds[-1]["round"]
    if run.finished:
        stopped = run.summary.get("stopped")
        text = f"stopped early after round {last}: {stopped}" if stopped else f"finished: {done}{of} rounds"
    else:
        text = (f"incomplete: {done}{of} rounds recorded, no summary after round {last} "
                f"(still running, or killed: `fedfm run --resume {run.path}` continues it)")
    resumed = run.summary.get("resumed_from") if run.finished else None
    return text + (f"; resumed after round {resumed}" if resumed is not None else "")


def _settings(run: RunFiles) -> list[str]:
    summary = run.summary
    rows = [
        ("model", summary.get("model") or run.setting("model.name")),
        ("task", run.setting("model.task")),
        ("dataset", summary.get("dataset") or run.setting("data.dataset")),
        ("partitioner", run.setting("data.partitioner")),
        ("strategy", summary.get("strategy") or run.setting("federation.strategy")),
        ("rounds", f"{len(run.rounds)} recorded of {run.setting('federation.num-rounds', '?')} planned"),
        ("local training", _local_training(run)),
        ("LoRA", f"r {run.setting('lora.r')}, alpha {run.setting('lora.alpha')}" if run.setting("lora.r") else None),
        ("privacy", _privacy_setting(run)),
        ("compression", summary.get("compression") or run.setting("compression.method")),
        ("adapter parameters", f"{summary['adapter_parameters']:,} of {summary['base_parameters']:,} in the base"
         if "adapter_parameters" in summary and "base_parameters" in summary else None),
        ("wall time", f"{summary['wall_seconds']:.1f} s" if "wall_seconds" in summary else None),
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
    sizes = run.summary.get("hospitals", {})
    rows = []
    for name in _hospitals(run):
        known = sizes.get(name, {})
        train = known.get("train_rows", _latest(run, name, "train")[1].get("num-examples"))
        test = known.get("test_rows", _latest(run, name, "evaluate")[1].get("num-examples"))
        rows.append([name, "-" if train is None else str(int(train)), "-" if test is None else str(int(test))])
    return _table(["hospital", "train rows", "test rows"], rows)


def _final_metrics(run: RunFiles) -> list[str]:
    at, final, federated = _final_global(run)
    hospitals = {name: _latest(run, name, "evaluate") for name in _hospitals(run)}
    initial = run.summary.get("initial", {}).get("global") or {}
    names = _ordered(set(final) | set(federated) | {k for _, m in hospitals.values() for k in m})
    last = int(run.rounds[-1]["round"])
    rows: list[list[str]] = []
    if initial:
        rows.append(["global test, before training (round 0)", *(_fmt(initial.get(n)) for n in names), "-"])
    if final:
        rows.append([f"global test (round {at})", *(_fmt(final.get(n)) for n in names),
                     str(run.summary.get("global_test_rows", "-"))])
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
        for name, replies in entry.get("per_hospital", {}).items():
            train = replies.get("train") or {}
            if keys.DP_EPSILON not in train:
                continue
            ledger = ledgers.setdefault(name, {"refused": []})
            ledger.update(train)
            if train.get(keys.DP_REFUSED):
                ledger["refused"].append(int(entry["round"]))
    return ledgers


def _privacy_tables(run: RunFiles) -> list[str]:
    ledgers = _ledgers(run)
    lines: list[str] = []
    if ledgers:
        rows = [
            [
                name, _fmt(ledger[keys.DP_EPSILON], 3), _fmt(ledger.get(keys.DP_TARGET_EPSILON), 2),
                f"{ledger[keys.DP_DELTA]:.2g}" if keys.DP_DELTA in ledger else "-",
                _fmt(ledger.get(keys.DP_NOISE_MULTIPLIER), 3), _fmt(ledger.get(keys.DP_SAMPLE_RATE), 4),
                _fmt(ledger.get(keys.DP_STEPS), 0), ", ".join(map(str, ledger["refused"])) or "-",
            ]
            for name, ledger in sorted(ledgers.items(), key=lambda item: _hospitals(run).index(item[0]))
        ]
        head = ["hospital", "ε", "target ε", "δ", "noise multiplier", "sample rate", "steps", "refused rounds"]
        lines += ["Sample-level DP-SGD: ε each hospital had spent by the last round it reported.", "",
                  *_table(head, rows), ""]
    levels = [e["privacy"]["client_level"] for e in run.rounds if e.get("privacy", {}).get("client_level")]
    if levels:
        level = levels[-1]
        text = (
            f"Client-level DP ({run.setting('privacy.client-dp', 'on')}): ε {_fmt(level.get('epsilon'), 3)} at "
            f"δ {level.get('delta', float('nan')):.2g} after {level.get('releases', '-')} release(s), noise "
            f"multiplier {_fmt(level.get('noise_multiplier'), 3)}."
        )
        lines += [text, ""]
    return lines


def _communication(run: RunFiles) -> list[str]:
    rows = []
    for name in _hospitals(run):
        up = sum(int(e.get("per_hospital", {}).get(name, {}).get("bytes_up", 0)) for e in run.rounds)
        down = sum(int(e.get("per_hospital", {}).get(name, {}).get("bytes_down", 0)) for e in run.rounds)
        rows.append([name, f"{up:,} ({_bytes(up)})", f"{down:,} ({_bytes(down)})"])
    up = sum(int(e.get("bytes_up", 0)) for e in run.rounds)
    down = sum(int(e.get("bytes_down", 0)) for e in run.rounds)
    rows.append(["**total**", f"**{up:,}** ({_bytes(up)})", f"**{down:,}** ({_bytes(down)})"])
    return _table(["hospital", "bytes up", "bytes down"], rows)


def _round_log(run: RunFiles) -> list[str]:
    rows = []
    for entry in run.rounds:
        replied = sum(1 for v in entry.get("per_hospital", {}).values() if v.get("train"))
        left = entry.get("left_out") or {}
        rows.append([
            str(entry["round"]), str(replied), "yes" if entry.get("aggregated", True) else "no",
            str(entry.get("retries", 0)), _fmt(entry.get("seconds"), 1),
            "; ".join(f"{k}: {v}" for k, v in left.items())[:200] or "-",
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
            "epsilon": plot_epsilon(run, folder / "epsilon.png"),
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
