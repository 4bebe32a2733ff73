"""``fedfm predict`` and ``fedfm evaluate`` on a whole file: check everything, load the folder, score, write.

An image classifier's input may also be a folder with one sub-folder of images per class, or one image file.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.errors import DataError
from fedfm.export import ExportSettings
from fedfm.predict.generation import DEFAULT_MAX_NEW_TOKENS, check_max_new_tokens
from fedfm.predict.loader import check_exported, load_exported
from fedfm.predict.output import check_output, write_file, write_table
from fedfm.predict.rows import Rows, read_rows
from fedfm.predict.scoring import Predictions, check_batch_size, evaluate_rows, predict_rows, prediction_table


def _checked_rows(folder: str | Path, input_path: str | Path, *, text_column: str | None,
                  label_column: str | None, need_labels: bool) -> tuple[ExportSettings, Rows]:
    """The folder's settings and the file's rows, both checked (before any model loads)."""
    settings = ExportSettings.read(Path(folder))
    check_exported(folder, settings)  # the folder's own faults first: rows are read by its label names
    rows = read_rows(input_path, settings, text_column=text_column, label_column=label_column, need_labels=need_labels)
    return settings, rows


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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> tuple[Rows, Predictions, ExportSettings]:
    """Check the file, load the exported folder, predict every row and optionally write the predictions.

    Parameters
    ----------
    folder : str or Path
        An exported ``adapter/`` or ``merged/`` folder of a fedfm run.
    input_path : str or Path
        The rows (``.csv``, ``.jsonl``/``.json``, ``.parquet``); an image classifier also takes a folder with one
        sub-folder of images per class, or one image file.
    output : str or Path, optional
        Where to write :func:`prediction_table` (``.csv`` or ``.jsonl``).
    text_column, label_column : str, optional
        Columns other than the ones the model was trained on (an image classifier: ``text_column`` holds the
        image paths).
    base_model : str, optional
        The base model's folder, when fedfm's alias cannot find it.
    batch_size : int
        Rows per forward pass.
    need_labels : bool
        Refuse a file without the label column (evaluation).
    max_new_tokens : int
        An instruction-tuned model: the most tokens of each generated answer.

    Returns
    -------
    tuple
        The checked rows, the predictions and the folder's settings.

    Raises
    ------
    PredictError, GenerationError, DataError, ExportError
        A bad batch size or token count, input or output file, or exported folder: all checked before the model
        loads.
    """
    check_batch_size(batch_size)
    check_max_new_tokens(max_new_tokens)
    if output is not None:
        check_output(output)
    settings, rows = _checked_rows(folder, input_path, text_column=text_column, label_column=label_column,
                                   need_labels=need_labels)
    exported = load_exported(folder, base_model=base_model)
    predictions = predict_rows(exported, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if output is not None:
        write_table(prediction_table(rows, predictions, settings), output)
    return rows, predictions, settings


def evaluate_file(
    folder: str | Path,
    input_path: str | Path,
    *,
    output: str | Path | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    base_model: str | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """fedfm's metrics of an exported model on a labelled file; ``output`` (``.json``) also gets them.

    The keyword arguments are those of :func:`predict_file`. An
    instruction-tuned model is scored on the rows' reference answers, without
    generating (:func:`fedfm.predict.scoring.evaluate_rows`).

    Returns
    -------
    dict
        ``loss``, ``accuracy``, ``macro-f1``, ``weighted-f1`` and ``rows`` (a binary image classifier also
        ``auc``); an instruction-tuned model:
        ``loss``, ``perplexity``, ``token-accuracy`` and ``rows``.
    """
    if output is not None and Path(output).suffix.lower() != ".json":
        raise DataError(f"--output {output}: evaluation metrics are written as JSON, so the suffix must be '.json'")
    file = check_output(output, (".json",)) if output is not None else None
    check_batch_size(batch_size)
    _, rows = _checked_rows(folder, input_path, text_column=text_column, label_column=label_column, need_labels=True)
    exported = load_exported(folder, base_model=base_model)
    metrics = evaluate_rows(exported, rows, batch_size=batch_size)
    if file is not None:
        write_file(file, lambda f: f.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8"))
    return metrics
