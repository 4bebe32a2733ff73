"""A hospital's own records on a SuperNode, named by the SuperNode's node config.

In a simulation every process builds the whole federation from the run
configuration and a hospital takes its partition. On Flower's Deployment
Engine each hospital runs its own SuperNode, and its data is whatever file the
hospital's operator names when starting it::

    flower-supernode ... --node-config 'partition-id=0 hospital="north" data-path="notes.csv" data-root="/srv/fedfm"'

Only the node config chooses the file: the run configuration that the
coordinator sends (``data.path``, ``data.data-dir``) is never read on a
SuperNode that has ``data-path``, so a coordinator cannot make a hospital read
another file. ``data-root``, when given, is the one folder the file may lie in
(after following links and ``..``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfm.data.federation import Federation, split_hospital
from fedfm.data.sources import load_source
from fedfm.errors import ConfigError, DataError

#: Node-config key of the hospital's data file.
DATA_PATH = "data-path"
#: Node-config key of the folder the data file must lie in.
DATA_ROOT = "data-root"
#: Node-config key of the hospital's name (default: the data file's stem).
HOSPITAL = "hospital"

#: File suffixes a hospital's file may have, and the reader each selects.
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

_FORM = f'--node-config \'{DATA_PATH}="/path/to/records.csv" {HOSPITAL}="north"\''
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class NodeData:
    """Where one SuperNode's hospital keeps its records.

    Parameters
    ----------
    path : Path
        The data file, resolved (links and ``..`` followed); it exists and is readable.
    name : str
        The hospital's name (node config ``hospital``, else the file's stem).
    file_format : str
        ``csv``, ``jsonl``, ``json`` or ``parquet``, from the file's suffix.
    """

    path: Path
    name: str
    file_format: str


def node_data(node_config: Mapping[str, Any]) -> NodeData | None:
    """Read a SuperNode's data settings from its node config.

    Parameters
    ----------
    node_config : Mapping[str, Any]
        Flower's ``context.node_config``. Keys used: ``data-path`` (the file:
        absolute, or relative to ``data-root``), ``data-root`` (optional: the
        folder the file must lie in) and ``hospital`` (optional name).

    Returns
    -------
    NodeData or None
        ``None`` when there is no ``data-path`` (a simulated hospital: its rows
        come from the run configuration's federation).

    Raises
    ------
    ConfigError
        A value of the wrong form, a relative path without ``data-root``, or a
        file outside ``data-root``; each message names the key and the form.
    DataError
        The file does not exist or cannot be read.
    """
    if DATA_PATH not in node_config:
        return None
    raw_path, raw_root, raw_name = (node_config.get(k) for k in (DATA_PATH, DATA_ROOT, HOSPITAL))
    problems = []
    if not isinstance(raw_path, str) or not raw_path.strip():
        problems.append(f"node config `{DATA_PATH}` must name the hospital's data file ({_FORM}), got {raw_path!r}")
    if raw_root is not None and (not isinstance(raw_root, str) or not Path(raw_root).expanduser().is_absolute()):
        problems.append(f"node config `{DATA_ROOT}` must be an absolute folder path, e.g. {DATA_ROOT}=\"/srv/fedfm\", "
                        f"got {raw_root!r}")
    if raw_name is not None and (not isinstance(raw_name, str) or not _NAME.match(raw_name)):
        problems.append(f"node config `{HOSPITAL}` must be a name of letters, digits, '_', '.' and '-', "
                        f"e.g. {HOSPITAL}=\"north\", got {raw_name!r}")
    if problems:
        raise ConfigError(problems)
    path = Path(str(raw_path)).expanduser()
    root = Path(str(raw_root)).expanduser() if raw_root is not None else None
    if root is not None:
        if not root.is_dir():
            raise DataError(f"node config `{DATA_ROOT}` names {str(root)!r}, which is not a folder")
        path = root / path
    elif not path.is_absolute():
        raise ConfigError(
            f"node config `{DATA_PATH}` must be an absolute path, or relative to `{DATA_ROOT}`; got {raw_path!r} "
            f"(e.g. {DATA_PATH}=\"/srv/fedfm/records.csv\", or {DATA_ROOT}=\"/srv/fedfm\" {DATA_PATH}=\"records.csv\")"
        )
    resolved = path.resolve()
    if root is not None and not resolved.is_relative_to(root.resolve()):
        raise ConfigError(
            f"node config `{DATA_PATH}` {raw_path!r} resolves to {str(resolved)!r}, outside `{DATA_ROOT}` "
            f"{str(root.resolve())!r}; this SuperNode reads files inside {DATA_ROOT} only"
        )
    file_format = FORMATS.get(resolved.suffix.lower())
    if file_format is None:
        raise ConfigError(
            f"node config `{DATA_PATH}` {raw_path!r} must end in one of {sorted(FORMATS)} (the suffix picks the "
            f"reader), got {resolved.suffix or 'no suffix'!r}"
        )
    if not resolved.is_file():
        raise DataError(f"node config `{DATA_PATH}` names {str(resolved)!r}, which does not exist or is not a file; "
                        f"start the SuperNode with {_FORM} naming an existing file")
    if not os.access(resolved, os.R_OK):
        raise DataError(f"node config `{DATA_PATH}` names {str(resolved)!r}, which this SuperNode's user "
                        f"(uid {os.getuid()}) may not read")
    return NodeData(path=resolved, name=str(raw_name) if raw_name is not None else resolved.stem, file_format=file_format)


def node_federation(
    node: NodeData,
    *,
    text_column: str = "text",
    label_column: str = "label",
    test_fraction: float = 0.3,
    seed: int = 0,
    max_train_per_hospital: int | None = None,
    max_test: int | None = None,
) -> Federation:
    """The one-hospital federation a SuperNode sees: its own file, split into local train and test.

    The split is stratified and seeded as a simulated hospital's
    (:func:`fedfm.data.split_hospital`). Labels are numbered as in
    :func:`fedfm.data.load_source` (string labels in sorted order), so every
    hospital's file must use the same label names for the classes to line up.

    Parameters
    ----------
    node : NodeData
        From :func:`node_data`.
    text_column, label_column : str
        The file's text and label columns (the run configuration's ``data.text-column`` and
        ``data.label-column``: the same at every hospital).
    test_fraction : float
        Share of rows kept as the local test split.
    seed : int
        Seed of the split and the caps.
    max_train_per_hospital, max_test : int or None
        Caps on the train and test rows.

    Returns
    -------
    Federation
        One hospital named ``node.name``; ``global_test`` is its local test split.
    """
    source = load_source(node.file_format, path=node.path, text_column=text_column, label_column=label_column)
    hospital = split_hospital(
        node.name, source.train, index=0, test_fraction=test_fraction, seed=seed,
        max_train_per_hospital=max_train_per_hospital, max_test=max_test,
    )
    if len(hospital.train) == 0:
        raise DataError(f"{node.path} (node config `{DATA_PATH}`) has no rows to train on")
    return Federation(source=source, hospitals=[hospital], global_test=hospital.test)
