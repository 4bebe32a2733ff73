"""A hospital's own arrays that must outlive its process: kept LoRA parts, top-k residuals.

A hospital keeps some tensors across rounds in Flower's per-node context state
(FedSA-LoRA's local B, the error feedback of top-k compression). A SuperNode
keeps that context for as long as it runs; a simulation loses it when its
process dies. So after each round it trains, the hospital also writes them to
its state folder (``<run dir>/hospitals/<name>/`` in a simulation, the
SuperNode's ``state-dir`` node config in a deployment), one file per round,
the two newest kept.

On the next instruction, if the context holds no state, or state from a round
the server has not completed (the server was restarted from an earlier
checkpoint), the hospital reloads the newest file from before the round it is
asked for, so a resumed run sees what an uninterrupted one would have.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedfm import keys
from fedfm.rundir import atomic_write_bytes
from fedfm.wire import numpy_to_record, record_to_numpy

#: The context-state entries that are persisted.
PERSISTED = (keys.KEPT_ARRAYS, keys.COMPRESSION_RESIDUAL)
#: Context-state entry recording which round the persisted entries are from.
ROUND = "fedfm-state-round"
_PATTERN = "context-state-round-*.npz"


def _file(folder: Path, server_round: int) -> Path:
    return folder / f"context-state-round-{server_round:04d}.npz"


def save(context: Context, folder: Path | None, server_round: int, *, keep: int = 2) -> None:
    """Record that the context's arrays are from ``server_round``, and write them to ``folder`` (if any)."""
    context.state[ROUND] = ConfigRecord({"round": server_round})
    arrays = {
        f"{entry}/{name}": value
        for entry in PERSISTED if isinstance(context.state.get(entry), ArrayRecord)
        for name, value in record_to_numpy(context.state[entry]).items()  # type: ignore[arg-type]
    }
    if folder is None or not arrays:
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(_file(folder, server_round), buffer.getvalue())
    for old in sorted(folder.glob(_PATTERN))[:-keep]:
        old.unlink(missing_ok=True)


def restore(context: Context, folder: Path | None, server_round: int, *, training: bool) -> None:
    """Make the context hold the state a hospital had before ``server_round`` (training) or after it (evaluating)."""
    recorded = context.state.get(ROUND)
    held = int(recorded["round"]) if isinstance(recorded, ConfigRecord) else None  # type: ignore[arg-type]
    newest_allowed = server_round - 1 if training else server_round
    if held is not None and held <= newest_allowed:
        return
    for entry in (*PERSISTED, ROUND):
        if entry in context.state:
            del context.state[entry]
    if folder is None:
        return
    candidates = [
        (int(path.stem.rsplit("-", 1)[1]), path) for path in folder.glob(_PATTERN)
    ]
    usable = sorted((r, p) for r, p in candidates if r <= newest_allowed)
    if not usable:
        return
    found_round, path = usable[-1]
    with np.load(path) as npz:
        by_entry: dict[str, dict[str, np.ndarray]] = {}
        for key in npz.files:
            entry, name = key.split("/", 1)
            by_entry.setdefault(entry, {})[name] = npz[key]
    for entry, arrays in by_entry.items():
        context.state[entry] = numpy_to_record(arrays)
    context.state[ROUND] = ConfigRecord({"round": found_round})
