"""Generic text-classification files: CSV, JSON lines, Parquet."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from fedfm.data.base import CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.paths import DATA_DIR_ENV
from fedfm.errors import ConfigError, DataError

_READERS: dict[str, Callable[..., Any]] = {
    "csv": datasets.Dataset.from_csv,
    "jsonl": datasets.Dataset.from_json,
    "json": datasets.Dataset.from_json,
    "parquet": datasets.Dataset.from_parquet,
}
FILE_FORMATS = tuple(sorted(_READERS))


def _locate(request: SourceRequest) -> Path:
    if request.path is None:
        raise ConfigError(f"source {request.name!r} reads a file: pass path=<file.{request.name}>")
    path = request.path.expanduser()
    if path.is_file():
        return path
    looked = [str(path.resolve())]
    # A relative path may name a file inside the shared data directory,
    # e.g. "chemprot/train.jsonl".
    if not path.is_absolute() and request.data_dir is not None:
        inside = request.data_dir / path
        if inside.is_file():
            return inside
        looked.append(f"{inside} ({request.data_dir_origin})")
    raise DataError(
        f"cannot find the {request.name} file {str(path)!r}: looked at {' and '.join(looked)}. "
        f"Pass an existing file as path=, or a path relative to ${DATA_DIR_ENV}."
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def encode_labels(
    values: Sequence[Any], label_names: Sequence[str] | None, *, where: str
) -> tuple[list[int], list[str]]:
    """Turn a label column of strings or integers into class ids and class names.

    Parameters
    ----------
    values : Sequence[Any]
        The raw labels.
    label_names : Sequence[str] or None
        Class names in id order. When ``None``, string labels are numbered in
        sorted order and integer labels name themselves (``"0"``, ``"1"``, ...).
    where : str
        File and column, for error messages.

    Returns
    -------
    tuple[list[int], list[str]]
        The ids and the class names.
    """
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise DataError(f"{where}: {len(missing)} row(s) have no label (first: row {missing[0]})")
    if all(isinstance(v, str) for v in values):
        names = list(label_names) if label_names is not None else sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DataError(f"{where}: label(s) {unknown[:10]} are not among the allowed label names {names} "
                            f"(`data.label-names`)")
        return [index[v] for v in values], names
    ids = [_as_int(v) for v in values]
    if any(i is None for i in ids):
        bad = next(v for v, i in zip(values, ids, strict=True) if i is None)
        raise DataError(f"{where}: labels must be all strings or all integers, got {bad!r} ({type(bad).__name__})")
    int_ids = [int(i) for i in ids if i is not None]
    top = max(int_ids, default=-1)
    names = list(label_names) if label_names is not None else [str(i) for i in range(top + 1)]
    out_of_range = sorted({i for i in int_ids if not 0 <= i < len(names)})
    if out_of_range:
        raise DataError(
            f"{where}: label id(s) {out_of_range[:10]} are outside 0..{len(names) - 1}: integer labels are ids "
            f"into the label names {names} (`data.label-names`)"
        )
    return int_ids, names


def load_file(request: SourceRequest) -> SourceData:
    """Load a text-classification file into the standard ``text``/``label`` columns.

    Parameters
    ----------
    request : SourceRequest
        ``name`` picks the reader (``csv``, ``jsonl``/``json``, ``parquet``);
        ``path``, ``text_column``, ``label_column`` and ``label_names`` are used.
        Other columns are kept, except ones already called ``text`` or ``label``
        that are not the chosen columns.

    Returns
    -------
    SourceData
        A classification source without a test split.
    """
    if request.name not in _READERS:
        raise ConfigError(f"no file reader for {request.name!r}; known: {list(FILE_FORMATS)}")
    path = _locate(request)
    try:
        table = _READERS[request.name](str(path), keep_in_memory=True)
    except Exception as exc:  # the readers raise many types (arrow, pandas, json)
        raise DataError(f"cannot read {path} as {request.name}: {exc}") from exc
    present = table.column_names
    missing = [c for c in (request.text_column, request.label_column) if c not in present]
    if missing:
        roles = {request.text_column: "text_column", request.label_column: "label_column"}
        named = ", ".join(f"{roles[c]}={c!r}" for c in missing)
        raise DataError(f"{path} has no column {named}; columns present: {present}")
    where = f"{path} column {request.label_column!r}"
    ids, names = encode_labels(list(table[request.label_column]), request.label_names, where=where)
    texts = list(table[request.text_column])
    empty = [i for i, t in enumerate(texts) if t is None]
    if empty:
        raise DataError(
            f"{path} column {request.text_column!r}: {len(empty)} row(s) have no text (first: row {empty[0]})"
        )
    chosen = {request.text_column, request.label_column}
    clashing = [c for c in ("text", "label") if c in present and c not in chosen]
    table = table.remove_columns([*clashing, request.label_column])
    if request.text_column != "text":
        table = table.rename_column(request.text_column, "text")
    table = table.add_column("label", ids)
    return SourceData(
        name=request.name,
        kind=CLASSIFICATION,
        train=table,
        test=None,
        label_names=names,
        natural_column=None,
    )
