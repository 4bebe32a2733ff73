"""A hospital's round of the DP linear probe (``privacy.recipe = "linear-probe"``).

The encoder and its LoRA tensors stay as the run started them, so each row's
feature (what the classifier head reads) never changes: a hospital extracts
its rows' features once per process and keeps them in memory. Each round it
takes the global head from its model, trains it by full-batch DP-GD on the
features centred and scaled with public rows only (:mod:`fedfm.privacy.probe`),
folds the centring back into the head and writes it into the model, whose
adapter state is then the reply as usual. Every row is in every step, so the
ledger's history entry for a round is ``(σ, 1.0, probe-steps)``.

The server starts the run from a zero head (:func:`zero_head_arrays`): DP-GD
from zero is what was measured, and a zero head reads the same in either space.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.privacy.dpsgd import DpSgd
from fedfm.privacy.probe import (
    FeatureTransform,
    Head,
    dp_gd,
    extract_features,
    fold_transform,
    head_linear,
    public_features,
    public_rows,
    public_scale,
    transform,
    write_head,
)

#: Features per (model, rows) and transforms per (model, preprocessor, centring, length), for this process's lifetime.
_FEATURES: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
_TRANSFORMS: dict[tuple[int, int, str, int], FeatureTransform] = {}


def clear_features() -> None:
    """Forget the features and transforms computed in this process (they are keyed by the model's ``id``)."""
    _FEATURES.clear()
    _TRANSFORMS.clear()


@dataclass(frozen=True)
class ProbeRound:
    """What a round of the probe did (the hospital reports only the steps; the ledger counts them)."""

    steps: int
    learning_rate: float
    seconds: float


def feature_transform(
    model: torch.nn.Module, task: Any, tokenizer: Any, *, centring: str, max_length: int, device: torch.device | str,
) -> FeatureTransform:
    """The public centring and global scale for ``model`` (computed once per process)."""
    key = (id(model), id(tokenizer), centring, max_length)
    if key not in _TRANSFORMS:
        rows = public_rows(centring, data_kind=task.data_kind, tokenizer=tokenizer)
        with torch.no_grad():
            features = public_features(model, task, tokenizer, rows, max_length=max_length, device=device)
        centre = np.zeros(features.shape[1], features.dtype) if centring == "none" else features.mean(axis=0)
        _TRANSFORMS[key] = FeatureTransform(centre=centre, scale=public_scale(features, centre))
    return _TRANSFORMS[key]


def rows_digest(model: torch.nn.Module, task: Any, rows: Any, tokenizer: Any) -> str:
    """A name for ``rows``' features under ``model``: a hash of the model's origin, each row's input and the labels.

    Each row's input is what the task identifies it by (:meth:`fedfm.tasks.Task.row_fingerprints`: token ids;
    an image and the processor's settings).
    """
    digest = hashlib.sha256(str(getattr(getattr(model, "config", None), "name_or_path", "")).encode())
    labels = rows["labels"] if "labels" in rows.column_names else rows["label"]
    for fingerprint, label in zip(task.row_fingerprints(rows, tokenizer), labels, strict=True):
        digest.update(fingerprint)
        digest.update(np.int64(label).tobytes())
    return digest.hexdigest()[:24]


def _features(model: torch.nn.Module, task: Any, rows: Any, tokenizer: Any, device: torch.device | str,
              batch_size: int, folder: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows' features: from this process's memory, else the hospital's state folder, else computed.

    A deployed hospital starts a fresh process for every instruction, so the
    folder (its own, on its own machine) saves it a pass over its rows each round.
    """
    digest = rows_digest(model, task, rows, tokenizer)
    key = (id(model), digest)
    if key in _FEATURES:
        return _FEATURES[key]
    path = folder / f"probe-features-{digest}.npz" if folder is not None else None
    if path is not None and path.is_file():
        with np.load(path) as stored:
            _FEATURES[key] = (stored["features"], stored["labels"])
        return _FEATURES[key]
    with torch.no_grad():
        _FEATURES[key] = extract_features(model, task, rows, tokenizer, batch_size=batch_size, device=device)
    if path is not None:  # written whole or not at all: a process killed mid-write leaves no half file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as out:
            np.savez(out, features=_FEATURES[key][0], labels=_FEATURES[key][1])
        partial.replace(path)
    return _FEATURES[key]


def read_head(model: torch.nn.Module) -> Head:
    """The model's classifier as a :class:`Head` over raw features."""
    linear = head_linear(model)
    bias = linear.bias.detach().double().cpu().numpy() if linear.bias is not None else np.zeros(linear.out_features)
    return Head(linear.weight.detach().double().cpu().numpy(), bias)


def unfold(head: Head, spec: FeatureTransform) -> Head:
    """The inverse of :func:`~fedfm.privacy.probe.fold_transform`: the head over the transformed features."""
    return Head(head.weight * spec.scale, head.bias + head.weight @ spec.centre.astype(np.float64))


def train_round(
    model: torch.nn.Module,
    task: Any,
    rows: Any,
    tokenizer: Any,
    *,
    dp: DpSgd,
    learning_rate: float,
    centring: str,
    max_length: int,
    device: torch.device | str,
    batch_size: int,
    folder: Path | None = None,
) -> ProbeRound:
    """One round of the probe in a hospital: ``dp.steps`` full-batch DP-GD steps from the model's global head.

    The trained head is written into ``model``; its noise comes from the
    operating system's entropy (:func:`fedfm.privacy.probe.dp_gd`). ``folder``:
    the hospital's state folder, where the rows' features are kept between
    processes (they never leave the hospital).
    """
    started = time.perf_counter()
    spec = feature_transform(model, task, tokenizer, centring=centring, max_length=max_length, device=device)
    features, labels = _features(model, task, rows, tokenizer, device, batch_size, folder)
    head, steps = dp_gd(
        transform(features, spec), labels, head=unfold(read_head(model), spec), steps=dp.steps,
        learning_rate=learning_rate, max_grad_norm=dp.max_grad_norm, noise_multiplier=dp.noise_multiplier,
    )
    write_head(model, fold_transform(head, spec))
    return ProbeRound(steps=steps, learning_rate=learning_rate, seconds=time.perf_counter() - started)


def zero_head_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with the classifier head (every tensor that is not a LoRA factor) set to zero."""
    return {name: value if "lora_" in name else np.zeros_like(value) for name, value in arrays.items()}
