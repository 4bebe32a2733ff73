"""What every task provides to the training loop, the client and the server."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from fedfm import interrupt


class Task(ABC):
    """A kind of learning problem: how rows become tensors, the loss, and evaluation.

    Tasks are stateless; one instance serves every hospital of a process.
    """

    name: str = ""
    #: peft ``TaskType`` name (``SEQ_CLS``, ``CAUSAL_LM``, ...).
    peft_task_type: str = ""
    #: The rows the task reads (:data:`fedfm.data.base.KINDS`); a file of one's own is read as this kind.
    data_kind: str = "classification"
    #: Modules trained in full beside the LoRA factors (peft's ``modules_to_save``), when peft's task type
    #: does not name them itself (an image classifier's head).
    modules_to_save: tuple[str, ...] = ()

    @abstractmethod
    def model_class(self) -> Any:
        """The transformers ``AutoModelFor...`` class that builds the model."""

    def model_kwargs(self, *, num_labels: int) -> dict[str, Any]:
        """Extra ``from_pretrained`` / ``from_config`` arguments (e.g. ``num_labels``)."""
        return {}

    def adapt_model(self, model: Any, *, model_dir: Path, pooling: str) -> dict[str, str]:
        """Change the freshly loaded base model for this task before LoRA wraps it.

        Returns what a colleague must repeat to rebuild the same model from the
        exported adapter (written to the adapter folder's ``fedfm.json``).
        """
        return {}

    def load_preprocessor(self, model_dir: Path, *, image_size: int) -> Any:
        """What turns a row into model input: the folder's tokenizer (an image task: its image processor)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    def row_lengths(self, dataset: Dataset) -> list[int]:
        """Each prepared row's length, by which training batches rows of similar length (token counts)."""
        return lengths_of(dataset)

    def row_fingerprints(self, dataset: Dataset, preprocessor: Any) -> Iterator[bytes]:
        """Bytes that identify each prepared row's model input: its token ids as int64.

        A cache of features computed from the rows is named by them (:func:`fedfm.privacy.linear_probe.rows_digest`).
        """
        for ids in dataset["input_ids"]:
            yield np.asarray(ids, np.int64).tobytes()

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward pass in a collated batch (no labels): token ids and mask."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @abstractmethod
    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        """Turn standard rows into model inputs once (no padding: batches pad dynamically)."""

    @abstractmethod
    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """A collate function padding a list of tokenized rows into one batch."""

    def training_collate(
        self, tokenizer: Any, *, augment: bool, rng: np.random.Generator
    ) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The collate function of training batches: :meth:`collate`, unless ``train.augment-images`` asks an
        image task to change each image at random (``rng`` draws the changes; evaluation never sees them)."""
        return self.collate(tokenizer)

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a batch."""

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Metrics of the model on tokenized rows: at least ``loss``, ``accuracy``, ``macro-f1``."""

    def example_losses(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> np.ndarray:
        """Each row's loss under ``model`` (the membership-inference audit compares members and non-members)."""
        raise NotImplementedError(f"task {self.name!r} has no per-example loss")


class LogitsTask(Task):
    """A task whose model gives one row of class logits per example (texts or images)."""

    @abstractmethod
    def score(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and float32 logits of every row, on the CPU (an empty dataset gives empty tensors)."""

    @torch.no_grad()
    def example_losses(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> np.ndarray:
        labels, logits = self.score(model, dataset, tokenizer, batch_size=batch_size, device=device)
        if len(labels) == 0:
            return np.zeros(0)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()


def lengths_of(dataset: Dataset) -> list[int]:
    """Token counts of tokenized rows (for length-bucketed batching)."""
    return [len(ids) for ids in dataset["input_ids"]]


def by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of ``batch_size`` rows of similar length (shortest first; a stop request is checked
    before each batch), so that scoring or generating pads little.

    Parameters
    ----------
    lengths : sequence of int
        Each row's token count.
    batch_size : int
        Rows per batch (at least one).

    Yields
    ------
    list of int
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    size = max(1, batch_size)
    for start in range(0, len(order), size):
        interrupt.check()
        yield [int(i) for i in order[start : start + size]]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
