"""A hospital's own state across rounds: its privacy ledger, its kept LoRA parts, its top-k residual.

:class:`HospitalSession` is the one owner of that state on the hospital's side.
It lives in Flower's per-node context state (``context.state``), which a
SuperNode keeps for as long as it runs and a simulation loses when its process
dies; so the session also writes it to the hospital's state folder
(``<run dir>/hospitals/<name>/`` in a simulation, the SuperNode's ``state-dir``
node config in a deployment): the ledger as ``privacy-ledger.json``, the
arrays as one ``context-state-round-NNNN.npz`` per trained round (the two
newest kept).

One load before a round (:meth:`HospitalSession.load`), one save after it
(:meth:`HospitalSession.save`). Like Opacus's accountants, the session turns
into and back from its stored form with :meth:`~HospitalSession.state_dict`
and :meth:`~HospitalSession.load_state_dict` (here: the context-state entries).

The ledger only ever grows: it is never rewound. The arrays are: if the
context holds none, or holds arrays from a round the server has not completed
(the server was restarted from an earlier checkpoint), the session reloads
the newest file from before the round it is asked for, so a resumed run sees
what an uninterrupted one would have.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedfm import keys
from fedfm.config import RunConfig
from fedfm.data.local import DATA_PATH
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import HospitalLedger
from fedfm.privacy.hospital import LEDGER_FILE
from fedfm.rundir import atomic_write_bytes
from fedfm.wire import numpy_to_record, record_to_numpy

logger = logging.getLogger("fedfm")

#: The context-state entries of arrays that are written to the state folder.
PERSISTED = (keys.KEPT_ARRAYS, keys.COMPRESSION_RESIDUAL)
_PATTERN = "context-state-round-*.npz"


def state_folder(config: RunConfig, node_config: Mapping[str, Any], name: str) -> Path | None:
    """Where hospital ``name`` keeps state that must outlive the process, if anywhere.

    A SuperNode with its own data (node config ``data-path``) writes only
    where its own node config says (``state-dir``), never where the run
    configuration, which the coordinator chose, points. In a simulation it is
    ``<output.dir>/hospitals/<name>``; a hospital name that is not a plain
    file name (``/``, ``..``) is refused rather than followed.
    """
    if node_config.get(keys.STATE_DIR):
        return Path(str(node_config[keys.STATE_DIR]))
    if node_config.get(DATA_PATH) or not config.output.dir:
        return None
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"hospital name {name!r} cannot name a state folder: use a plain name without / or ..")
    return Path(config.output.dir) / "hospitals" / name


def _file(folder: Path, server_round: int) -> Path:
    return folder / f"context-state-round-{server_round:04d}.npz"


@dataclass
class HospitalSession:
    """One hospital's state across rounds, loaded before a round and saved after it.

    Attributes
    ----------
    folder : Path or None
        The state folder (:func:`state_folder`); None keeps the state in the context only.
    ledger : HospitalLedger or None
        The DP-SGD ledger; None until the hospital's first DP round.
    kept : dict of str to ndarray
        Tensors the hospital trains but keeps (FedSA-LoRA's B); never sent.
    residual : dict of str to ndarray
        What top-k compression has not sent yet (error feedback); never sent.
    arrays_round : int or None
        The round ``kept`` and ``residual`` are from.
    """

    folder: Path | None = None
    ledger: HospitalLedger | None = None
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    residual: dict[str, np.ndarray] = field(default_factory=dict)
    arrays_round: int | None = None

    @classmethod
    def load(cls, context: Context, folder: Path | None, *, server_round: int, training: bool) -> HospitalSession:
        """The state a hospital had before ``server_round`` (training) or after it (evaluating).

        From the context, else (a new process, or a server resumed from an
        earlier round) from ``folder``. ``server_round`` 0 takes the context as it is.
        """
        session = cls(folder)
        session.load_state_dict(context.state)
        newest_allowed = server_round - 1 if training else server_round
        held = session.arrays_round
        if server_round > 0 and (held is None or held > newest_allowed):
            session.kept, session.residual, session.arrays_round = {}, {}, None
            session._read_arrays(newest_allowed)
        if session.ledger is None and folder is not None:
            session.ledger = HospitalLedger.load(folder / LEDGER_FILE)
            if session.ledger is not None:
                logger.info("%s: privacy ledger continues from %s (ε %.3f spent)",
                            session.ledger.hospital, folder / LEDGER_FILE, session.ledger.epsilon())
        return session

    def save(self, context: Context, *, server_round: int | None = None) -> None:
        """Put the state into the context and the state folder.

        ``server_round``: the round just trained, whose arrays these are; leave it
        out when no round was trained (a refusal), and only the ledger is written.
        """
        if self.ledger is not None and self.folder is not None:
            self.ledger.save(self.folder / LEDGER_FILE)
        if server_round is not None:
            self.arrays_round = server_round
            self._write_arrays(server_round)
        state = self.state_dict()
        for entry in (*PERSISTED, keys.STATE_ROUND, keys.PRIVACY_LEDGER):
            if entry in state:
                context.state[entry] = state[entry]
            elif entry in context.state:
                del context.state[entry]

    def state_dict(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """The session as context-state entries (only those it holds)."""
        state: dict[str, ArrayRecord | ConfigRecord] = {}
        if self.ledger is not None:
            state[keys.PRIVACY_LEDGER] = ConfigRecord({"ledger": self.ledger.to_json()})
        if self.kept:
            state[keys.KEPT_ARRAYS] = numpy_to_record(self.kept)
        if self.residual:
            state[keys.COMPRESSION_RESIDUAL] = numpy_to_record(self.residual)
        if self.arrays_round is not None:
            state[keys.STATE_ROUND] = ConfigRecord({"round": self.arrays_round})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the session's entries from context state (or :meth:`state_dict` output)."""
        ledger, kept = state.get(keys.PRIVACY_LEDGER), state.get(keys.KEPT_ARRAYS)
        residual, held = state.get(keys.COMPRESSION_RESIDUAL), state.get(keys.STATE_ROUND)
        self.ledger = None
        if isinstance(ledger, ConfigRecord) and "ledger" in ledger:
            self.ledger = HospitalLedger.from_json(str(ledger["ledger"]))
        self.kept = record_to_numpy(kept) if isinstance(kept, ArrayRecord) else {}
        self.residual = record_to_numpy(residual) if isinstance(residual, ArrayRecord) else {}
        self.arrays_round = int(str(held["round"])) if isinstance(held, ConfigRecord) else None

    def _write_arrays(self, server_round: int, *, keep: int = 2) -> None:
        # C order, as the arrays come out of the context's records, so the file is the same either way.
        arrays = {
            f"{entry}/{name}": np.ascontiguousarray(value)
            for entry, values in self._persisted().items() for name, value in values.items()
        }
        if self.folder is None or not arrays:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(_file(self.folder, server_round), buffer.getvalue())
        for old in sorted(self.folder.glob(_PATTERN))[:-keep]:
            old.unlink(missing_ok=True)

    def _read_arrays(self, newest_allowed: int) -> None:
        """The newest arrays file of a round up to ``newest_allowed``, if the folder has one."""
        if self.folder is None:
            return
        candidates = [(int(path.stem.rsplit("-", 1)[1]), path) for path in self.folder.glob(_PATTERN)]
        usable = sorted((r, p) for r, p in candidates if r <= newest_allowed)
        if not usable:
            return
        found_round, path = usable[-1]
        by_entry: dict[str, dict[str, np.ndarray]] = {}
        with np.load(path) as npz:
            for key in npz.files:
                entry, name = key.split("/", 1)
                by_entry.setdefault(entry, {})[name] = npz[key]
        self.kept = by_entry.get(keys.KEPT_ARRAYS, {})
        self.residual = by_entry.get(keys.COMPRESSION_RESIDUAL, {})
        self.arrays_round = found_round

    def _persisted(self) -> dict[str, dict[str, np.ndarray]]:
        return {entry: values for entry, values in ((keys.KEPT_ARRAYS, self.kept),
                                                     (keys.COMPRESSION_RESIDUAL, self.residual)) if values}

