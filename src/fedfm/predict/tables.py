"""An input file read as a table: CSV, JSON lines or Parquet, and the columns a reader needs from it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedfm.errors import DataError

#: File suffixes ``--input`` may have.
INPUT_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV, JSON-lines (``.jsonl``/``.json``) or Parquet file as a data frame.

    Raises
    ------
    DataError
        The file is missing, its suffix is not one of :data:`INPUT_SUFFIXES`, or it cannot be read.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(f"--input {file}: the suffix must be one of {list(INPUT_SUFFIXES)}, got {suffix or 'none'!r}")
    if file.is_dir():
        raise DataError(f"--input {file} is a folder: give one file")
    if not file.is_file():
        raise DataError(f"--input {file}: no such file")
    try:
        if suffix == ".csv":
            return pd.read_csv(file, encoding="utf-8")
        if suffix == ".parquet":
            return pd.read_parquet(file)
        return pd.read_json(file, lines=True, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--input {file} is not UTF-8 text ({err}): save it with UTF-8 encoding and try again") from err
    except Exception as err:  # pandas raises many types (parser, arrow, json)
        raise DataError(f"cannot read {file} as {suffix[1:]}: {err}") from err


def require_columns(table: pd.DataFrame, columns: list[str], where: str, hint: str) -> None:
    """Refuse a table that lacks any of ``columns``.

    Parameters
    ----------
    table : pandas.DataFrame
        The rows read.
    columns : list of str
        The columns needed.
    where : str
        Names the file in the message.
    hint : str
        What the columns hold and how to choose others.

    Raises
    ------
    DataError
        Naming the missing columns and the columns present.
    """
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{where} has no column {missing} ({hint}); columns present: {list(table.columns)}")
