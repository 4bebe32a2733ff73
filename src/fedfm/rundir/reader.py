"""The one reader of a run directory: its rounds, summary and configuration as typed records.

``fedfm report``, ``fedfm privacy-report``, the model card and
:class:`fedfm.runner.RunResult` read a run through :func:`read_run`. It works
on a finished run, on one that stopped early or was killed (``summary.json``
missing or older than the metrics), on a resumed run and on a run still going.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fedfm.errors import ReportError
from fedfm.rundir.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from fedfm.rundir.records import RoundEntry, RunSummary

__all__ = ["ReportError", "RunFiles", "read_rounds", "read_run"]

#: What a user can do about a run file that cannot be read (fedfm writes each one whole, atomically).
_RESTORE = "it was changed or damaged after the run wrote it; restore it from a copy of the run directory"


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds, as read by :func:`read_run`.

    Attributes
    ----------
    path : Path
        The run directory.
    rounds : list of RoundEntry
        The ``metrics.jsonl`` lines, one per completed round, in round order.
    summary : RunSummary or None
        ``summary.json``; None while the run goes on or after it was killed.
    config : dict
        ``config.toml`` as plain TOML tables (empty if the file is missing).
    """

    path: Path
    rounds: list[RoundEntry]
    summary: RunSummary | None
    config: dict[str, Any]

    @property
    def finished(self) -> bool:
        """True when ``summary.json`` was written after the last recorded round."""
        return self.summary is not None and self.summary.rounds == len(self.rounds)

    def setting(self, key: str, default: Any = None) -> Any:
        """One setting of ``config.toml`` by its dotted name, e.g. ``"federation.num-rounds"``."""
        section, _, name = key.partition(".")
        return self.config.get(section, {}).get(name, default)

    def hospitals(self) -> list[str]:
        """Hospital names: the summary's, then any others the rounds name, in order of appearance."""
        names = list(self.summary.hospitals) if self.summary is not None else []
        for entry in self.rounds:
            names += [n for n in entry.per_hospital if n not in names]
        return names


def read_rounds(path: Path, *, keep_repeats: bool = False) -> list[RoundEntry]:
    """The rounds of a ``metrics.jsonl`` ([] if there is none), in round order.

    A round written twice (a resumed run) counts once: the later line holds;
    ``keep_repeats`` keeps every line in file order instead.

    Raises
    ------
    ReportError
        The file cannot be read, or a line is not a round record (named with its number).
    """
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} cannot be read ({err}): {_RESTORE}") from err
    lines: list[RoundEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append(RoundEntry.from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ReportError(f"{path} line {number} is not a round record ({err}): {_RESTORE}") from err
    if keep_repeats:
        return lines
    by_round = {entry.round: entry for entry in lines}
    return [by_round[k] for k in sorted(by_round)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} cannot be read ({err}): {_RESTORE}, or move it away to report without it") from err
    if not isinstance(value, dict):
        raise ReportError(f"{path} does not hold a JSON object: {_RESTORE}, or move it away to report without it")
    return value


def read_summary(path: Path) -> RunSummary | None:
    """A ``summary.json`` (None if there is none); :class:`ReportError` names a damaged one."""
    if not path.is_file():
        return None
    data = _read_json(path)
    try:
        return RunSummary.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ReportError(f"{path} is not a run summary ({err}): {_RESTORE}, or move it away to report without it") from err


def read_run(run_dir: str | Path, *, need_rounds: bool = True) -> RunFiles:
    """Read a run directory.

    Parameters
    ----------
    run_dir : str or Path
        A directory written by ``fedfm run`` (finished, stopped, resumed or still running).
    need_rounds : bool
        Refuse a run without a completed round (what a report needs); False reads
        a run that ended before its first round, too.

    Returns
    -------
    RunFiles
        The recorded rounds, the summary (None if none yet) and the configuration.

    Raises
    ------
    ReportError
        The directory is missing, holds no completed round (with ``need_rounds``),
        or one of its files cannot be read (the message names the file).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist" if not path.exists() else f"{path} is not a directory")
    metrics = path / METRICS_FILE
    if need_rounds and not metrics.is_file():
        if (path / CONFIG_FILE).is_file():
            raise ReportError(f"{path} has no completed round yet: {metrics} is missing")
        raise ReportError(f"{path} is not a fedfm run directory: it has no metrics.jsonl (nor config.toml)")
    rounds = read_rounds(metrics)
    if need_rounds and not rounds:
        raise ReportError(f"{path} has no completed round yet: {metrics} is empty")
    summary = read_summary(path / SUMMARY_FILE)
    config: dict[str, Any] = {}
    if (path / CONFIG_FILE).is_file():
        try:
            config = tomllib.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ReportError(f"{path / CONFIG_FILE} cannot be read ({err}): {_RESTORE}") from err
    return RunFiles(path, rounds, summary, config)
