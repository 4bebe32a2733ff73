"""``fedfm predict`` and ``fedfm evaluate``: an exported model on every row of a CSV, JSON-lines or Parquet file.

The exported folder's ``fedfm.json`` (:class:`fedfm.export.ExportSettings`)
says how a row becomes the model's input, so nothing but the folder and the
file is needed. Every problem with the file (missing, unknown suffix, absent
column, empty text, unknown label) is reported before any model loads.

Classification rows are scored as fedfm evaluates them: the same tokenizer,
token limit and pooling, the class with the largest logit. Causal-QA rows
(multiple choice) are scored by :meth:`fedfm.tasks.CausalQA.option_log_likelihoods`,
fedfm's own option scoring; the answer is the most likely option.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedfm.data.files import check_texts, normalize_label
from fedfm.errors import DataError, FedfmError
from fedfm.export import HEART_RECORD, MULTIPLE_CHOICE, Exported, ExportSettings
from fedfm.report import unwritable
from fedfm.tasks.metrics import classification_metrics

#: File suffixes ``--input`` and ``--output`` may have.
INPUT_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
OUTPUT_SUFFIXES = (".csv", ".jsonl")


class PredictError(FedfmError, ValueError):
    """``fedfm predict`` / ``fedfm evaluate`` was asked for something it cannot do (a batch size below 1)."""


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` must be an integer of at least 1 (checked before the model loads).

    Raises
    ------
    PredictError
        Naming ``--batch-size`` and the value it got.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise PredictError(f"--batch-size must be an integer >= 1 (rows per forward pass), got {batch_size!r}")
    return int(batch_size)


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
    """

    table: pd.DataFrame
    texts: list[str]
    questions: list[str]
    contexts: list[str]
    options: list[list[str]]
    labels: list[int] | None


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


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _require(table: pd.DataFrame, columns: list[str], where: str, hint: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{where} has no column {missing} ({hint}); columns present: {list(table.columns)}")


def _labels(
    values: list[Any], settings: ExportSettings, where: str, *, options: list[list[str]] | None, graded: bool = False
) -> list[int]:
    """Class ids of a label column: class names, or integer ids; multiple choice also takes the option text."""
    if graded:
        # The UCI table grades disease 0-4 in `num`; fedfm trained on "any disease" (num > 0).
        bad = [v for v in values if _missing(v) or not isinstance(v, (int, float, np.integer, np.floating))]
        if bad:
            raise DataError(f"{where}: the UCI grade must be a number 0-4, got {bad[0]!r}")
        return [int(float(v) > 0) for v in values]
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
        A ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` file.
    settings : ExportSettings
        The exported folder's ``fedfm.json``.
    text_column : str, optional
        The text column (text format); default the one the model was trained on.
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
    from fedfm.export import PREDICTABLE_TASKS

    if settings.task not in PREDICTABLE_TASKS:
        raise DataError(f"fedfm predict and evaluate cover the tasks {list(PREDICTABLE_TASKS)}; "
                        f"the model's task is {settings.task!r}")
    table = read_table(path)
    where = str(path)
    if table.empty:
        raise DataError(f"{where} has no rows")
    texts: list[str] = []
    questions: list[str] = []
    contexts: list[str] = []
    options: list[list[str]] = []
    if settings.input_format == MULTIPLE_CHOICE:
        columns = ["question"] + ([] if settings.fixed_options else ["options"])
        _require(table, columns, where, "multiple-choice rows need question and options; context is optional")
        questions = [str(q) for q in table["question"]]
        contexts = ["" if _missing(c) else str(c) for c in table.get("context", pd.Series([""] * len(table)))]
        if settings.fixed_options and "options" not in table.columns:
            options = [list(settings.fixed_options) for _ in range(len(table))]
        else:
            options = [_options(v, where, row) for row, v in enumerate(table["options"])]
    elif settings.input_format == HEART_RECORD and text_column is None and "text" not in table.columns:
        from fedfm.data.heart import FEATURES
        from fedfm.data.text import heart_row_to_text

        _require(table, FEATURES, where, "a UCI heart-disease record, or pass --text-column with rows already as text")
        gaps = table[FEATURES].isna()
        if gaps.to_numpy().any():
            row = int(gaps.any(axis=1).to_numpy().argmax())
            raise DataError(
                f"{where}: {int(gaps.any(axis=1).sum())} row(s) lack a value in the record columns (first: row {row}, "
                f"column {list(gaps.columns[gaps.iloc[row].to_numpy()])}); the model was trained on complete records "
                f"only: drop those rows first"
            )
        texts = [heart_row_to_text(r) for r in table[FEATURES].to_dict("records")]
    else:
        column = text_column or (settings.text_column if settings.input_format != HEART_RECORD else "text")
        _require(table, [column], where, "the text the model reads; choose another with --text-column")
        values = list(table[column])
        check_texts(values, where=f"{where} column {column!r}")  # as training reads them: non-blank strings
        texts = [str(t) for t in values]
        if settings.context != "none":
            contexts = _sentence_contexts(table, texts, settings.context, where)
    label = label_column or settings.label_column
    if label not in table.columns and settings.input_format == HEART_RECORD and label_column is None \
            and "label" in table.columns:
        label = "label"
    labels = None
    if label in table.columns:
        labels = _labels(list(table[label]), settings, f"{where} column {label!r}",
                         options=options if settings.input_format == MULTIPLE_CHOICE else None,
                         graded=settings.input_format == HEART_RECORD and label == "num")
    elif need_labels:
        raise DataError(
            f"{where} has no label column {label!r} (choose one with --label-column; labels are "
            f"{settings.label_names} or their ids); columns present: {list(table.columns)}"
        )
    return Rows(table=table, texts=texts, questions=questions, contexts=contexts, options=options, labels=labels)


def _sentence_contexts(table: pd.DataFrame, texts: list[str], mode: str, where: str) -> list[str]:
    """Each sentence's context as in training, built from the file's own rows.

    Rows are sentences; ``abstract_id`` groups them into abstracts. A row's
    ``position`` (0-based) and ``num_sentences`` are read when the file has
    those columns, otherwise taken from the order of the abstract's rows in
    the file (:func:`fedfm.data.piboso.with_abstract_columns`, as training reads its files).
    """
    from datasets import Dataset

    from fedfm.data.piboso import ABSTRACT_COLUMN, add_context, with_abstract_columns

    _require(table, [ABSTRACT_COLUMN], where,
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


@dataclass(frozen=True)
class Predictions:
    """What the model said about every row, in file order.

    Attributes
    ----------
    indices : numpy.ndarray
        Predicted class id (multiple choice: option index) per row.
    probabilities : numpy.ndarray
        ``(rows, classes)``; multiple choice: softmax of the options' scores (``0`` past a row's options).
    answers : list of str
        The predicted class name (multiple choice: the chosen option's text).
    loss : float
        Mean cross-entropy of the labels (multiple choice: the right option's mean token NLL); NaN without labels.
    """

    indices: np.ndarray
    probabilities: np.ndarray
    answers: list[str]
    loss: float


@torch.no_grad()
def predict_rows(exported: Exported, rows: Rows, *, batch_size: int = 32) -> Predictions:
    """Run the exported model on checked rows.

    Parameters
    ----------
    exported : Exported
        From :func:`fedfm.export.load_exported`.
    rows : Rows
        From :func:`read_rows`.
    batch_size : int
        Rows per forward pass.

    Returns
    -------
    Predictions

    Raises
    ------
    PredictError
        ``batch_size`` is below 1.
    """
    batch_size = check_batch_size(batch_size)
    if exported.settings.task == "causal-qa":
        return _predict_choice(exported, rows, batch_size=batch_size)
    tokenizer, model, s = exported.tokenizer, exported.model, exported.settings
    order = np.argsort([len(t) for t in rows.texts], kind="stable")  # similar lengths pad less
    logits = torch.zeros(len(rows.texts), len(s.label_names))
    for start in range(0, len(order), batch_size):
        chosen = [int(i) for i in order[start : start + batch_size]]
        texts = [rows.texts[i] for i in chosen]
        if rows.contexts:  # trained on (sentence, context) pairs: encoded exactly as in training
            from fedfm.tasks.sequence_classification import encode_pairs

            pairs = encode_pairs(tokenizer, texts, [rows.contexts[i] for i in chosen], max_length=s.max_length)
            batch = tokenizer.pad(pairs, padding=True, return_tensors="pt")
        else:
            batch = tokenizer(texts, truncation=True, max_length=s.max_length, padding=True, return_tensors="pt")
        out = model(input_ids=batch["input_ids"].to(exported.device),
                    attention_mask=batch["attention_mask"].to(exported.device)).logits.float().cpu()
        logits[chosen] = out
    loss = float("nan")
    if rows.labels is not None:
        loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(rows.labels)))
    indices = logits.argmax(-1).numpy()
    return Predictions(indices, logits.softmax(-1).numpy(), [s.label_names[i] for i in indices], loss)


def _predict_choice(exported: Exported, rows: Rows, *, batch_size: int) -> Predictions:
    import datasets
    from datasets import Dataset

    from fedfm.tasks import CausalQA

    datasets.disable_progress_bars()

    task = CausalQA(length_normalize=exported.settings.length_normalize)
    labels = rows.labels if rows.labels is not None else [0] * len(rows.questions)
    raw = Dataset.from_dict({"question": rows.questions, "context": rows.contexts, "options": rows.options,
                             "label": labels})
    tokenized = task.tokenize(raw, exported.tokenizer, max_length=exported.settings.max_length)
    log_likelihood, n_tokens = task.option_log_likelihoods(
        exported.model, tokenized, exported.tokenizer, batch_size=batch_size, device=exported.device
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = log_likelihood / n_tokens if task.length_normalize else log_likelihood
    scores = np.where(n_tokens > 0, scores, -np.inf)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    indices = scores.argmax(axis=1)
    loss = float("nan")
    if rows.labels is not None:
        at = np.arange(len(labels))
        loss = float(np.mean(-log_likelihood[at, labels] / n_tokens[at, labels]))
    answers = [rows.options[r][int(i)] for r, i in enumerate(indices)]
    return Predictions(indices, probabilities, answers, loss)


def metrics_of(rows: Rows, predictions: Predictions, settings: ExportSettings) -> dict[str, float]:
    """fedfm's metric set (:func:`fedfm.tasks.metrics.classification_metrics`) of labelled rows.

    Raises
    ------
    DataError
        The rows have no labels.
    """
    if rows.labels is None:
        raise DataError("evaluation needs a label column")
    classes = predictions.probabilities.shape[1] if settings.task == "causal-qa" else len(settings.label_names)
    metrics = classification_metrics(np.asarray(rows.labels), predictions.indices, classes, predictions.loss)
    metrics["rows"] = float(len(rows.labels))
    return metrics


def prediction_table(rows: Rows, predictions: Predictions, settings: ExportSettings) -> pd.DataFrame:
    """The input's columns followed by ``prediction`` and one ``probability:<class>`` column per class.

    Multiple choice: ``prediction`` is the chosen option's text, ``prediction_index`` its index and
    ``probability:<letter>`` each option's share.
    """
    table = rows.table.copy()
    table["prediction"] = predictions.answers
    if settings.task == "causal-qa":
        table["prediction_index"] = predictions.indices.astype(int)
        names = [chr(ord("A") + k) for k in range(predictions.probabilities.shape[1])]
    else:
        names = settings.label_names
    for k, name in enumerate(names):
        table[f"probability:{name}"] = predictions.probabilities[:, k]
    return table


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


def _write(file: Path, write: Callable[[Path], object]) -> Path:
    """Create ``file``'s folders and call ``write(file)``; an OS refusal becomes a DataError naming the file."""
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
        return _write(file, lambda f: table.to_csv(f, index=False))
    return _write(file, lambda f: table.to_json(f, orient="records", lines=True, force_ascii=False))


def predict_file(
    folder: str | Path,
    input_path: str | Path,
    *,
    output: str | Path | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    base_model: str | None = None,
    batch_size: int = 32,
    need_labels: bool = False,
) -> tuple[Rows, Predictions, ExportSettings]:
    """Check the file, load the exported folder, predict every row and optionally write the predictions.

    Parameters
    ----------
    folder : str or Path
        An exported ``adapter/`` or ``merged/`` folder of a fedfm run.
    input_path : str or Path
        The rows (``.csv``, ``.jsonl``/``.json``, ``.parquet``).
    output : str or Path, optional
        Where to write :func:`prediction_table` (``.csv`` or ``.jsonl``).
    text_column, label_column : str, optional
        Columns other than the ones the model was trained on.
    base_model : str, optional
        The base model's folder, when fedfm's alias cannot find it.
    batch_size : int
        Rows per forward pass.
    need_labels : bool
        Refuse a file without the label column (evaluation).

    Returns
    -------
    tuple
        The checked rows, the predictions and the folder's settings.

    Raises
    ------
    PredictError, DataError, ExportError
        A bad batch size, input or output file, or exported folder: all checked before the model loads.
    """
    from fedfm.export import check_exported, load_exported

    check_batch_size(batch_size)
    settings = ExportSettings.read(Path(folder))
    check_exported(folder, settings)  # the folder's own faults first: rows are read by its label names
    if output is not None:
        check_output(output)
    rows = read_rows(input_path, settings, text_column=text_column, label_column=label_column, need_labels=need_labels)
    exported = load_exported(folder, base_model=base_model)
    predictions = predict_rows(exported, rows, batch_size=batch_size)
    if output is not None:
        write_table(prediction_table(rows, predictions, settings), output)
    return rows, predictions, settings


def evaluate_file(
    folder: str | Path,
    input_path: str | Path,
    *,
    output: str | Path | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """fedfm's metrics of an exported model on a labelled file; ``output`` (``.json``) also gets them.

    Keyword arguments are those of :func:`predict_file`.

    Returns
    -------
    dict
        ``loss``, ``accuracy``, ``macro-f1``, ``weighted-f1`` and ``rows``.
    """
    if output is not None and Path(output).suffix.lower() != ".json":
        raise DataError(f"--output {output}: evaluation metrics are written as JSON, so the suffix must be '.json'")
    file = check_output(output, (".json",)) if output is not None else None
    rows, predictions, settings = predict_file(folder, input_path, need_labels=True, **kwargs)
    metrics = metrics_of(rows, predictions, settings)
    if file is not None:
        _write(file, lambda f: f.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8"))
    return metrics
