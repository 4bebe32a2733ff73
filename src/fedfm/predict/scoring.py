"""Scoring checked rows with a loaded exported model, and fedfm's metrics and prediction table of the result.

Classification rows are scored as fedfm evaluates them: the same tokenizer,
token limit and pooling, the class with the largest logit. Images are scored
by :class:`fedfm.tasks.ImageClassification` itself, with the folder's image
processor, as the hospitals score their test images. Causal-QA rows
(multiple choice) are scored by :meth:`fedfm.tasks.CausalQA.option_log_likelihoods`,
fedfm's own option scoring; the answer is the most likely option. Conversations
(an instruction-tuned model) are answered by generation and scored on their
reference answers (:mod:`fedfm.predict.generation`). Which of these applies is
the folder's input format's kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from fedfm.data.base import IMAGE, INSTRUCTION, MULTIPLE_CHOICE
from fedfm.data.formats import input_format
from fedfm.data.images import image_rows
from fedfm.errors import DataError, FedfmError
from fedfm.export import ExportSettings
from fedfm.predict.generation import DEFAULT_MAX_NEW_TOKENS, generate, response_metrics
from fedfm.predict.loader import Exported
from fedfm.predict.rows import Rows
from fedfm.tasks import ImageClassification
from fedfm.tasks.metrics import classification_metrics

if TYPE_CHECKING:
    from datasets import Dataset


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
class Predictions:
    """What the model said about every row, in file order.

    Attributes
    ----------
    indices : numpy.ndarray
        Predicted class id (multiple choice: option index) per row; generation: empty.
    probabilities : numpy.ndarray
        ``(rows, classes)``; multiple choice: softmax of the options' scores (``0`` past a row's options);
        generation: ``(rows, 0)``.
    answers : list of str
        The predicted class name (multiple choice: the chosen option's text; generation: the generated answer).
    loss : float
        Mean cross-entropy of the labels (multiple choice: the right option's mean token NLL); NaN without labels
        and for generation.
    """

    indices: np.ndarray
    probabilities: np.ndarray
    answers: list[str]
    loss: float


def _kind(settings: ExportSettings) -> str:
    return input_format(settings.input_format).kind


@torch.no_grad()
def predict_rows(exported: Exported, rows: Rows, *, batch_size: int = 32,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Predictions:
    """Run the exported model on checked rows.

    Parameters
    ----------
    exported : Exported
        From :func:`fedfm.predict.load_exported`.
    rows : Rows
        From :func:`read_rows`.
    batch_size : int
        Rows per forward pass.
    max_new_tokens : int
        Generation: the most tokens of an answer.

    Returns
    -------
    Predictions

    Raises
    ------
    PredictError
        ``batch_size`` is below 1.
    """
    batch_size = check_batch_size(batch_size)
    kind = _kind(exported.settings)
    if kind == INSTRUCTION:
        answers = generate(exported, rows.prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
        return Predictions(np.zeros(0, dtype=int), np.zeros((len(answers), 0)), answers, float("nan"))
    if kind == MULTIPLE_CHOICE:
        return _predict_choice(exported, rows, batch_size=batch_size)
    if kind == IMAGE:
        return _predict_images(exported, rows, batch_size=batch_size)
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


def _image_dataset(rows: Rows) -> Dataset:
    """The rows as :class:`fedfm.tasks.ImageClassification` scores them (class 0 where a row has no label)."""
    labels = rows.labels if rows.labels is not None else [0] * len(rows.images)
    return ImageClassification().tokenize(image_rows(rows.images, labels), None, max_length=0)


def _predict_images(exported: Exported, rows: Rows, *, batch_size: int) -> Predictions:
    """Each image's class probabilities, scored as the hospitals score their test images."""
    labels, logits = ImageClassification().score(exported.model, _image_dataset(rows), exported.tokenizer,
                                                  batch_size=batch_size, device=exported.device)
    loss = float(torch.nn.functional.cross_entropy(logits, labels)) if rows.labels is not None else float("nan")
    indices = logits.argmax(-1).numpy()
    names = exported.settings.label_names
    return Predictions(indices, logits.softmax(-1).numpy(), [names[i] for i in indices], loss)


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


def evaluate_rows(exported: Exported, rows: Rows, *, batch_size: int = 32) -> dict[str, float]:
    """fedfm's metrics of labelled rows (generation: of the reference answers, without generating).

    Parameters
    ----------
    exported : Exported
        From :func:`fedfm.predict.load_exported`.
    rows : Rows
        From :func:`read_rows` with ``need_labels=True``.
    batch_size : int
        Rows per forward pass.

    Returns
    -------
    dict
        Classifiers: ``loss``, ``accuracy``, ``macro-f1``, ``weighted-f1``, ``rows`` (a binary image classifier
        also ``auc``); generation: ``loss``, ``perplexity``, ``token-accuracy``, ``rows``.

    Raises
    ------
    DataError
        The rows have no labels (no reference answers).
    """
    kind = _kind(exported.settings)
    if kind == INSTRUCTION:
        if rows.references is None:
            raise DataError("evaluation needs a reference answer on every row")
        return response_metrics(exported, rows.prompts, rows.references, batch_size=check_batch_size(batch_size))
    if kind == IMAGE:  # the hospitals' own evaluation: also the ROC AUC of a binary classifier
        if rows.labels is None:
            raise DataError("evaluation needs a label for every image")
        metrics = ImageClassification().evaluate(exported.model, _image_dataset(rows), exported.tokenizer,
                                                 batch_size=check_batch_size(batch_size), device=exported.device)
        return {**metrics, "rows": float(len(rows.labels))}
    return metrics_of(rows, predict_rows(exported, rows, batch_size=batch_size), exported.settings)


def prediction_table(rows: Rows, predictions: Predictions, settings: ExportSettings) -> pd.DataFrame:
    """The input's columns followed by ``prediction`` and one ``probability:<class>`` column per class.

    Multiple choice: ``prediction`` is the chosen option's text, ``prediction_index`` its index and
    ``probability:<letter>`` each option's share. Generation: the input's columns and ``response``.
    """
    table = rows.table.copy()
    kind = _kind(settings)
    if kind == INSTRUCTION:
        table["response"] = predictions.answers
        return table
    table["prediction"] = predictions.answers
    if kind == MULTIPLE_CHOICE:
        table["prediction_index"] = predictions.indices.astype(int)
        names = [chr(ord("A") + k) for k in range(predictions.probabilities.shape[1])]
    else:
        names = settings.label_names
    for k, name in enumerate(names):
        table[f"probability:{name}"] = predictions.probabilities[:, k]
    return table
