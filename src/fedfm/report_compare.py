"""``fedfm report RUN_DIR RUN_DIR ... --out DIR``: several runs side by side, as after a sweep.

Each run is read through :func:`fedfm.rundir.read_run`, like a single run's
report (:func:`fedfm.report.write_report`), so finished, stopped, resumed and
running runs all compare. Writes into ``DIR``:

- ``comparison.md``: one row per run (its name, the settings of ``config.toml``
  whose values differ between the runs, rounds done, final and best global
  metrics with their rounds, wall time, the largest ε), which run lacks which
  metric, and the plots;
- ``compare-<metric>.png``: one per global metric any run recorded, one line per run;
- ``compare-epsilon.png``: ε per round, one line per run with differential privacy (only when one has it);
- ``compare-bytes.png``: bytes up and down per round, one line per run.

Every run directory and the output folder are checked before anything is drawn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfm.errors import ReportError
from fedfm.report import _figure, _finish, _fmt, _ordered, _save, _series, _status, _summary, _table, unwritable
from fedfm.rundir import RoundEntry, RunFiles, read_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "COMPARISON", "Comparison", "Panel", "Plot", "compare_runs", "final_and_best", "plot_comparison", "read_comparison",
]

#: The comparison's Markdown file; its plots are the ``compare-*.png`` files beside it.
COMPARISON = "comparison.md"
_PREFIX = "compare-"
#: Rounds and values of one run in one panel.
Series = tuple[list[int], list[float]]


@dataclass(frozen=True)
class Panel:
    """One panel of a comparison plot: a line per run that has the quantity.

    Attributes
    ----------
    title, ylabel : str
        What the panel shows.
    lines : dict of str to (list of int, list of float)
        Run name to its rounds and values, in the order of the runs; a run without the quantity has no entry.
    log : bool
        A log y-axis (perplexity).
    """

    title: str
    ylabel: str
    lines: dict[str, Series]
    log: bool = False


@dataclass(frozen=True)
class Plot:
    """One PNG of a comparison: its file name and its panels."""

    file: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Comparison:
    """Several runs read for comparison, with what :func:`compare_runs` writes of them.

    Attributes
    ----------
    runs : list of RunFiles
        The runs, in the order given.
    names : list of str
        Each run's name: its directory's name, with parent folders added where two names are the same.
    metrics : list of str
        The global metrics any run recorded, headline metrics first.
    differing : dict of str to list
        Each setting of ``config.toml`` (dotted name) whose value is not the same in every run: its value
        per run (None where a run's ``config.toml`` lacks it).
    plots : list of Plot
        The plots, in the order the Markdown shows them.
    """

    runs: list[RunFiles]
    names: list[str]
    metrics: list[str]
    differing: dict[str, list[Any]]
    plots: list[Plot]

    def lacking(self) -> dict[str, list[str]]:
        """Run name to the global metrics of the comparison it never recorded (runs lacking none left out)."""
        lacking = {}
        for name, run in zip(self.names, self.runs, strict=True):
            missing = [m for m in self.metrics if m not in _global_names(run)]
            if missing:
                lacking[name] = missing
        return lacking


# --------------------------------------------------------------------------------------------------------- reading


def _names(paths: Sequence[Path]) -> list[str]:
    """Directory names, with as many parent folders as it takes to tell equal names apart."""
    parts = [p.parts for p in paths]
    names = [p[-1] if p else str(path) for p, path in zip(parts, paths, strict=True)]
    depth = 1
    while len(set(names)) < len(names) and depth < max(len(p) for p in parts):
        depth += 1
        names = ["/".join(p[-depth:]) if names.count(n) > 1 else n for p, n in zip(parts, names, strict=True)]
    return names


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differing(runs: Sequence[RunFiles]) -> dict[str, list[Any]]:
    """Settings whose values are not all the same, in ``config.toml``'s order."""
    flats = [_flat(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    values = {key: [flat.get(key) for flat in flats] for key in keys}
    return {key: row for key, row in values.items() if any(v != row[0] for v in row[1:])}


def _global_names(run: RunFiles) -> set[str]:
    return set(_ordered({name for entry in run.rounds for name in entry.global_}))


def _with_initial(run: RunFiles) -> list[RoundEntry]:
    """The rounds, after round 0 (the starting adapter) where the summary has it."""
    initial = _summary(run).initial_global or {}
    return ([RoundEntry(round=0, global_=initial)] if initial else []) + run.rounds


def _lines(runs: Sequence[RunFiles], names: Sequence[str], rounds: Callable[[RunFiles], Iterable[RoundEntry]],
           value: Callable[[RoundEntry], Any]) -> dict[str, Series]:
    lines = {}
    for name, run in zip(names, runs, strict=True):
        xs, ys = _series(rounds(run), value)
        if xs:
            lines[name] = (xs, ys)
    return lines


def _sample_epsilon(entry: RoundEntry) -> float | None:
    """The largest ε any hospital had spent after the round (DP-SGD)."""
    spent = entry.privacy.sample_level_epsilon.values()
    return max(spent) if spent else None


def _client_epsilon(entry: RoundEntry) -> float | None:
    level = entry.privacy.client_level
    return level.epsilon if level is not None else None


_EPSILONS: tuple[tuple[str, Callable[[RoundEntry], float | None]], ...] = (
    ("sample-level", _sample_epsilon), ("client-level", _client_epsilon),
)


def _plots(runs: Sequence[RunFiles], names: Sequence[str], metrics: Sequence[str]) -> list[Plot]:
    plots = []
    for metric in metrics:
        lines = _lines(runs, names, _with_initial, lambda e, m=metric: e.global_.get(m))  # type: ignore[misc]
        panel = Panel(f"Global {metric} (global test)", metric, lines, log=metric == "perplexity")
        plots.append(Plot(f"{_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]+', '-', metric)}.png", (panel,)))
    epsilon = tuple(
        Panel(f"{level.capitalize()} ε" + (" (largest of the hospitals)" if level == "sample-level" else ""), "ε", lines)
        for level, spent in _EPSILONS
        if (lines := _lines(runs, names, lambda run: run.rounds, spent))
    )
    if epsilon:
        plots.append(Plot(f"{_PREFIX}epsilon.png", epsilon))
    plots.append(Plot(f"{_PREFIX}bytes.png", (
        Panel("Bytes up per round (from the hospitals)", "bytes", _lines(runs, names, lambda run: run.rounds,
                                                                          lambda e: e.bytes_up)),
        Panel("Bytes down per round (to the hospitals)", "bytes", _lines(runs, names, lambda run: run.rounds,
                                                                          lambda e: e.bytes_down)),
    )))
    return plots


def read_comparison(run_dirs: Sequence[str | Path]) -> Comparison:
    """Read two or more run directories for comparison.

    Parameters
    ----------
    run_dirs : sequence of str or Path
        Run directories written by ``fedfm run``, each once.

    Returns
    -------
    Comparison
        The runs, their names, the settings that differ and the plots' lines.

    Raises
    ------
    ReportError
        Fewer than two directories, one given twice, or one that :func:`fedfm.rundir.read_run` refuses.
    """
    paths = [Path(d) for d in run_dirs]
    if len(paths) < 2:
        raise ReportError(f"a comparison needs two or more run directories, got {len(paths)}; "
                          "`fedfm report RUN_DIR` (write_report) reports a single run")
    seen: dict[Path, str] = {}
    for given in map(str, run_dirs):  # as the user spelled them: Path drops a `./`
        resolved = Path(given).resolve()
        if resolved in seen:
            both = f" ({seen[resolved]} and {given})" if seen[resolved] != given else ""
            raise ReportError(f"run directory {given} is given twice{both}: name each run once")
        seen[resolved] = given
    runs = [read_run(path) for path in paths]
    names = _names([path.resolve() for path in paths])
    metrics = _ordered(set().union(*(_global_names(run) for run in runs)))
    return Comparison(runs, names, metrics, _differing(runs), _plots(runs, names, metrics))


# ----------------------------------------------------------------------------------------------------------- plots


def plot_comparison(plot: Plot, path: Path, names: Sequence[str]) -> Figure:
    """Draw one comparison plot: a panel per quantity, a line per run, each run in the same colour everywhere.

    Parameters
    ----------
    plot : Plot
        From :attr:`Comparison.plots`.
    path : Path
        The PNG file to write.
    names : sequence of str
        Every run's name (:attr:`Comparison.names`): a run's colour is its place in it.

    Returns
    -------
    Figure
        The figure written (its axes hold one line per run that has the quantity).
    """
    figure, axes = _figure(len(plot.panels))
    for panel_axes, panel in zip(axes, plot.panels, strict=True):
        for name, (xs, ys) in panel.lines.items():
            panel_axes.plot(xs, ys, marker="o", color=f"C{names.index(name) % 10}", label=name)
        if panel.log:
            panel_axes.set_yscale("log")
        _finish(panel_axes, panel.title, panel.ylabel)
    _save(figure, path)
    return figure


# ---------------------------------------------------------------------------------------------------------- report


def _text(value: Any) -> str:
    """A setting as ``config.toml`` spells it (strings bare); ``-`` where a run lacks it."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric or metric == "perplexity"


def final_and_best(run: RunFiles, metric: str) -> tuple[tuple[int, float] | None, tuple[int, float] | None]:
    """A run's last and best global ``metric`` with their rounds (best: lowest for a loss or perplexity).

    Parameters
    ----------
    run : RunFiles
        The run, from :func:`fedfm.rundir.read_run`.
    metric : str
        A global metric name, e.g. ``"accuracy"``.

    Returns
    -------
    tuple
        ``(round, value)`` of the last round that recorded it and of the best one; None for each when none did.
    """
    rounds, values = _series(run.rounds, lambda e: e.global_.get(metric))
    if not rounds:
        return None, None
    pick = min if _lower_is_better(metric) else max
    best = pick(range(len(values)), key=lambda i: values[i])  # the first of equal values
    return (rounds[-1], values[-1]), (rounds[best], values[best])


def _at(found: tuple[int, float] | None) -> str:
    return "-" if found is None else f"{_fmt(found[1])} (round {found[0]})"


def _max_epsilon(run: RunFiles) -> str:
    parts = []
    for level, spent in _EPSILONS:
        values = _series(run.rounds, spent)[1]
        if values:
            parts.append(f"{max(values):.3f} ({level})")
    return "; ".join(parts) or "-"


def _rounds_done(run: RunFiles) -> str:
    planned = run.setting("federation.num-rounds")
    text = f"{len(run.rounds)}" + (f" of {planned}" if planned else "")
    return text if run.finished else f"{text}, incomplete"


def _runs_table(comparison: Comparison) -> list[str]:
    dp = any(entry.privacy for run in comparison.runs for entry in run.rounds)
    head = ["run", *comparison.differing, "rounds",
            *(f"{kind} {metric}" for metric in comparison.metrics for kind in ("final", "best")),
            "wall time", *(["max ε"] if dp else [])]
    rows = []
    for index, (name, run) in enumerate(zip(comparison.names, comparison.runs, strict=True)):
        wall = _summary(run).wall_seconds
        scores = [_at(found) for metric in comparison.metrics for found in final_and_best(run, metric)]
        rows.append([name, *(_text(values[index]) for values in comparison.differing.values()), _rounds_done(run),
                     *scores, "-" if wall is None else f"{wall:.1f} s", *([_max_epsilon(run)] if dp else [])])
    return _table(head, rows)


def _markdown(comparison: Comparison, written: Mapping[str, Path]) -> str:
    runs = zip(comparison.names, comparison.runs, strict=True)
    lines = [f"# fedfm comparison of {len(comparison.runs)} runs", "",
             *(f"- **{name}**: `{run.path}`; {_status(run)}." for name, run in runs), "",
             "## Runs", ""]
    if comparison.differing:
        lines += [(f"Settings of `config.toml` that differ between the runs: {', '.join(comparison.differing)} "
                   "(all others are the same)."), ""]
    else:
        lines += ["The runs' `config.toml` files hold the same settings.", ""]
    lines += [*_runs_table(comparison), "",
              ("Final: the last round that recorded the global metric; best: its highest value "
               "(lowest for a loss or perplexity), on the global test set."), ""]
    lacking = comparison.lacking()
    if lacking:
        lines += ["Metrics some runs lack (their plots have no line for them):", "",
                  *(f"- {name} has no {', '.join(metrics)}" for name, metrics in lacking.items()), ""]
    lines += ["## Plots", "", "One line per run; round 0 is the starting adapter, where the run recorded it.", ""]
    lines += [f"![{plot.file.removeprefix(_PREFIX).removesuffix('.png')}]({written[plot.file].name})\n"
              for plot in comparison.plots]
    return "\n".join(lines)


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write a comparison of several runs: ``comparison.md`` and its ``compare-*.png`` plots.

    Parameters
    ----------
    run_dirs : sequence of str or Path
        Two or more run directories written by ``fedfm run``, each once.
    out : str or Path
        The folder for the comparison (created if needed); ``compare-*.png`` files of an
        earlier comparison there that this one does not draw are removed.

    Returns
    -------
    Path
        The ``comparison.md`` file; the plots it shows are beside it.

    Raises
    ------
    ReportError
        Fewer than two directories, one given twice or unreadable, or ``out`` cannot be written;
        all checked before anything is drawn.
    """
    comparison = read_comparison(run_dirs)
    folder = Path(out)
    problem = unwritable(folder / COMPARISON)
    if problem is not None:
        raise ReportError(f"cannot write the comparison into {folder}: {problem}; choose another folder")
    try:
        written = {plot.file: folder / plot.file for plot in comparison.plots}
        for plot in comparison.plots:
            plot_comparison(plot, written[plot.file], comparison.names)
        for stale in folder.glob(f"{_PREFIX}*.png"):
            if stale.name not in written:
                stale.unlink()
        report = folder / COMPARISON
        report.write_text(_markdown(comparison, written), encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot write the comparison into {folder}: {err}") from err
    return report
