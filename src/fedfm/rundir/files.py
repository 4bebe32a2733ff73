"""Atomic writes, and the default run directory's name.

Every file of a run directory is written atomically (a temp file beside it,
then a rename), so a run killed at any moment leaves only complete files behind.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

#: The files of a run directory (besides ``adapter/``, ``merged/`` and ``checkpoints/``).
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.toml", "metrics.jsonl", "summary.json"


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


