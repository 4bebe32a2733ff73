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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from fedfm.config import HOSPITAL_FILE_SUFFIXES, HOSPITAL_NAME
from fedfm.data.base import CLASSIFICATION, IMAGE, SourceData
from fedfm.data.federation import Federation, HospitalData, cap_global_test, split_hospital, with_context
from fedfm.data.piboso import with_abstract_columns
from fedfm.data.sources import load_source
from fedfm.errors import ConfigError, DataError

#: Node-config key of the hospital's data file.
DATA_PATH = "data-path"
#: Node-config key of the folder the data file must lie in.
DATA_ROOT = "data-root"
#: Node-config key of the hospital's name (default: the data file's stem).
HOSPITAL = "hospital"

#: File suffixes a hospital's file may have, and the reader each selects.
FORMATS = {suffix: suffix[1:] for suffix in HOSPITAL_FILE_SUFFIXES}

_FORM = f'--node-config \'{DATA_PATH}="/path/to/records.csv" {HOSPITAL}="north"\''


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
    if raw_name is not None and (not isinstance(raw_name, str) or not HOSPITAL_NAME.match(raw_name)):
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
    label_names: Sequence[str] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    max_train_per_hospital: int | None = None,
    max_test: int | None = None,
    validation_fraction: float = 0.0,
    context: str = "none",
    kind: str = CLASSIFICATION,
) -> Federation:
    """The one-hospital federation a SuperNode sees: its own file, split into local train and test.

    The split is stratified and seeded as a simulated hospital's
    (:func:`fedfm.data.split_hospital`). Labels are numbered by ``label_names``
    (the run's ``data.label-names``), the same list at every hospital, so a
    hospital without one of the classes still builds the same classifier.

    Parameters
    ----------
    node : NodeData
        From :func:`node_data`.
    text_column, label_column : str
        The file's text and label columns (the run configuration's ``data.text-column`` and
        ``data.label-column``: the same at every hospital).
    label_names : Sequence[str] or None
        Class names in label-id order; a string label not among them is an error naming
        the file. ``None`` numbers string labels in sorted order.
    test_fraction : float
        Share of rows kept as the local test split.
    seed : int
        Seed of the split and the caps.
    max_train_per_hospital, max_test : int or None
        Caps on the train and test rows.
    validation_fraction : float
        Share of the train rows held out as the hospital's validation split; 0 keeps none.
    context : str
        ``data.context``. Other than ``"none"``, the file's rows are sentences
        with an ``abstract_id`` (in reading order; ``position`` and
        ``num_sentences`` optional): abstracts stay whole on one side of the
        split and each side's contexts come from its own rows, as in a simulation.
    kind : str
        The rows the task reads (:attr:`fedfm.tasks.Task.data_kind`): ``image`` reads a table of image paths,
        relative to the table's folder.

    Returns
    -------
    Federation
        One hospital named ``node.name``; ``global_test`` is its local test split.
    """
    source = load_source(node.file_format, path=node.path, text_column=text_column, label_column=label_column,
                         label_names=label_names, kind=kind)
    rows = source.train if context == "none" else with_abstract_columns(source.train, str(node.path))
    hospital = split_hospital(
        node.name, rows, index=0, test_fraction=test_fraction, seed=seed,
        max_train_per_hospital=max_train_per_hospital, max_test=max_test, validation_fraction=validation_fraction,
        context=context,
    )
    if len(hospital.train) == 0:
        raise DataError(f"{node.path} (node config `{DATA_PATH}`) has no rows to train on")
    return Federation(source=source, hospitals=[hospital], global_test=hospital.test)


def deployment_federation(
    hospitals: Sequence[str],
    *,
    label_names: Sequence[str],
    test_path: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    max_test: int | None = None,
    context: str = "none",
    kind: str = CLASSIFICATION,
) -> Federation:
    """The coordinator's view of a deployment: the hospitals by name, without their rows.

    Each hospital's rows stay on its SuperNode (:func:`node_federation`); the
    server knows only the names (``data.hospitals``) and the classes
    (``data.label-names``), and scores the global adapter on ``test_path``, a
    labelled file it holds, when one is given.

    Parameters
    ----------
    hospitals : Sequence[str]
        The hospitals' names in index order.
    label_names : Sequence[str]
        Class names in label-id order.
    test_path : str or Path or None
        The global test file (``.csv``, ``.jsonl``/``.json`` or ``.parquet``); ``None`` for no global test set.
    text_column, label_column : str
        The test file's text and label columns.
    seed : int
        Seed of the ``max_test`` sample.
    max_test : int or None
        Cap on the global test rows.
    context : str
        ``data.context``; other than ``"none"`` the test file's sentences are
        read with their context, built from the whole file before the cap.
    kind : str
        The rows the task reads: ``image`` reads the test file as a table of image paths.

    Returns
    -------
    Federation
        Hospitals with empty train and test splits; ``global_test`` is the whole test file, or empty.
    """
    if not hospitals or not label_names:
        raise ConfigError(f"a deployment needs hospital names and label names, got {list(hospitals)} and "
                          f"{list(label_names)}")
    empty = Dataset.from_dict({"image" if kind == IMAGE else "text": [], "label": []})
    if test_path is not None:
        suffix = Path(test_path).suffix.lower()
        if suffix not in FORMATS:
            raise ConfigError(f"`data.path` {str(test_path)!r} must end in one of {sorted(FORMATS)} (the suffix "
                              f"picks the reader), got {suffix or 'no suffix'!r}")
        test = load_source(FORMATS[suffix], path=test_path, text_column=text_column, label_column=label_column,
                           label_names=label_names, kind=kind).train
        global_test = cap_global_test(with_context(test, context, str(test_path)), max_test, seed)
    else:
        global_test = empty
    source = SourceData(name="deployment", kind=kind, train=empty, test=global_test,
                        label_names=list(label_names))
    return Federation(
        source=source,
        hospitals=[HospitalData(name=name, train=empty, test=empty) for name in hospitals],
        global_test=global_test,
    )
