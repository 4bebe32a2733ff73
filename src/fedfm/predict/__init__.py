"""``fedfm predict`` and ``fedfm evaluate``: an exported model on every row of a CSV, JSON-lines or Parquet file.

The exported folder's ``fedfm.json`` (:class:`fedfm.export.ExportSettings`)
says how a row becomes the model's input, so nothing but the folder and the
file is needed. The jobs, one module each:

- :mod:`fedfm.predict.loader`: check an exported folder and load it with
  plain transformers + peft (:func:`load_exported`);
- :mod:`fedfm.predict.rows`: read and check an input file (:func:`read_rows`),
  before any model loads; :mod:`fedfm.predict.tables` reads a CSV, JSON-lines
  or Parquet file (:func:`read_table`), :mod:`fedfm.predict.images` finds an
  image classifier's images (:func:`read_images`: a table of image paths, a
  folder with one sub-folder per class, or one image file);
- :mod:`fedfm.predict.scoring`: score the rows (:func:`predict_rows`; images
  through :class:`fedfm.tasks.ImageClassification`), fedfm's metrics of
  labelled rows (:func:`evaluate_rows`) and the prediction table;
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
from fedfm.predict.images import ImageTable, read_images
from fedfm.predict.loader import Exported, base_model_path, check_exported, load_exported
from fedfm.predict.output import OUTPUT_SUFFIXES, check_output, write_table
from fedfm.predict.rows import Rows, read_rows
from fedfm.predict.scoring import (
    PredictError,
    Predictions,
    check_batch_size,
    evaluate_rows,
    metrics_of,
    predict_rows,
    prediction_table,
)
from fedfm.predict.tables import INPUT_SUFFIXES, read_table

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "Exported",
    "GenerationError",
    "ImageTable",
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
    "read_images",
    "read_rows",
    "read_table",
    "response_metrics",
    "write_table",
]
