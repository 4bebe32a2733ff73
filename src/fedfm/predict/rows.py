"""Reading an input file for an exported model: every row checked and turned into the model's input.

The exported folder's ``fedfm.json`` (:class:`fedfm.export.ExportSettings`)
says how a row becomes the model's input. Every problem with the file
(missing, unknown suffix, absent column, empty text, unknown label, an image
file missing or unreadable) is reported before any model loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedfm.data.base import IMAGE, MULTIPLE_CHOICE
from fedfm.data.files import check_texts, normalize_label
from fedfm.data.formats import input_format
from fedfm.errors import DataError
from fedfm.export import PREDICTABLE_TASKS, ExportSettings
from fedfm.export.conversation import PROMPT_COLUMNS, ConversationInput
from fedfm.predict.images import read_images
from fedfm.predict.tables import read_table, require_columns


@dataclass(frozen=True)
class Rows:
    """An input file's rows in the model's form, checked.

    Attributes
    ----------
    table : pandas.DataFrame
        The file as read (its columns are copied into the predictions).
    texts : list of str
        Classification: each row's model text.
    questions, contexts : list of str
        Multiple choice: each row's question and context. Classification of
        a model trained with ``data.context``: ``contexts`` holds each
        sentence's context text (empty otherwise).
    options : list of list of str
        Multiple choice: each row's options.
    labels : list of int, optional
        Class ids (option indices), when the file has a label column.
    prompts : list of list of dict
        Generation: each row's conversation up to the answer to generate
        (``{"role", "content"}`` turns, the last one never the assistant's).
    references : list of str, optional
        Generation: each row's reference answer, when every row has one (what ``evaluate`` scores).
    images : list of str
        Image classification: each row's image file (an absolute path).
    """

    table: pd.DataFrame
    texts: list[str]
    questions: list[str]
    contexts: list[str]
    options: list[list[str]]
    labels: list[int] | None
    prompts: list[list[dict[str, str]]] = field(default_factory=list)
    references: list[str] | None = None
    images: list[str] = field(default_factory=list)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _labels(
    values: list[Any], settings: ExportSettings, where: str, *, options: list[list[str]] | None
) -> list[int]:
    """Class ids of a label column: class names, or integer ids; multiple choice also takes the option text."""
    names = [n.strip() for n in settings.label_names]
    ids: list[int] = []
    for row, raw in enumerate(values):
        value = normalize_label(raw)  # as training reads labels: surrounding spaces dropped, blank is missing
        if value is None:
            raise DataError(f"{where}: row {row} has no label")
        if isinstance(value, str) and value in names:
            ids.append(names.index(value))
        elif isinstance(value, str) and options is not None and value.strip() in [o.strip() for o in options[row]]:
            ids.append([o.strip() for o in options[row]].index(value.strip()))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                and float(value).is_integer() and 0 <= int(value) < (len(options[row]) if options else len(names)):
            ids.append(int(value))
        else:
            allowed = f"one of {names} or an id 0..{len(names) - 1}" if options is None \
                else f"an option index, an option's text or one of {names}"
            raise DataError(f"{where}: row {row} has label {value!r}; allowed: {allowed}")
    return ids


def read_rows(
    path: str | Path,
    settings: ExportSettings,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    need_labels: bool = False,
) -> Rows:
    """Read and check an input file for an exported model, before the model loads.

    Parameters
    ----------
    path : str or Path
        A ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` file; an image classifier also takes a folder with one
        sub-folder per class or one image file (:func:`fedfm.predict.images.read_images`).
    settings : ExportSettings
        The exported folder's ``fedfm.json``.
    text_column : str, optional
        The text column (text format; image format: the column of image paths); default the one the model was
        trained on.
    label_column : str, optional
        The label column; default the one the model was trained on.
    need_labels : bool
        Raise when the label column is absent (``evaluate``); otherwise labels are read only if present.

    Returns
    -------
    Rows

    Raises
    ------
    DataError
        Naming the file, the column and what is allowed.
    """
    if settings.task not in PREDICTABLE_TASKS:
        raise DataError(f"fedfm predict and evaluate cover the tasks {list(PREDICTABLE_TASKS)}; "
                        f"the model's task is {settings.task!r}")
    fmt = input_format(settings.input_format)  # how the dataset's rows become the model's input
    images: list[str] = []
    if fmt.kind == IMAGE:  # a table of image paths, a folder of class folders, or one image
        found = read_images(path, settings, image_column=text_column, label_column=label_column,
                            need_labels=need_labels)
        table, images = found.table, found.images
    else:
        table = read_table(path)
    where = str(path)
    if table.empty:
        raise DataError(f"{where} has no rows")
    if isinstance(fmt, ConversationInput):
        return _conversations(table, fmt, where, need_labels=need_labels)
    texts: list[str] = []
    questions: list[str] = []
    contexts: list[str] = []
    options: list[list[str]] = []
    if fmt.kind == MULTIPLE_CHOICE:
        columns = ["question"] + ([] if settings.fixed_options else ["options"])
        require_columns(table, columns, where, "multiple-choice rows need question and options; context is optional")
        questions = [str(q) for q in table["question"]]
        contexts = ["" if _missing(c) else str(c) for c in table.get("context", pd.Series([""] * len(table)))]
        if settings.fixed_options and "options" not in table.columns:
            options = [list(settings.fixed_options) for _ in range(len(table))]
        else:
            options = [_options(v, where, row) for row, v in enumerate(table["options"])]
    elif fmt.kind == IMAGE:
        pass  # the images were found and checked above
    elif fmt.record_columns and text_column is None and fmt.text_column not in table.columns:
        records = list(fmt.record_columns)
        require_columns(table, records, where, f"{fmt.record_name}, or pass --text-column with rows already as text")
        gaps = table[records].isna()
        if gaps.to_numpy().any():
            row = int(gaps.any(axis=1).to_numpy().argmax())
            raise DataError(
                f"{where}: {int(gaps.any(axis=1).sum())} row(s) lack a value in the record columns (first: row {row}, "
                f"column {list(gaps.columns[gaps.iloc[row].to_numpy()])}); the model was trained on complete records "
                f"only: drop those rows first"
            )
        texts = [fmt.record_text(r) for r in table[records].to_dict("records")]
    else:
        column = text_column or fmt.text_column or settings.text_column
        require_columns(table, [column], where, "the text the model reads; choose another with --text-column")
        values = list(table[column])
        check_texts(values, where=f"{where} column {column!r}")  # as training reads them: non-blank strings
        texts = [str(t) for t in values]
        if settings.context != "none":
            contexts = _sentence_contexts(table, texts, settings.context, where)
    label = label_column or settings.label_column
    fallback = fmt.fallback_label_column
    if label not in table.columns and label_column is None and fallback is not None and fallback in table.columns:
        label = fallback
    labels = None
    if label in table.columns:
        where_label = f"{where} column {label!r}"
        labels = fmt.graded_labels(label, list(table[label]), where_label)
        if labels is None:
            labels = _labels(list(table[label]), settings, where_label,
                             options=options if fmt.kind == MULTIPLE_CHOICE else None)
    elif need_labels:
        raise DataError(
            f"{where} has no label column {label!r} (choose one with --label-column; labels are "
            f"{settings.label_names} or their ids); columns present: {list(table.columns)}"
        )
    return Rows(table=table, texts=texts, questions=questions, contexts=contexts, options=options, labels=labels,
                images=images)


def _conversations(table: pd.DataFrame, fmt: ConversationInput, where: str, *, need_labels: bool) -> Rows:
    """Rows of prompts (a generative model's input), each checked as training checks its conversations."""
    column = fmt.columns_of(list(table.columns))
    if column is None:
        raise DataError(f"{where} has none of the columns {list(PROMPT_COLUMNS)} (`prompt`: a question; `messages`: "
                        f"a list of {{\"role\", \"content\"}} turns; `instruction` (+ `input`): Alpaca rows); "
                        f"columns present: {list(table.columns)}")
    prompts, references = [], []
    for row, record in enumerate(table.to_dict("records")):
        turns, reference = fmt.conversation(record, f"{where} row {row}")
        if need_labels and reference is None:
            raise DataError(f"{where} row {row} has no reference answer to score: give `messages` ending with the "
                            f"assistant's turn, or Alpaca rows with `output`")
        prompts.append(turns)
        references.append(reference)
    known = [r for r in references if r is not None]
    return Rows(table=table, texts=[], questions=[], contexts=[], options=[], labels=None, prompts=prompts,
                references=known if len(known) == len(references) else None)


def _sentence_contexts(table: pd.DataFrame, texts: list[str], mode: str, where: str) -> list[str]:
    """Each sentence's context as in training, built from the file's own rows.

    Rows are sentences; ``abstract_id`` groups them into abstracts. A row's
    ``position`` (0-based) and ``num_sentences`` are read when the file has
    those columns, otherwise taken from the order of the abstract's rows in
    the file (:func:`fedfm.data.piboso.with_abstract_columns`, as training reads its files).
    """
    from datasets import Dataset

    from fedfm.data.piboso import ABSTRACT_COLUMN, add_context, with_abstract_columns

    require_columns(table, [ABSTRACT_COLUMN], where,
             f"the model reads each sentence with its context {mode!r}: one row per sentence, in its abstract's "
             f"order, with the abstract's id (optional: position from 0, num_sentences)")
    columns: dict[str, list[Any]] = {"text": texts}
    for name in (ABSTRACT_COLUMN, "position", "num_sentences"):
        if name in table.columns:
            columns[name] = [None if _missing(v) else v for v in table[name].tolist()]
    rows = with_abstract_columns(Dataset.from_dict(columns), where)
    return list(add_context(rows, mode)["context"])


def _options(value: Any, where: str, row: int) -> list[str]:
    """A row's options: a list (JSON lines, Parquet) or a JSON list in a CSV cell."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) >= 2:
        return [str(v) for v in value]
    raise DataError(f"{where} column 'options': row {row} must hold a list of at least two answers "
                    f"(in a CSV, as JSON: [\"yes\", \"no\"]), got {value!r}")
