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
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import RunConfig


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

    def write_checkpoint(self, server_round: int, arrays: dict[str, np.ndarray], *, keep: int = 2) -> Path:
        """Save the global adapter after a round, with a checksum; keep the newest ``keep``."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        data = buffer.getvalue()
        target = self.checkpoint_dir / f"round-{server_round:04d}.npz"
        atomic_write_bytes(target, data)
        meta = {"round": server_round, "file": target.name, "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_text(self.checkpoint_dir / "latest.json", json.dumps(meta, indent=2) + "\n")
        for old in sorted(self.checkpoint_dir.glob("round-*.npz"))[:-keep]:
            old.unlink(missing_ok=True)
        return target


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rounds recorded in a ``metrics.jsonl``."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
