"""The claim on a run directory: one process at a time, nothing overwritten by accident."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedfm.errors import RunDirectoryError

try:
    import fcntl
except ImportError:  # not on POSIX: runs are not locked against each other
    fcntl = None  # type: ignore[assignment]

#: The lock file of a run directory: a process that writes the run holds an flock on it.
LOCK_FILE = ".fedfm.lock"
#: Files and folders only a fedfm run writes; a folder holding one of them is a run (``--overwrite`` may delete it).
RUN_MARKERS = ("config.toml", "metrics.jsonl", "summary.json", "checkpoints")

_HELD: dict[Path, list[Any]] = {}  # resolved run directory -> [lock file descriptor, claims in this process]
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def claim(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``path`` as this process's run directory for the block: one process at a time, nothing overwritten.

    The first claim in a process creates the folder if needed, takes an
    exclusive ``flock`` on its :data:`LOCK_FILE` (the kernel drops it when the
    process dies, so a killed run never leaves the directory stuck), and then
    looks at what the folder holds. A new run (neither ``resume`` nor
    ``overwrite``) needs a folder with nothing in it; ``overwrite`` deletes a
    previous fedfm run first (never a folder that is not a run). Claims of a
    directory this process already holds (the ServerApp inside :func:`fedfm.run`)
    only count.

    Raises
    ------
    RunDirectoryError
        ``path`` is a file or cannot be written, another process holds it, or
        it holds files and neither ``resume`` nor ``overwrite`` says what to do with them.
    """
    path = Path(path)
    key = path.resolve()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        check_usable(path, resume=resume, overwrite=overwrite)  # before a lock file is made there
        fd = _lock(path)
        try:
            _make_room(path, resume=resume, overwrite=overwrite)  # again, now that no other process can write
        except BaseException:
            os.close(fd)
            raise
        with _HELD_GUARD:
            _HELD[key] = held = [fd, 1]
    try:
        yield path
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # closing the descriptor drops the flock


def check_usable(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse ``path`` as a run directory where :func:`claim` would, creating and deleting nothing.

    :func:`fedfm.run` asks this first, before any data loads; :func:`claim` asks again under its lock.
    """
    path = Path(path)
    if resume and overwrite:
        raise RunDirectoryError(f"resume and overwrite exclude each other for {path}: resume continues the run there, "
                                "overwrite deletes it")
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"run directory {path} is a file, not a folder: choose a folder (--out / output.dir)")
    if path.is_dir():
        _make_room(path, resume=resume, overwrite=overwrite, dry_run=True)


def _lock(path: Path) -> int:
    """Create ``path`` if needed and take its lock; the open descriptor holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write in run directory {path}: {err.strerror or err}; choose another (--out / output.dir)"
        ) from err
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise RunDirectoryError(
            f"run directory {path} is in use by another fedfm process (pid {owner}); wait for it to end, "
            "or choose another run directory"
        ) from err
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _make_room(path: Path, *, resume: bool, overwrite: bool, dry_run: bool = False) -> None:
    """Refuse a folder that holds anything for a new run; with ``overwrite``, delete the run it holds."""
    present = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    if resume or not present:
        return
    is_run = any((path / marker).exists() for marker in RUN_MARKERS)
    if not overwrite:
        what = "a fedfm run" if is_run else f"{len(present)} file(s) ({', '.join(present[:3])})"
        hint = (f"continue it with `fedfm run --resume {path}`, delete it and start afresh with --overwrite "
                "(output.overwrite), or choose another run directory") if is_run else "choose an empty or new run directory"
        raise RunDirectoryError(f"run directory {path} already holds {what}: {hint}")
    if not is_run:
        raise RunDirectoryError(
            f"run directory {path} holds files that are not a fedfm run ({', '.join(present[:3])}); --overwrite "
            "deletes only fedfm runs: choose another run directory"
        )
    if dry_run:
        return
    for name in present:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


