"""Token classification (named-entity recognition) with an encoder and a per-token head.

Rows are sentences already split into words (``tokens``) with one BIO tag id
per word (``tags``, a ``ClassLabel`` sequence naming the tags). Each word's
tag goes on its first sub-word token; its other sub-word tokens and the special
tokens get ``-100`` and are ignored by the loss.

Nothing is truncated away: a sentence longer than ``model.max-length``
sub-word tokens is cut, at word boundaries, into consecutive windows that each
fit, and evaluation joins the windows' word predictions back into the whole
sentence before it extracts entities. An entity that straddles two windows is
therefore still scored as one span (the model just sees less context around it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, List, Value
from transformers import AutoModelForTokenClassification

from fedfm import interrupt
from fedfm.errors import ModelError
from fedfm.tasks.base import Task
from fedfm.tasks.metrics import entity_scores, macro_f1, weighted_f1

#: Label of positions the loss and the metrics skip (torch's default ``ignore_index``).
IGNORE = -100


def word_windows(counts: list[int], budget: int) -> list[tuple[int, int]]:
    """Cut a sentence into consecutive word ranges of at most ``budget`` sub-word tokens each.

    Parameters
    ----------
    counts : list of int
        Sub-word tokens of each word (0 for a word the tokenizer drops).
    budget : int
        Sub-word tokens a window may hold (the max length less the special tokens).

    Returns
    -------
    list of (int, int)
        ``(start, end)`` word ranges, ``end`` exclusive, covering every word once.
        A single word longer than ``budget`` gets a window of its own (the
        tokenizer then cuts its trailing pieces; its first piece, which carries
        the tag, stays).
    """
    windows: list[tuple[int, int]] = []
    start = used = 0
    for word, count in enumerate(counts):
        count = min(count, budget)
        if used + count > budget and word > start:
            windows.append((start, word))
            start, used = word, 0
        used += count
    windows.append((start, len(counts)))
    return windows


def align_labels(word_ids: list[int | None], tags: list[int]) -> tuple[list[int], list[int]]:
    """Sub-word labels and each word's first sub-word position for one tokenized window.

    Parameters
    ----------
    word_ids : list of int or None
        The tokenizer's ``word_ids()``: the window-relative word of each
        position, ``None`` for special tokens.
    tags : list of int
        The tag id of each word of the window.

    Returns
    -------
    labels : list of int
        The word's tag on its first sub-word token, ``-100`` everywhere else.
    first_token : list of int
        Per word, the position of its first sub-word token, or -1 when the
        tokenizer produced none for it.
    """
    labels = [IGNORE] * len(word_ids)
    first_token = [-1] * len(tags)
    for position, word in enumerate(word_ids):
        if word is not None and first_token[word] == -1:
            first_token[word] = position
            labels[position] = tags[word]
    return labels, first_token


class TokenClassification(Task):
    """One tag per word; cross-entropy on the head's logits at each word's first sub-word token.

    ``evaluate`` reports entity-level ``entity-precision`` / ``entity-recall`` /
    ``entity-f1`` (exact span match, micro over entities, BIO spans as
    :func:`fedfm.tasks.metrics.bio_entities` reads them), their counts, the
    word-level tag ``accuracy``, ``macro-f1`` and ``weighted-f1`` (over the
    tags), and the token ``loss``.
    """

    name = "token-classification"
    peft_task_type = "TOKEN_CLS"
    data_kind = "token-classification"

    def model_class(self) -> Any:
        return AutoModelForTokenClassification

    def model_kwargs(self, *, num_labels: int) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        """Windows of at most ``max_length`` tokens with aligned labels; one row per window.

        Columns: ``input_ids``, ``attention_mask``, ``labels`` (sub-word level),
        ``sentence`` (row of ``dataset`` the window comes from), ``word_start``
        (its first word in that sentence), ``word_tags`` (gold tag per word of the
        window, carrying the tag names) and ``first_token`` (per word, see
        :func:`align_labels`).
        """
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                "token classification needs a fast (Rust) tokenizer to map sub-word tokens to words; "
                f"{type(tokenizer).__name__} is not one"
            )
        budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        if budget < 1:
            raise ModelError(f"`model.max-length` {max_length} leaves no room beside the special tokens")

        def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            whole = tokenizer(batch["tokens"], is_split_into_words=True, truncation=False)
            out: dict[str, list[Any]] = {
                "input_ids": [], "attention_mask": [], "labels": [], "sentence": [],
                "word_start": [], "word_tags": [], "first_token": [],
            }
            for j, (words, tags) in enumerate(zip(batch["tokens"], batch["tags"], strict=True)):
                if len(whole["input_ids"][j]) <= max_length:
                    pieces = [(0, len(words), whole["input_ids"][j], whole["attention_mask"][j], whole.word_ids(j))]
                else:
                    counts = [0] * len(words)
                    for word in whole.word_ids(j):
                        if word is not None:
                            counts[word] += 1
                    pieces = []
                    for start, end in word_windows(counts, budget):
                        part = tokenizer(words[start:end], is_split_into_words=True, truncation=True,
                                         max_length=max_length)
                        pieces.append((start, end, part["input_ids"], part["attention_mask"], part.word_ids()))
                for start, end, ids, mask, word_ids in pieces:
                    labels, first = align_labels(word_ids, list(tags[start:end]))
                    out["input_ids"].append(ids)
                    out["attention_mask"].append(mask)
                    out["labels"].append(labels)
                    out["sentence"].append(indices[j])
                    out["word_start"].append(start)
                    out["word_tags"].append(list(tags[start:end]))
                    out["first_token"].append(first)
            return out

        tag_feature = _tag_feature(dataset.features.get("tags"))
        features = Features(
            {
                "input_ids": List(Value("int32")),
                "attention_mask": List(Value("int8")),
                "labels": List(Value("int64")),
                "sentence": Value("int64"),
                "word_start": Value("int64"),
                "word_tags": List(tag_feature if tag_feature is not None else Value("int64")),
                "first_token": List(Value("int64")),
            }
        )
        return dataset.map(
            encode, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features
        )

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            padded = tokenizer.pad(
                [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
                return_tensors="pt",
            )
            width = padded["input_ids"].shape[1]
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            left = getattr(tokenizer, "padding_side", "right") == "left"
            for i, row in enumerate(rows):
                values = torch.tensor(row["labels"], dtype=torch.long)
                if left:
                    labels[i, width - len(values):] = values
                else:
                    labels[i, : len(values)] = values
            return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "labels": labels}

        return collate

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The mean over each window's labelled tokens, then over windows: every
        # example's loss depends on its own tokens only, as DP-SGD's per-example
        # clipping assumes, and train.py's example-weighted loss log stays right.
        return _row_losses(model, batch).mean()

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        names = _tag_names(dataset, model)
        outside = names.index("O") if "O" in names else 0
        was_training = model.training
        model.eval()
        collate = self.collate(tokenizer)
        order = np.argsort([len(ids) for ids in dataset["input_ids"]])
        windows: dict[int, list[tuple[int, list[int], list[int]]]] = {}
        loss_sum, labelled = 0.0, 0
        for start in range(0, len(order), batch_size):
            interrupt.check()
            rows = [dataset[int(i)] for i in order[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="sum"
            ))
            labelled += int((batch["labels"] != IGNORE).sum())
            best = logits.argmax(-1).cpu().numpy()
            for i, row in enumerate(rows):
                predicted = [int(best[i, p]) if p >= 0 else outside for p in row["first_token"]]
                windows.setdefault(int(row["sentence"]), []).append(
                    (int(row["word_start"]), list(row["word_tags"]), predicted)
                )
        if was_training:
            model.train()
        gold_ids: list[list[int]] = []
        pred_ids: list[list[int]] = []
        for sentence in sorted(windows):
            parts = sorted(windows[sentence], key=lambda w: w[0])
            gold_ids.append([t for _, gold, _ in parts for t in gold])
            pred_ids.append([t for _, _, pred in parts for t in pred])
        flat_gold = np.asarray([t for s in gold_ids for t in s], dtype=np.int64)
        flat_pred = np.asarray([t for s in pred_ids for t in s], dtype=np.int64)
        scores = entity_scores(
            [[names[t] for t in s] for s in gold_ids], [[names[t] for t in s] for s in pred_ids]
        )
        return {
            "loss": loss_sum / labelled if labelled else 0.0,
            "accuracy": float((flat_gold == flat_pred).mean()) if flat_gold.size else 0.0,
            "macro-f1": macro_f1(flat_gold, flat_pred, len(names)),
            "weighted-f1": weighted_f1(flat_gold, flat_pred, len(names)),
            **scores,
        }

    @torch.no_grad()
    def example_losses(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> np.ndarray:
        was_training = model.training
        model.eval()
        collate = self.collate(tokenizer)
        losses = np.zeros(len(dataset))
        for start in range(0, len(dataset), batch_size):
            interrupt.check()
            indices = list(range(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices]).items()}
            losses[indices] = _row_losses(model, batch).cpu().numpy()
        if was_training:
            model.train()
        return losses


def _row_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each window's mean cross-entropy over its labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none"
    )
    counts = (batch["labels"] != IGNORE).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counts


def _tag_feature(feature: Any) -> ClassLabel | None:
    """The ClassLabel inside a ``tags`` sequence feature, if the rows name their tags."""
    inner = getattr(feature, "feature", None)
    return inner if isinstance(inner, ClassLabel) else None


def _tag_names(dataset: Dataset, model: torch.nn.Module) -> list[str]:
    """Tag names in id order: from the rows' ``word_tags`` feature, else the model's ``id2label``."""
    feature = _tag_feature(dataset.features.get("word_tags"))
    if feature is not None:
        return list(feature.names)
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)]
