"""Image classification with a vision encoder (a ViT) and a fresh classification head."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForImageClassification

from fedfm import interrupt
from fedfm.tasks.base import LogitsTask, evaluating
from fedfm.tasks.metrics import binary_rates, classification_metrics, roc_auc


class ImageClassification(LogitsTask):
    """One label per image; cross-entropy on the head's logits.

    transformers' image-classification model of the encoder builds the head (DINOv2: a linear layer on the
    class token concatenated with the mean of the patch tokens, the DINOv2 paper's linear evaluation); LoRA
    adapts the encoder and the head trains in full. Rows keep their images as they came (``datasets.Image``);
    the model's image processor resizes and normalizes each batch, as ``fedfm predict`` and the model card do.
    """

    name = "image-classification"
    #: peft has no task type for image classification: the head is named in ``modules_to_save`` instead.
    peft_task_type = ""
    data_kind = "image"
    modules_to_save = ("classifier",)
    #: Batch entry holding per-class loss weights (``train.class-weights``), when the training loop sets one.
    class_weights_key = "class_weights"

    def model_class(self) -> Any:
        return AutoModelForImageClassification

    def model_kwargs(self, *, num_labels: int) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def load_preprocessor(self, model_dir: Path, *, image_size: int) -> Any:
        """The folder's image processor, resizing every image to ``image_size`` pixels a side (no crop)."""
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir)
        processor.size = {"height": image_size, "width": image_size}
        if getattr(processor, "do_center_crop", False):
            processor.do_center_crop = False  # the whole image, resized: a crop would cut off lung edges
        return processor

    def row_lengths(self, dataset: Dataset) -> list[int]:
        """Every image becomes the same number of patches."""
        return [1] * len(dataset)

    def row_fingerprints(self, dataset: Dataset, preprocessor: Any) -> Iterator[bytes]:
        """Each row's encoded image (or its file's path, size and modification time), after the processor's settings.

        The same image at another size or normalization is another input, so the settings are part of each row's.
        """
        settings = hashlib.sha256(preprocessor.to_json_string().encode()).digest()
        for cell in dataset.cast_column("image", datasets.Image(decode=False))["image"]:
            yield settings + (cell["bytes"] or _file_identity(cell["path"]))

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The images' pixels."""
        return {"pixel_values": batch["pixel_values"]}

    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        """Keep each row's image (decoded when a batch is built) and its label."""
        return dataset.select_columns(["image", "label"]).rename_column("label", "labels")

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            pixels = tokenizer([r["image"] for r in rows], return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long)}

        return collate

    def training_collate(
        self, tokenizer: Any, *, augment: bool, rng: np.random.Generator
    ) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        collate = self.collate(tokenizer)
        if not augment:
            return collate

        def collate_changed(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return collate([{**r, "image": random_change(r["image"], rng)} for r in rows])

        return collate_changed

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits.float()
        weights = batch.get(self.class_weights_key)
        per_row = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        # Each row's (weighted) loss, averaged over the rows, so accumulated batches add up exactly.
        return (per_row * weights[batch["labels"]]).mean() if weights is not None else per_row.mean()

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Loss, accuracy, macro- and weighted F1; with two classes also the ROC AUC of class 1's probability,
        sensitivity (class 1's recall) and specificity (class 0's), each where the rows hold the classes it needs."""
        labels, logits = self.score(model, dataset, tokenizer, batch_size=batch_size, device=device)
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "macro-f1": 0.0, "weighted-f1": 0.0}
        loss = float(torch.nn.functional.cross_entropy(logits, labels))
        predictions = logits.argmax(-1).numpy()
        metrics = classification_metrics(labels.numpy(), predictions, logits.shape[1], loss)
        if logits.shape[1] == 2:
            metrics.update(binary_rates(labels.numpy(), predictions))
            positive = torch.softmax(logits, -1)[:, 1].numpy()
            auc = roc_auc(positive[labels.numpy() == 1], positive[labels.numpy() == 0])
            if not np.isnan(auc):
                metrics["auc"] = auc
        return metrics

    @torch.no_grad()
    def score(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and float32 logits of every row in order, on the CPU."""
        collate = self.collate(tokenizer)
        labels, logits = [], []
        with evaluating(model):
            for start in range(0, len(dataset), max(1, batch_size)):
                interrupt.check()
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                inputs = {k: v.to(device) for k, v in self.model_inputs(batch).items()}
                logits.append(model(**inputs).logits.float().cpu())
                labels.append(batch["labels"])
        if not labels:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 1)
        return torch.cat(labels), torch.cat(logits)


#: ``train.augment-images``: share of the image's area a random crop keeps, and its aspect ratio's range.
CROP_AREA = (0.8, 1.0)
CROP_ASPECT = (0.9, 1.1)
#: Largest rotation, in degrees, and largest relative change of brightness and of contrast.
ROTATION = 10.0
JITTER = 0.1


def random_change(image: Any, rng: np.random.Generator) -> Any:
    """One training image changed at random (``train.augment-images``): a crop keeping 80–100 % of its area,
    a rotation of up to ±10°, brightness and contrast each changed by up to ±10 %. Never flipped: a chest
    X-ray has a left and a right. The image processor resizes the result as it resizes any image.

    Parameters
    ----------
    image : PIL.Image.Image
        The row's image as stored.
    rng : numpy.random.Generator
        Draws the changes (the training loop seeds it, so a resumed round draws the same ones).

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageEnhance

    width, height = image.size
    area = rng.uniform(*CROP_AREA) * width * height
    # The crop's aspect ratio is the image's, stretched by up to ±10 %.
    aspect = float(np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))) * width / height
    w = min(width, max(1, round((area * aspect) ** 0.5)))
    h = min(height, max(1, round((area / aspect) ** 0.5)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    changed = image.crop((left, top, left + w, top + h))
    changed = changed.rotate(float(rng.uniform(-ROTATION, ROTATION)), resample=Image.Resampling.BILINEAR)  # corners black
    changed = ImageEnhance.Brightness(changed).enhance(float(rng.uniform(1 - JITTER, 1 + JITTER)))
    return ImageEnhance.Contrast(changed).enhance(float(rng.uniform(1 - JITTER, 1 + JITTER)))


def _file_identity(path: str | None) -> bytes:
    """An image file's path, size and modification time (changed when the file is), without reading it."""
    try:
        stat = Path(path or "").stat()
    except OSError:
        return str(path).encode()
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
