"""A question counter on stderr while a benchmark runs.

On a terminal one line is redrawn in place
(``progress: medmcqa generate 96/4183 (2%) | 1.9 q/s | ~36m left``);
elsewhere (a log file, a test) a plain line is written at every tenth of a
phase, prefixed ``progress:`` like ``fedfm run``'s line-per-round display
(:mod:`fedfm.progress`).
"""

from __future__ import annotations

import sys
import time
from typing import IO

__all__ = ["QuestionCounter"]


def _minutes(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


class QuestionCounter:
    """Counts the questions of one phase (``generate`` or ``likelihood``) of one benchmark.

    Parameters
    ----------
    stream : text stream, optional
        Where the counter goes (default ``sys.stderr``).
    enabled : bool
        ``False`` shows nothing (the Python API's ``progress=False``).
    """

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._label, self._total, self._done, self._shown, self._start = "", 0, 0, -1, 0.0

    def start(self, benchmark: str, phase: str, total: int) -> None:
        """A phase begins: ``total`` questions to go."""
        self._label, self._total, self._done, self._shown = f"{benchmark} {phase}", total, 0, -1
        self._start = time.perf_counter()
        self._show()

    def advance(self, questions: int) -> None:
        """``questions`` more are done."""
        self._done += questions
        self._show()

    def finish(self) -> float:
        """End the phase; returns its seconds."""
        seconds = time.perf_counter() - self._start
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
        return seconds

    def _show(self) -> None:
        if not self.enabled:
            return
        tenth = self._done * 10 // max(1, self._total)
        if not self.live and tenth == self._shown:
            return
        self._shown = tenth
        elapsed = time.perf_counter() - self._start
        line = f"progress: {self._label} {self._done}/{self._total} ({self._done / max(1, self._total):.0%})"
        if self._done and elapsed > 0:
            rate = self._done / elapsed
            line += f" | {rate:.2f} q/s"
            if self._done < self._total:
                line += f" | ~{_minutes((self._total - self._done) / rate)} left"
        self.stream.write(f"\r\033[K{line}" if self.live else f"{line}\n")
        self.stream.flush()
