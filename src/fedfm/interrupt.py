"""Ctrl-C during a run: abandon the round in flight, keep the last checkpoint, say how to resume.

The first SIGINT only *asks* for a stop (:func:`requested`); the places that
can take long look at it between small steps and raise :class:`RunInterrupted`:
every training and evaluation batch (:func:`check`), and the server's wait for
replies (:class:`InterruptibleGrid`). The exception is an ordinary
``Exception``, so it travels the way a hospital's or the ServerApp's error
already does in Flower's simulation engine: the server thread ends, Flower
stops the hospitals, and :func:`fedfm.run` raises it to the caller, with the
last complete round's checkpoint untouched (each round's files are written
atomically, ``latest.json`` last). A second SIGINT raises ``KeyboardInterrupt``
at once; the ``fedfm`` command then exits without waiting for anything.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fedfm.errors import FedfmError

_REQUESTED = threading.Event()


class RunInterrupted(FedfmError):
    """A run was stopped by Ctrl-C (SIGINT) before it finished; its last complete round is saved.

    Attributes
    ----------
    run_dir : str or None
        The run directory, where known (set by :func:`fedfm.run`).
    last_round : int or None
        The last round whose checkpoint is complete, where known.
    """

    def __init__(self, message: str = "interrupted (Ctrl-C)", *, run_dir: str | None = None,
                 last_round: int | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.last_round = last_round


def requested() -> bool:
    """Whether a stop was asked for (the first Ctrl-C of this run)."""
    return _REQUESTED.is_set()


def request() -> None:
    """Ask the run in progress to stop, as the first Ctrl-C does."""
    _REQUESTED.set()


def check() -> None:
    """Raise :class:`RunInterrupted` if a stop was asked for; called between training and evaluation batches."""
    if _REQUESTED.is_set():
        raise RunInterrupted()


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[None]:
    """Inside the block, the first SIGINT asks for a stop and the second raises ``KeyboardInterrupt``.

    Only the main thread can own signal handlers: elsewhere the block changes
    nothing. The previous handler comes back afterwards, and a stop asked for
    inside the block does not leak into the next run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handle(signum: int, frame: Any) -> None:
        if _REQUESTED.is_set():
            raise KeyboardInterrupt
        _REQUESTED.set()
        print("\nfedfm: interrupted: abandoning the round in flight (Ctrl-C again to exit at once)",
              file=sys.stderr, flush=True)

    _REQUESTED.clear()
    signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _REQUESTED.clear()


class InterruptibleGrid:
    """A Flower ``Grid`` whose ``send_and_receive`` gives up as soon as a stop is asked for.

    Flower's own waits for the round's replies for up to ``round-timeout``
    seconds (an hour by default) and cannot be cut short; this one pushes the
    messages with the grid's ``push_messages`` and pulls the replies with its
    ``pull_messages`` in the same way, looking at :func:`requested` between
    pulls. Everything else is the wrapped grid's.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation engine or SuperLink).
    """

    def __init__(self, grid: Any) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Push ``messages``, then pull their replies until all came, ``timeout`` passed, or a stop is asked for."""
        check()
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = float(getattr(self._grid, "pull_interval", 0.1))
        replies: list[Any] = []
        while waiting:
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            check()
            _REQUESTED.wait(min(interval, max(deadline - time.monotonic(), 0.0)) if deadline is not None else interval)
        check()
        return replies
