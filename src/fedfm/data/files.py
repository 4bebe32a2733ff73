"""Files of one's own: CSV, JSON lines, Parquet, read as the rows a task needs.

Text classification is read here; other kinds of rows (multiple choice,
instruction pairs, ...) register their reader with :func:`register_file_kind`.
"""

from __future__ import annotations

import codecs
import json
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
#: Formats read as text, which must be UTF-8 (Parquet stores its own strings).
_TEXT_FORMATS = ("csv", "jsonl", "json")
#: Rows named in a message before "and N more".
_SHOWN_ROWS = 5


def locate_file(request: SourceRequest) -> Path:
    """The file ``request.path`` names: as given, else inside the data directory (``chemprot/train.jsonl``).

    Parameters
    ----------
    request : SourceRequest
        ``path``, ``data_dir`` and ``data_dir_origin`` are used.

    Returns
    -------
    Path
        An existing file.

    Raises
    ------
    ConfigError
        ``request.path`` is not set.
    DataError
        No such file, naming every place looked at.
    """
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


def read_json(path: Path) -> Any:
    """The JSON document in ``path`` (UTF-8), or one DataError naming the file and where it is broken."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


def check_utf8(path: str | Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line and the first bad byte.

    The readers would otherwise fail deep inside pandas or pyarrow, or (JSON lines)
    accept the bytes and fail later when a row is read.

    Parameters
    ----------
    path : str or Path
        A CSV or JSON-lines file.

    Raises
    ------
    DataError
        The file is not UTF-8 text.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, newline = 0, 1, b"\n"
    with open(path, "rb") as stream:
        while True:
            chunk = stream.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.object is the up to 3 bytes the decoder still held, then this chunk.
                at = err.start - (len(err.object) - len(chunk))
                raise DataError(
                    f"{path} is not UTF-8 text (line {lines + chunk[:max(at, 0)].count(newline)}, byte offset {offset + at}: "
                    f"{err.object[err.start]:#04x}); save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old > new`)"
                ) from err
            if not chunk:
                return
            offset += len(chunk)
            lines += chunk.count(newline)


def _rows(indices: Sequence[int]) -> str:
    """``"row 3"`` or ``"rows 3, 8, 9 and 12 more"``."""
    shown = ", ".join(str(i) for i in indices[:_SHOWN_ROWS])
    more = f" and {len(indices) - _SHOWN_ROWS} more" if len(indices) > _SHOWN_ROWS else ""
    return f"row{'s' if len(indices) > 1 else ''} {shown}{more}"


#: Why one class is refused, and what to do.
ONE_CLASS = ("a classifier needs at least two classes (with one it learns nothing and scores accuracy 1.0): check "
             "`data.label-column`, or add rows of the other classes")
#: Appended to messages that name rows, so nobody counts the header or from 1.
ROWS_COUNTED = "rows counted from 0, a CSV header not counted"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_texts(values: Sequence[Any], *, where: str) -> None:
    """Refuse text cells that are missing, blank, or not strings.

    A list is not read as a sentence pair and a number is not text: each must be
    a string with something in it.

    Parameters
    ----------
    values : Sequence[Any]
        The text column.
    where : str
        File and column, for the message.

    Raises
    ------
    DataError
        Naming ``where``, the rows and, for a wrong type, the type found.
    """
    missing = [i for i, v in enumerate(values) if _missing(v)]
    wrong = [i for i, v in enumerate(values) if not _missing(v) and not isinstance(v, str)]
    blank = [i for i, v in enumerate(values) if isinstance(v, str) and not v.strip()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} row(s) have no text ({_rows(missing)})")
    if wrong:
        first = values[wrong[0]]
        problems.append(
            f"{len(wrong)} row(s) hold {type(first).__name__} values, not strings ({_rows(wrong)}; row {wrong[0]} "
            f"is {first!r}): text cells must be strings (a list is not a sentence pair, a number is not text; "
            f"check `data.text-column`)"
        )
    if blank:
        problems.append(f"{len(blank)} row(s) have empty text ({_rows(blank)}); drop or fill them")
    if problems:
        raise DataError(f"{where}: {'; '.join(problems)} ({ROWS_COUNTED})")


def normalize_label(value: Any) -> Any:
    """A label cell as it is compared with class names: strings stripped, blank or NaN as None.

    ``"yes "`` and ``"yes"`` are one class; a cell of spaces has no label.

    Parameters
    ----------
    value : Any
        A raw label cell.

    Returns
    -------
    Any
        The stripped string, None for a missing or blank cell, else ``value`` unchanged.
    """
    if _missing(value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    return value


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
    values = [normalize_label(v) for v in values]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise DataError(f"{where}: {len(missing)} row(s) have no label ({_rows(missing)}; {ROWS_COUNTED})")
    if all(isinstance(v, str) for v in values):
        names = list(label_names) if label_names is not None else sorted(set(values))
        index = {name.strip(): i for i, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DataError(f"{where}: label(s) {unknown[:10]} are not among the allowed label names {names} "
                            f"(`data.label-names`)")
        return [index[v] for v in values], names
    ids = [_as_int(v) for v in values]
    if any(i is None for i in ids):
        row = next(r for r, i in enumerate(ids) if i is None)
        bad = values[row]
        raise DataError(f"{where}: labels must be all strings or all integers, got {bad!r} ({type(bad).__name__}) "
                        f"in row {row} ({ROWS_COUNTED})")
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


#: Turns a file's table into a source of one kind of rows: ``(request, table, path) -> SourceData``.
KindReader = Callable[[SourceRequest, datasets.Dataset, Path], SourceData]
_KIND_READERS: dict[str, KindReader] = {}


def register_file_kind(kind: str, reader: KindReader) -> None:
    """Make the generic file formats read rows of ``kind`` (a task's ``data_kind``) with ``reader``.

    Parameters
    ----------
    kind : str
        The kind of rows, e.g. ``"instruction"``.
    reader : KindReader
        Turns the file's table (already read, UTF-8 checked) into a :class:`SourceData` of that kind.
    """
    _KIND_READERS[kind] = reader


def load_file(request: SourceRequest) -> SourceData:
    """Load a CSV, JSON-lines or Parquet file into the standard columns of ``request.kind``.

    Parameters
    ----------
    request : SourceRequest
        ``name`` picks the reader (``csv``, ``jsonl``/``json``, ``parquet``),
        ``kind`` the rows it must hold (a reader registered with
        :func:`register_file_kind`; text classification by default).

    Returns
    -------
    SourceData
        A source of that kind without a test split.
    """
    if request.name not in _READERS:
        raise ConfigError(f"no file reader for {request.name!r}; known: {list(FILE_FORMATS)}")
    if request.kind not in _KIND_READERS:
        raise ConfigError(f"a {request.name} file cannot be read as {request.kind!r} rows; kinds read from files: "
                          f"{sorted(_KIND_READERS)}")
    path = locate_file(request)
    if request.name in _TEXT_FORMATS:
        check_utf8(path)
    try:
        table = _READERS[request.name](str(path), keep_in_memory=True)
    except Exception as exc:  # the readers raise many types (arrow, pandas, json)
        raise DataError(f"cannot read {path} as {request.name}: {exc}") from exc
    return _KIND_READERS[request.kind](request, table, path)


def classification_file(request: SourceRequest, table: datasets.Dataset, path: Path) -> SourceData:
    """A text-classification file's table in the standard ``text``/``label`` columns.

    ``text_column``, ``label_column`` and ``label_names`` of ``request`` are
    used. Other columns are kept, except ones already called ``text`` or
    ``label`` that are not the chosen columns.
    """
    present = table.column_names
    missing = [c for c in (request.text_column, request.label_column) if c not in present]
    if missing:
        roles = {request.text_column: "text_column", request.label_column: "label_column"}
        named = ", ".join(f"{roles[c]}={c!r}" for c in missing)
        raise DataError(f"{path} has no column {named}; columns present: {present}")
    where = f"{path} column {request.label_column!r}"
    check_texts(list(table[request.text_column]), where=f"{path} column {request.text_column!r}")
    ids, names = encode_labels(list(table[request.label_column]), request.label_names, where=where)
    if not ids:
        raise DataError(f"{path} has no rows")
    if request.label_names is None and len(set(ids)) < 2:
        # With `data.label-names` a hospital's own file may lack classes; a federation is checked as a whole.
        raise DataError(f"{where}: every row has the label {names[ids[0]]!r}; {ONE_CLASS}")
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


register_file_kind(CLASSIFICATION, classification_file)
