"""Checkpoints: the global adapter and the server's state after a round, checksummed, and reading them back."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.errors import CheckpointError
from fedfm.rundir.files import atomic_write_bytes, atomic_write_text

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




def write_checkpoint(
    folder: Path,
    server_round: int,
    arrays: dict[str, np.ndarray],
    *,
    state: dict[str, Any] | None = None,
    state_arrays: dict[str, np.ndarray] | None = None,
    config: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save what a resumed run needs after ``server_round`` into ``folder``; keep the newest ``keep`` rounds.

    ``round-NNNN.npz`` holds the global adapter alone (plain ``np.load``);
    ``round-NNNN.state.npz`` the server's state: ``state`` as JSON, the arrays
    it refers to, and ``config``, the flat configuration the rounds ran under.
    ``latest.json``, written last, names both files with their SHA-256, so a
    crash mid-write leaves the previous round's checkpoint in force.
    """
    files = {"file": (f"round-{server_round:04d}.npz", _npz(arrays))}
    extra = {} if config is None else {CONFIG_KEY: _json_array(config)}
    files["state_file"] = (
        f"round-{server_round:04d}.state.npz",
        _npz({STATE_KEY: _json_array(state or {}), **extra, **(state_arrays or {})}),
    )
    meta: dict[str, Any] = {"round": server_round}
    for role, (name, data) in files.items():
        atomic_write_bytes(folder / name, data)
        meta[role] = name
        meta[role.replace("file", "sha256")] = hashlib.sha256(data).hexdigest()
    atomic_write_text(folder / "latest.json", json.dumps(meta, indent=2) + "\n")
    rounds = sorted(folder.glob("round-????.npz"))
    for old in rounds[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".state.npz").unlink(missing_ok=True)
    return folder / files["file"][0]
