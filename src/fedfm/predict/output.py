"""Writing predictions and metrics: ``--output`` checked before the model loads, folders created on write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fedfm.errors import DataError
from fedfm.report import unwritable

#: File suffixes ``--output`` may have for predictions.
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def check_output(path: str | Path, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> Path:
    """``--output`` must end in one of ``suffixes`` and be writable (checked before the model loads).

    Missing folders on the way are allowed (they are created when the file is written).

    Raises
    ------
    DataError
        Naming ``--output``, the file and what is wrong with it.
    """
    file = Path(path)
    if file.suffix.lower() not in suffixes:
        raise DataError(f"--output {file}: the suffix must be one of {list(suffixes)}, got {file.suffix or 'none'!r}")
    problem = unwritable(file)
    if problem:
        raise DataError(f"--output {file} cannot be written: {problem}; choose another path")
    return file


def write_file(file: Path, write: Callable[[Path], object]) -> Path:
    """Create ``file``'s folders and call ``write(file)``; an OS refusal becomes a DataError naming the file.

    Parameters
    ----------
    file : Path
        The ``--output`` file.
    write : Callable[[Path], object]
        Writes the content to the path it is given.

    Returns
    -------
    Path
        ``file``.

    Raises
    ------
    DataError
        The file or its folders cannot be written.
    """
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write(file)
    except OSError as err:
        raise DataError(f"--output {file} cannot be written: {err.strerror or err}; choose another path") from err
    return file


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write predictions as CSV or JSON lines, by the suffix."""
    file = check_output(path)
    if file.suffix.lower() == ".csv":
        return write_file(file, lambda f: table.to_csv(f, index=False))
    return write_file(file, lambda f: table.to_json(f, orient="records", lines=True, force_ascii=False))
