"""Sequence classification with an encoder and a fresh classification head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from fedfm import interrupt
from fedfm.tasks.base import LogitsTask
from fedfm.tasks.metrics import classification_metrics
from fedfm.tasks.pooling import apply_pooling, resolve_pooling


class SequenceClassification(LogitsTask):
    """One label per text; cross-entropy on the head's logits."""

    name = "sequence-classification"
    peft_task_type = "SEQ_CLS"
    #: Batch entry holding per-class loss weights (``train.class-weights``), when the training loop sets one.
    class_weights_key = "class_weights"

    def model_class(self) -> Any:
        return AutoModelForSequenceClassification

    def model_kwargs(self, *, num_labels: int) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def adapt_model(self, model: Any, *, model_dir: Path, pooling: str) -> dict[str, str]:
        chosen = resolve_pooling(pooling, model_dir)
        apply_pooling(model, chosen)
        return {"pooling": chosen}

    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        """Encode ``text``; rows with a ``context`` column become (text, context) pairs.

        A pair is truncated in its context only (``only_second``), so the text
        being classified keeps every token that fits; a text too long to leave
        room for any context is encoded alone.
        """
        with_context = "context" in dataset.column_names

        def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            if not with_context:
                enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
                return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}
            return {**encode_pairs(tokenizer, batch["text"], batch["context"], max_length=max_length),
                    "labels": batch["label"]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names)

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
            padded = tokenizer.pad(
                [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
                return_tensors="pt",
            )
            return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "labels": labels}

        return collate

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weights = batch.get(self.class_weights_key)
        if weights is None:
            return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        # The mean of each row's weighted loss over the rows (not torch's division by the batch's
        # weight sum): each row's term is its own, so accumulated batches add up exactly.
        per_row = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return (per_row * weights[batch["labels"]]).mean()

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        labels, logits = self.score(model, dataset, tokenizer, batch_size=batch_size, device=device)
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "macro-f1": 0.0, "weighted-f1": 0.0}
        loss = float(torch.nn.functional.cross_entropy(logits, labels, reduction="mean"))
        num_classes = int(model.config.num_labels)  # type: ignore[union-attr,arg-type]
        return classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), num_classes, loss)

    @torch.no_grad()
    def score(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and float32 logits of every row, on the CPU (rows ordered by length, which pads least)."""
        was_training = model.training
        model.eval()
        collate = self.collate(tokenizer)
        order = np.argsort([len(ids) for ids in dataset["input_ids"]])
        labels, logits = [], []
        for start in range(0, len(order), batch_size):
            interrupt.check()
            batch = collate([dataset[int(i)] for i in order[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels.append(batch["labels"].cpu())
            logits.append(out.cpu())
        if was_training:
            model.train()
        if not labels:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 1)
        return torch.cat(labels), torch.cat(logits)


def encode_pairs(tokenizer: Any, texts: list[str], contexts: list[str], *, max_length: int) -> dict[str, list[list[int]]]:
    """Encode (text, context) pairs in which only the context is ever truncated.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The model's tokenizer (a BERT tokenizer joins a pair as ``[CLS] text [SEP] context [SEP]``).
    texts : list[str]
        The texts being classified.
    contexts : list[str]
        One context per text; ``""`` encodes the text alone.
    max_length : int
        Tokens per encoded pair, special tokens included.

    Returns
    -------
    dict[str, list[list[int]]]
        ``input_ids`` and ``attention_mask``, one list per row, unpadded.
    """
    # Fast tokenizers raise on `only_second` when the first text alone is over the
    # limit, so such texts (and empty contexts) are encoded alone.
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    paired = [i for i, (n, c) in enumerate(zip(lengths, contexts, strict=True)) if c and n < room]
    alone = sorted(set(range(len(texts))) - set(paired))
    ids: list[list[int]] = [[] for _ in texts]
    mask: list[list[int]] = [[] for _ in texts]
    for rows, enc in (
        (paired, tokenizer([texts[i] for i in paired], [contexts[i] for i in paired],
                           truncation="only_second", max_length=max_length) if paired else None),
        (alone, tokenizer([texts[i] for i in alone], truncation=True, max_length=max_length) if alone else None),
    ):
        for k, i in enumerate(rows):
            ids[i] = list(enc["input_ids"][k])  # type: ignore[index]
            mask[i] = list(enc["attention_mask"][k])  # type: ignore[index]
    return {"input_ids": ids, "attention_mask": mask}
