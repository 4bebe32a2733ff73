"""``fedfm predict`` and ``fedfm evaluate``: an exported model on every row of a CSV, JSON-lines or Parquet file.

The exported folder's ``fedfm.json`` (:class:`fedfm.export.ExportSettings`)
says how a row becomes the model's input, so nothing but the folder and the
file is needed. The jobs, one module each:

- :mod:`fedfm.predict.loader`: check an exported folder and load it with
  plain transformers + peft (:func:`load_exported`);
- :mod:`fedfm.predict.rows`: read and check an input file (:func:`read_rows`),
  before any model loads;
- :mod:`fedfm.predict.scoring`: score the rows (:func:`predict_rows`), fedfm's
  metrics of labelled rows (:func:`evaluate_rows`) and the prediction table;
- :mod:`fedfm.predict.generation`: an instruction-tuned model's answers
  (:func:`generate`: the chat template, left-padded batches, greedy) and its
  loss and perplexity on reference answers;
- :mod:`fedfm.predict.output`: check and write ``--output``;
- :mod:`fedfm.predict.commands`: the two commands on a whole file
  (:func:`predict_file`, :func:`evaluate_file`).
"""

from __future__ import annotations

from fedfm.predict.commands import evaluate_file, predict_file
from fedfm.predict.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationError,
    generate,
    greedy_continuations,
    response_metrics,
)
from fedfm.predict.loader import Exported, base_model_path, check_exported, load_exported
from fedfm.predict.output import OUTPUT_SUFFIXES, check_output, write_table
from fedfm.predict.rows import INPUT_SUFFIXES, Rows, read_rows, read_table
from fedfm.predict.scoring import (
    PredictError,
    Predictions,
    check_batch_size,
    evaluate_rows,
    metrics_of,
    predict_rows,
    prediction_table,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "Exported",
    "GenerationError",
    "PredictError",
    "Predictions",
    "Rows",
    "base_model_path",
    "check_batch_size",
    "check_exported",
    "check_output",
    "evaluate_file",
    "evaluate_rows",
    "generate",
    "greedy_continuations",
    "load_exported",
    "metrics_of",
    "predict_file",
    "predict_rows",
    "prediction_table",
    "read_rows",
    "read_table",
    "response_metrics",
    "write_table",
]
