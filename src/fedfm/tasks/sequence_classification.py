"""Sequence classification with an encoder and a fresh classification head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from fedfm.tasks.base import Task
from fedfm.tasks.metrics import classification_metrics
from fedfm.tasks.pooling import apply_pooling, resolve_pooling


class SequenceClassification(Task):
    """One label per text; cross-entropy on the head's logits."""

    name = "sequence-classification"
    peft_task_type = "SEQ_CLS"

    def model_class(self) -> Any:
        return AutoModelForSequenceClassification

    def model_kwargs(self, *, num_labels: int) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def adapt_model(self, model: Any, *, model_dir: Path, pooling: str) -> dict[str, str]:
        chosen = resolve_pooling(pooling, model_dir)
        apply_pooling(model, chosen)
        return {"pooling": chosen}

    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}

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
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        labels, logits = self._score(model, dataset, tokenizer, batch_size=batch_size, device=device)
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "macro-f1": 0.0, "weighted-f1": 0.0}
        loss = float(torch.nn.functional.cross_entropy(logits, labels, reduction="mean"))
        num_classes = int(model.config.num_labels)  # type: ignore[union-attr,arg-type]
        return classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), num_classes, loss)

    @torch.no_grad()
    def example_losses(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> np.ndarray:
        labels, logits = self._score(model, dataset, tokenizer, batch_size=batch_size, device=device)
        if len(labels) == 0:
            return np.zeros(0)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()

    def _score(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and float32 logits of every row, on the CPU (rows ordered by length, which pads least)."""
        was_training = model.training
        model.eval()
        collate = self.collate(tokenizer)
        order = np.argsort([len(ids) for ids in dataset["input_ids"]])
        labels, logits = [], []
        for start in range(0, len(order), batch_size):
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
