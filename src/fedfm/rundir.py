"""The run directory: resolved config, per-round metrics, summary, checkpoints, adapter.

Every file is written atomically (a temp file beside it, then a rename), so a
run killed at any moment leaves only complete files behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import RunConfig, to_flat
from fedfm.errors import CheckpointError, RunDirectoryError

try:
    import fcntl
except ImportError:  # not on POSIX: runs are not locked against each other
    fcntl = None  # type: ignore[assignment]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def default_run_dir(root: str | Path = "runs") -> Path:
    """``runs/<UTC timestamp>``, made unique if a run started in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


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
        self._lines: list[str] = []
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
        atomic_write_text(self.path / "config.toml", config.to_toml())
        self._config = to_flat(config)

    def append_round(self, entry: dict[str, Any]) -> None:
        """Add one round's line to ``metrics.jsonl`` (the file is rewritten whole, atomically)."""
        self._lines.append(json.dumps(entry, sort_keys=True))
        atomic_write_text(self.path / "metrics.jsonl", "\n".join(self._lines) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def write_checkpoint(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        *,
        state: dict[str, Any] | None = None,
        state_arrays: dict[str, np.ndarray] | None = None,
        keep: int = 2,
    ) -> Path:
        """Save what a resumed run needs after ``server_round``; keep the newest ``keep`` rounds.

        ``round-NNNN.npz`` holds the global adapter alone (plain ``np.load``);
        ``round-NNNN.state.npz`` the server's state: ``state`` as JSON, the
        arrays it refers to, and the configuration the rounds ran under (the
        one given to :meth:`write_config`), so a resumed run is compared with
        what was run, not with a ``config.toml`` that may have been edited since.
        ``latest.json``, written last, names both files with their SHA-256, so
        a crash mid-write leaves the previous round's checkpoint in force.
        """
        files = {"file": (f"round-{server_round:04d}.npz", _npz(arrays))}
        extra = {} if self._config is None else {CONFIG_KEY: _json_array(self._config)}
        files["state_file"] = (
            f"round-{server_round:04d}.state.npz",
            _npz({STATE_KEY: _json_array(state or {}), **extra, **(state_arrays or {})}),
        )
        meta: dict[str, Any] = {"round": server_round}
        for role, (name, data) in files.items():
            atomic_write_bytes(self.checkpoint_dir / name, data)
            meta[role] = name
            meta[role.replace("file", "sha256")] = hashlib.sha256(data).hexdigest()
        atomic_write_text(self.checkpoint_dir / "latest.json", json.dumps(meta, indent=2) + "\n")
        rounds = sorted(self.checkpoint_dir.glob("round-????.npz"))
        for old in rounds[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".state.npz").unlink(missing_ok=True)
        return self.checkpoint_dir / files["file"][0]

    def lines(self) -> list[dict[str, Any]]:
        """The rounds recorded so far in this directory's ``metrics.jsonl``."""
        return [json.loads(line) for line in self._lines]

    def restart_from(self, server_round: int) -> None:
        """Keep the metrics lines of rounds up to ``server_round`` (a resumed run appends after them)."""
        lines = [
            line for line in (self.path / "metrics.jsonl").read_text().splitlines()
            if line.strip() and json.loads(line)["round"] <= server_round
        ] if (self.path / "metrics.jsonl").is_file() else []
        self._lines = lines
        if lines:
            atomic_write_text(self.path / "metrics.jsonl", "\n".join(lines) + "\n")


#: Entry of a state file that holds the JSON part.
STATE_KEY = "__state__"
#: Entry of a state file that holds the run's flat configuration (JSON) the rounds ran under.
CONFIG_KEY = "__config__"


def _json_array(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def _from_json_array(array: np.ndarray | None, default: Any) -> Any:
    return default if array is None else json.loads(bytes(array).decode("utf-8") or "null")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@dataclass(frozen=True)
class Checkpoint:
    """A run's newest complete checkpoint, checksums verified.

    Attributes
    ----------
    server_round : int
        The last round it completed.
    arrays : dict of str to ndarray
        The global adapter (the strategy's record) after that round.
    state : dict
        The server's state as written (strategy, random generators, ledgers).
    state_arrays : dict of str to ndarray
        The arrays ``state`` refers to.
    config : dict or None
        The flat configuration (``RunConfig.to_flat()``) the rounds ran under;
        None in checkpoints written before fedfm recorded it.
    """

    server_round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    state_arrays: dict[str, np.ndarray]
    config: dict[str, Any] | None = None


def _verified(folder: Path, name: Any, digest: Any) -> bytes:
    if not isinstance(name, str) or "/" in name or not name.endswith(".npz"):
        raise CheckpointError(f"{folder / 'latest.json'} names no checkpoint file ({name!r})")
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {err}") from err
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its SHA-256 differs from the one recorded in latest.json"
        )
    return data


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest checkpoint of ``run_dir``.

    Raises
    ------
    CheckpointError
        No checkpoint, or a file that is missing, unreadable or whose checksum
        differs from the one recorded (the message names the file).
    """
    folder = Path(run_dir) / "checkpoints"
    latest = folder / "latest.json"
    if not latest.is_file():
        raise CheckpointError(f"{run_dir} holds no checkpoint ({latest} is missing): no round of it completed")
    try:
        meta = json.loads(latest.read_text())
        server_round = int(meta["round"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{latest} is corrupt: {err}") from err
    try:
        with np.load(io.BytesIO(_verified(folder, meta.get("file"), meta.get("sha256")))) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if "state_file" in meta:
            with np.load(io.BytesIO(_verified(folder, meta["state_file"], meta.get("state_sha256")))) as npz:
                state_arrays = {k: npz[k] for k in npz.files}
        else:
            state_arrays = {}
        state = _from_json_array(state_arrays.pop(STATE_KEY, None), None) or {}
        config = _from_json_array(state_arrays.pop(CONFIG_KEY, None), None)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"a checkpoint file of {folder} cannot be read: {err}") from err
    return Checkpoint(server_round, arrays, state, state_arrays, config)


def completed_round(run_dir: Path) -> int | None:
    """The last round ``run_dir``'s ``latest.json`` names (None when there is none or it cannot be read)."""
    try:
        return int(json.loads((Path(run_dir) / "checkpoints" / "latest.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rounds recorded in a ``metrics.jsonl``."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
