"""The writer of one run's directory: ``config.toml``, ``metrics.jsonl``, ``summary.json``, checkpoints."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import RunConfig, to_flat
from fedfm.rundir.checkpoint import write_checkpoint
from fedfm.rundir.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, atomic_write_text
from fedfm.rundir.reader import read_rounds
from fedfm.rundir.records import RoundEntry, RunSummary


def round_line(entry: RoundEntry) -> str:
    """``entry`` as its line of ``metrics.jsonl`` (no newline)."""
    return json.dumps(entry.to_json(), sort_keys=True)


def summary_text(summary: RunSummary) -> str:
    """``summary`` as the text of ``summary.json``."""
    return json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n"


class RunDirectory:
    """Writer of one run's directory.

    Parameters
    ----------
    path : Path
        The folder; created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._rounds: list[RoundEntry] = []
        self._config: dict[str, Any] | None = None

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: RunConfig) -> None:
        """Write ``config.toml``; every checkpoint written after this carries the same configuration."""
        atomic_write_text(self.path / CONFIG_FILE, config.to_toml())
        self._config = to_flat(config)

    def append_round(self, entry: RoundEntry | Mapping[str, Any]) -> None:
        """Add one round's line to ``metrics.jsonl`` (the file is rewritten whole, atomically).

        A mapping is read as :meth:`RoundEntry.from_json` (lines built by hand in tests).
        """
        self._rounds.append(entry if isinstance(entry, RoundEntry) else RoundEntry.from_json(entry))
        self._write_rounds()

    def write_summary(self, summary: RunSummary | Mapping[str, Any]) -> None:
        """Write ``summary.json`` (a mapping is read as :meth:`RunSummary.from_json`)."""
        record = summary if isinstance(summary, RunSummary) else RunSummary.from_json(summary)
        atomic_write_text(self.path / SUMMARY_FILE, summary_text(record))

    def write_checkpoint(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        *,
        state: dict[str, Any] | None = None,
        state_arrays: dict[str, np.ndarray] | None = None,
        keep: int = 2,
    ) -> Path:
        """Save what a resumed run needs after ``server_round`` (:func:`fedfm.rundir.checkpoint.write_checkpoint`).

        The checkpoint carries the configuration given to :meth:`write_config`,
        so a resumed run is compared with what was run, not with a ``config.toml``
        that may have been edited since.
        """
        return write_checkpoint(self.checkpoint_dir, server_round, arrays, state=state, state_arrays=state_arrays,
                                config=self._config, keep=keep)

    def rounds(self) -> list[RoundEntry]:
        """The rounds recorded so far in this directory's ``metrics.jsonl``."""
        return list(self._rounds)

    def lines(self) -> list[dict[str, Any]]:
        """The same rounds as the JSON objects of their lines."""
        return [entry.to_json() for entry in self._rounds]

    def restart_from(self, server_round: int) -> None:
        """Keep the metrics lines of rounds up to ``server_round`` (a resumed run appends after them)."""
        self._rounds = [e for e in read_rounds(self.path / METRICS_FILE, keep_repeats=True) if e.round <= server_round]
        if self._rounds:
            self._write_rounds()

    def _write_rounds(self) -> None:
        atomic_write_text(self.path / METRICS_FILE, "".join(round_line(e) + "\n" for e in self._rounds))
