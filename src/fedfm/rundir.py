"""The run directory: resolved config, per-round metrics, summary, checkpoints, adapter.

Every file is written atomically (a temp file beside it, then a rename), so a
run killed at any moment leaves only complete files behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import RunConfig
from fedfm.errors import CheckpointError


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
        atomic_write_text(self.path / "config.toml", config.to_toml())

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
        ``round-NNNN.state.npz`` the server's state: ``state`` as JSON and the
        arrays it refers to. ``latest.json``, written last, names both files
        with their SHA-256, so a crash mid-write leaves the previous round's
        checkpoint in force.
        """
        files = {"file": (f"round-{server_round:04d}.npz", _npz(arrays))}
        meta_array = np.frombuffer(json.dumps(state or {}).encode("utf-8"), dtype=np.uint8)
        files["state_file"] = (
            f"round-{server_round:04d}.state.npz", _npz({STATE_KEY: meta_array, **(state_arrays or {})})
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
    """

    server_round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    state_arrays: dict[str, np.ndarray]


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
        state = json.loads(bytes(state_arrays.pop(STATE_KEY, np.zeros(0, np.uint8))).decode("utf-8") or "{}")
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"a checkpoint file of {folder} cannot be read: {err}") from err
    return Checkpoint(server_round, arrays, state, state_arrays)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rounds recorded in a ``metrics.jsonl``."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
