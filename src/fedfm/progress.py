"""Progress of a running federation, shown by the server while ``fedfm run`` goes on.

The server's recorder (``fedfm.server.recorder.Recorder``) hands each finished round's
metrics line to a :class:`Progress`. On a terminal (stderr is a tty) a
:class:`LiveProgress` keeps one status line at the bottom of the screen,
redrawn in place: rounds done out of the total, hospitals that replied in the
last round, the current global metrics, the time the running round has taken
and an estimate of what is left. Elsewhere (a log file, CI, ``flwr run``'s
ServerApp process) a :class:`LineProgress` writes one plain line per round.
``fedfm run --no-progress``, ``fedfm.run(progress=False)`` or the
environment variable ``FEDFM_PROGRESS=off`` turn it off; the ``fedfm``
logger's own per-round lines are unchanged in every mode, and nothing is
shown while that logger is quieter than INFO.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Self

from fedfm.errors import ConfigError
from fedfm.rundir.records import RoundEntry

__all__ = [
    "MODES", "LineProgress", "LiveProgress", "Progress", "RoundStatus", "check_mode", "format_status",
    "progress_display",
]

#: Accepted values of the ``progress`` setting (``auto``: live on a terminal, else lines).
MODES = ("auto", "live", "lines", "off")
#: Environment variable that sets the mode where ``auto`` is asked for (e.g. ``flwr run``'s ServerApp).
ENV_VAR = "FEDFM_PROGRESS"
#: Global metrics shown, in this order, where the run records them.
_SHOWN = ("accuracy", "macro-f1", "perplexity", "loss")

logger = logging.getLogger("fedfm")


@dataclass(frozen=True)
class RoundStatus:
    """Where a run stands after a round.

    Attributes
    ----------
    server_round : int
        The round just finished.
    total_rounds : int
        Rounds the run will have in all (``federation.num-rounds``).
    replied : int
        Hospitals whose training reply went into this round's aggregate.
    hospitals : int
        Hospitals in the federation.
    metrics : dict of str to float
        The round's global metrics (empty when the round was not evaluated).
    seconds : float
        Wall time of the round.
    left_out : int
        Replies left out of the round (errors, refusals, rejected updates).
    retries : int
        Times the round ran again because too few hospitals replied.
    """

    server_round: int
    total_rounds: int
    replied: int
    hospitals: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    left_out: int = 0
    retries: int = 0

    @classmethod
    def from_entry(cls, entry: RoundEntry, *, total_rounds: int, hospitals: int, replied: int) -> RoundStatus:
        """The status after the round of one ``metrics.jsonl`` line."""
        return cls(
            server_round=entry.round,
            total_rounds=total_rounds,
            replied=replied,
            hospitals=hospitals,
            metrics=dict(entry.global_),
            seconds=float(entry.seconds),
            left_out=len(entry.left_out),
            retries=entry.retries,
        )


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _metrics(metrics: Mapping[str, float]) -> str:
    shown = [f"{name} {metrics[name]:.3f}" for name in _SHOWN if isinstance(metrics.get(name), int | float)]
    return "global " + " ".join(shown) if shown else "global -"


def format_status(status: RoundStatus, *, eta: float | None = None) -> str:
    """One plain line for a finished round.

    ``round 2/10 (20%) | replied 4/4 | global accuracy 0.771 macro-f1 0.769 loss 0.512 | 12.3 s | ~1m38s left``;
    ``, 1 left out`` and ``, 1 retry`` follow the replies when a round had them.

    Parameters
    ----------
    status : RoundStatus
        The round just finished.
    eta : float, optional
        Seconds the remaining rounds should take; shown unless it was the last round.

    Returns
    -------
    str
        The line, without a newline.
    """
    done = status.server_round / status.total_rounds if status.total_rounds else 1.0
    replied = f"replied {status.replied}/{status.hospitals}"
    if status.left_out:
        replied += f", {status.left_out} left out"
    if status.retries:
        replied += f", {status.retries} {'retry' if status.retries == 1 else 'retries'}"
    parts = [
        f"round {status.server_round}/{status.total_rounds} ({done:.0%})",
        replied,
        _metrics(status.metrics),
        f"{status.seconds:.1f} s",
    ]
    if eta is not None and status.server_round < status.total_rounds:
        parts.append(f"~{_duration(eta)} left")
    return " | ".join(parts)


class Progress:
    """Progress display that shows nothing (mode ``off``); the base of the others.

    The server calls :meth:`begin` once the model is loaded, :meth:`round_done`
    after each recorded round and :meth:`close` at the end (also as a context manager).
    """

    def __init__(self) -> None:
        self.total_rounds = 0
        self.hospitals = 0
        self.done = 0
        self._first_done: int | None = None
        self._seconds: list[float] = []

    def begin(self, *, done: int, total_rounds: int, hospitals: int) -> None:
        """The run starts after round ``done`` (0, or a resumed run's checkpoint) of ``total_rounds``."""
        self.done, self.total_rounds, self.hospitals = done, total_rounds, hospitals

    def round_done(self, entry: RoundEntry, *, total_rounds: int, hospitals: int, replied: int) -> None:
        """A round's metrics line was written; ``replied`` hospitals' updates went into its aggregate."""
        status = RoundStatus.from_entry(entry, total_rounds=total_rounds, hospitals=hospitals, replied=replied)
        self.done, self.total_rounds, self.hospitals = status.server_round, total_rounds, hospitals
        self._seconds.append(status.seconds)
        self.show(status)

    def eta(self) -> float | None:
        """Seconds the remaining rounds should take, from the mean round time seen so far (None before any)."""
        if not self._seconds:
            return None
        return sum(self._seconds) / len(self._seconds) * max(0, self.total_rounds - self.done)

    def show(self, status: RoundStatus) -> None:
        """Display one finished round (nothing here)."""

    def close(self) -> None:
        """Take the display down (nothing here)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineProgress(Progress):
    """One plain line per round on ``stream``, prefixed ``progress: `` (see :func:`format_status`).

    Parameters
    ----------
    stream : text stream, optional
        Where the lines go (default: ``sys.stderr`` at construction).
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr

    def show(self, status: RoundStatus) -> None:
        self.stream.write(f"progress: {format_status(status, eta=self.eta())}\n")
        self.stream.flush()


class _Interleaved:
    """Stands in for a log handler's stream on the same terminal: takes the status line down around each write."""

    def __init__(self, stream: IO[str], display: LiveProgress) -> None:
        self.stream = stream
        self.display = display

    def write(self, text: str) -> int:
        with self.display.lock:
            self.display.erase()
            written = self.stream.write(text)
            self.stream.flush()
            if text.endswith("\n"):
                self.display.draw()
        return written

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class LiveProgress(Progress):
    """A status line redrawn in place on a terminal.

    ``fedfm ▕███░░░░░░░▏ 3/10 · round 4 12s, ~1m38s left · replied 4/4 · global accuracy 0.771 …``.
    The ``fedfm`` and ``flwr`` loggers' lines on the same terminal are printed
    above it (their handlers' streams are wrapped while it is shown, and given
    back by :meth:`close`, which also erases the line).

    Parameters
    ----------
    stream : text stream, optional
        The terminal (default: ``sys.stderr`` at construction).
    refresh : float or None
        Seconds between redraws of the running round's clock; None: redraw only on events.
    """

    def __init__(self, stream: IO[str] | None = None, *, refresh: float | None = 1.0) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.lock = threading.RLock()
        self.last: RoundStatus | None = None
        self.round_started = time.monotonic()
        self._shown = False
        self._closed = False
        self._wrapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._wrap_handlers()
        if refresh is not None:
            self._ticker = threading.Thread(target=self._tick, args=(refresh,), name="fedfm-progress", daemon=True)
            self._ticker.start()

    def _wrap_handlers(self) -> None:
        for name in ("fedfm", "flwr", ""):
            for handler in logging.getLogger(name).handlers:
                if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                    continue
                stream = handler.stream
                if isinstance(stream, _Interleaved) or not _is_tty(stream):
                    continue
                self._wrapped.append((handler, stream))
                handler.setStream(_Interleaved(stream, self))  # type: ignore[arg-type]

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self.lock:
                if self.total_rounds:
                    self.draw()

    def line(self) -> str:
        """The status line as it is now (without control characters)."""
        # Most useful first: a narrow terminal cuts the end.
        total = self.total_rounds
        width = 10
        filled = round(width * self.done / total) if total else 0
        parts = [f"fedfm ▕{'█' * filled}{'░' * (width - filled)}▏ {self.done}/{total}"]
        eta = self.eta()
        if self.done < total:
            parts.append(f"round {self.done + 1} {_duration(time.monotonic() - self.round_started)}"
                         + (f", ~{_duration(eta)} left" if eta is not None else ""))
        if self.last is not None:
            parts.append(f"replied {self.last.replied}/{self.last.hospitals}"
                         + (f" ({self.last.left_out} left out)" if self.last.left_out else ""))
            parts.append(_metrics(self.last.metrics))
        return " · ".join(parts)

    def draw(self) -> None:
        """Redraw the status line (cut to the terminal's width, so it never wraps)."""
        with self.lock:
            if self._closed:
                return
            columns = shutil.get_terminal_size((100, 24)).columns
            text = self.line()
            if len(text) >= columns:
                text = text[: max(0, columns - 2)] + "…"
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._shown = True

    def erase(self) -> None:
        """Take the status line off the screen (it comes back on the next draw)."""
        with self.lock:
            if self._shown:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._shown = False

    def begin(self, *, done: int, total_rounds: int, hospitals: int) -> None:
        super().begin(done=done, total_rounds=total_rounds, hospitals=hospitals)
        self.round_started = time.monotonic()
        self.draw()

    def show(self, status: RoundStatus) -> None:
        with self.lock:
            self.last = status
            self.round_started = time.monotonic()
            self.draw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=2.0)
        with self.lock:
            self.erase()
            self._closed = True
            for handler, stream in self._wrapped:
                if isinstance(handler.stream, _Interleaved):
                    handler.setStream(stream)
            self._wrapped.clear()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def check_mode(mode: str | bool) -> str:
    """The progress mode ``mode`` stands for: True is ``auto``, ``auto`` is ``$FEDFM_PROGRESS`` where set.

    Raises
    ------
    ConfigError
        ``mode`` (or ``$FEDFM_PROGRESS``) is not one of :data:`MODES` or a bool.
    """
    chosen = "auto" if mode is True else "off" if mode is False else mode
    if chosen not in MODES:
        raise ConfigError(f"`progress` must be one of {list(MODES)} or a bool, got {mode!r}")
    if chosen == "auto" and os.environ.get(ENV_VAR):
        chosen = os.environ[ENV_VAR].strip().lower()
        if chosen not in MODES:
            raise ConfigError(f"`{ENV_VAR}` must be one of {list(MODES)}, got {os.environ[ENV_VAR]!r}")
    return chosen


def progress_display(mode: str | bool = "auto", *, stream: IO[str] | None = None, verbose: bool = False) -> Progress:
    """The progress display for a run.

    Parameters
    ----------
    mode : {"auto", "live", "lines", "off"} or bool
        ``auto`` (or True): ``$FEDFM_PROGRESS`` if set, else ``live`` when
        ``stream`` is a terminal and the run is not ``verbose``, else ``lines``.
        False is ``off``.
    stream : text stream, optional
        Where to show it (default ``sys.stderr``).
    verbose : bool
        Flower's and Ray's logs are shown; they would tear a live line, so ``auto`` picks ``lines``.

    Returns
    -------
    Progress
        A :class:`LiveProgress`, a :class:`LineProgress`, or a :class:`Progress` that shows nothing
        (``off``, or the ``fedfm`` logger set quieter than INFO).

    Raises
    ------
    ConfigError
        ``mode`` (or ``$FEDFM_PROGRESS``) is not one of :data:`MODES` or a bool.
    """
    chosen = check_mode(mode)
    stream = stream if stream is not None else sys.stderr
    if chosen == "auto":
        chosen = "live" if _is_tty(stream) and not verbose else "lines"
    if chosen == "off" or not logger.isEnabledFor(logging.INFO):
        return Progress()
    return LiveProgress(stream) if chosen == "live" else LineProgress(stream)
