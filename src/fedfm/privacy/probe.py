"""A private linear probe: frozen features, a public centring, full-batch DP-GD of the head.

DP-SGD on LoRA + head left no useful model at ε = 8 on hospitals of a few
hundred rows (``docs/dev-notes.md``, "DP-SGD"): too few noisy steps, and
mean-pooled MiniLM rows so alike (mean pairwise cosine 0.95) that a head
learns little from them. This module is the core of the recipe that does:

1. :func:`extract_features` — the vector the classification head reads, for
   each row, computed once (the encoder is frozen, so it never changes).
2. :func:`public_centre` — the mean feature of *public* text (no patient
   data), and :func:`transform` — features centred on it and rescaled, which
   spreads the rows apart; :func:`public_texts` writes three kinds of public
   text (generic sentences, random vocabulary, heart records drawn from the
   public UCI codebook), and :func:`public_images` grey images drawn in code
   for an image classifier (:func:`public_rows` gives the task's kind).
3. :func:`dp_gd` — full-batch DP-GD of a zero-initialized softmax linear head:
   every row's gradient clipped to ``C``, summed, Gaussian noise of standard
   deviation ``σ·C`` added, divided by the hospital's fixed row count ``N``.
   Each step is one Gaussian mechanism without sampling, so the Opacus history
   is ``(σ, 1.0, steps)`` (:func:`probe_history`, :func:`probe_noise`).
4. :func:`fold_transform` and :func:`write_head` — the centring and a global
   scale are affine, so they fold into the head's weights; the exported model
   is the ordinary fedfm model with a new head and no extra module.

Everything here is plain numpy/torch; nothing imports Flower.

The run configuration's ``privacy.probe-*`` settings (and ``privacy.max-grad-norm``)
drive it; their defaults were chosen on hospitals' validation rows by
``benchmarks/dp_probe.py``. Tuning on private rows is itself a release: every
configuration tried leaks a little, so a deployment that tunes on its own
hospitals must pay for the tuning from the budget (Papernot & Steinke 2022,
https://arxiv.org/abs/2110.03620) or use these defaults untuned.

Abadi et al. 2016 (DP-SGD, https://arxiv.org/abs/1607.00133); Tramèr & Boneh
2021 (linear models on fixed features are strong private baselines,
https://arxiv.org/abs/2011.11660).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedfm.privacy.accounting import HistoryEntry, calibrate, compose, epsilon_of
from fedfm.privacy.dpsgd import secret_rng

__all__ = [
    "CENTRINGS",
    "IMAGE_CENTRINGS",
    "SCALINGS",
    "FeatureTransform",
    "Head",
    "calibrate_next_stage",
    "clipped_gradient_sum",
    "dp_gd",
    "extract_features",
    "federated_average",
    "fold_transform",
    "head_linear",
    "head_module",
    "per_example_gradients",
    "probe_history",
    "probe_noise",
    "public_centre",
    "public_features",
    "public_images",
    "public_rows",
    "public_scale",
    "public_texts",
    "transform",
    "write_head",
    "zero_head",
]

#: Which public rows a centring vector is the mean feature of (``none``: no centring). ``generic`` is fedfm's own
#: public rows of the task's kind: sentences written into fedfm, or for images grey images drawn in code.
CENTRINGS = ("generic", "vocabulary", "heart-codebook", "none")
#: The centrings an image task can take (the others are kinds of text).
IMAGE_CENTRINGS = ("generic", "none")
#: How centred features are rescaled: one public constant (foldable into the head) or each row to unit length.
SCALINGS = ("global", "row")


# --------------------------------------------------------------------------- features


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost module named ``classifier`` or ``score`` (with peft: its ``ModulesToSaveWrapper``)."""
    from fedfm.adapters import HEAD_MODULES

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_MODULES:
            return module
    raise ValueError(f"{type(model).__name__} has no module named one of {HEAD_MODULES}")


def head_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that computes the logits (with peft: the active trainable copy, which the forward pass uses).

    Raises
    ------
    TypeError
        The head is not one linear layer (a linear probe cannot be written into it).
    """
    module = head_module(model)
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        active = getattr(module, "active_adapters", None) or list(copies.keys())
        module = copies[active[0] if isinstance(active, list) else active]
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"the classification head is a {type(module).__name__}, not a linear layer; "
                        "a linear probe cannot be written into it")
    return module


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    task: Any,
    rows: Any,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The input of the model's classification head for every row, and the rows' labels.

    A forward pre-hook on the head captures what it reads, so the vector is the
    one training and export see (pooling, dropout in eval mode, LoRA as it is
    set), under the task's own collation.

    Parameters
    ----------
    model : torch.nn.Module
        A sequence or image classifier (peft-wrapped or not).
    task : fedfm.tasks.Task
        Provides ``collate(tokenizer)``, the model's inputs in a batch (``model_inputs``) and each row's
        length (``row_lengths``).
    rows : datasets.Dataset
        Prepared rows (``task.tokenize``'s output, with ``labels``).
    tokenizer : transformers tokenizer or image processor
        Builds the batches.
    batch_size : int
        Rows per forward pass (rows are sorted by length, which pads least).
    device : torch.device or str
        Where the model is.

    Returns
    -------
    features : np.ndarray
        float32, shape (rows, hidden), in the rows' order.
    labels : np.ndarray
        int64, shape (rows,).
    """
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().float().cpu())

    head = head_module(model)
    handle = head.register_forward_pre_hook(capture)
    was_training = model.training
    model.eval()
    collate = task.collate(tokenizer)
    order = np.argsort(np.asarray(task.row_lengths(rows), dtype=np.int64), kind="stable")
    labels: list[torch.Tensor] = []
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([rows[int(i)] for i in order[start : start + batch_size]])
            model(**{name: value.to(device) for name, value in task.model_inputs(batch).items()})
            labels.append(batch["labels"])
    finally:
        handle.remove()
        if was_training:
            model.train()
    if not captured:
        return np.zeros((0, head_linear(model).in_features), np.float32), np.zeros(0, np.int64)
    features = np.empty((len(order), captured[0].shape[-1]), np.float32)
    features[order] = torch.cat(captured).numpy()
    out_labels = np.empty(len(order), np.int64)
    out_labels[order] = torch.cat(labels).numpy()
    return features, out_labels


# --------------------------------------------------------------------------- public centring

#: Sentences written for this module (public by construction): everyday, clinical and research English,
#: none of it about a real patient. The mean of their features is a centre that works for any dataset.
GENERIC_SENTENCES: tuple[str, ...] = (
    "The weather was mild and the streets were quiet this morning.",
    "She read the report twice before signing it.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "Please close the door when you leave the room.",
    "The library opens at nine and closes at five on weekdays.",
    "He added two cups of flour and stirred the mixture slowly.",
    "The train to the city was delayed by twenty minutes.",
    "Results are reported as mean and standard deviation.",
    "We randomly assigned participants to two groups of equal size.",
    "The primary outcome was all-cause mortality at one year.",
    "A total of 120 adults were enrolled between 2010 and 2012.",
    "Statistical significance was set at a p value below 0.05.",
    "The study was approved by the local ethics committee.",
    "Further trials are needed to confirm these findings.",
    "This review summarizes the current evidence on treatment options.",
    "Data were analysed with a mixed-effects regression model.",
    "The intervention reduced the length of hospital stay.",
    "Adverse events were mild and resolved without treatment.",
    "Blood pressure was measured twice after five minutes of rest.",
    "The patient was advised to drink more water and rest.",
    "Chest pain can have many causes, not all of them cardiac.",
    "Regular exercise lowers the risk of heart disease.",
    "Cholesterol levels are measured after an overnight fast.",
    "An electrocardiogram records the electrical activity of the heart.",
    "Diabetes is diagnosed when fasting blood sugar is persistently high.",
    "The nurse recorded the temperature, pulse and breathing rate.",
    "Antibiotics do not help against viral infections.",
    "Symptoms usually improve within a week.",
    "The clinic offers vaccination on Monday mornings.",
    "Smoking is a major risk factor for lung and heart disease.",
    "Sleep, diet and physical activity all affect health.",
    "The medication should be taken with food.",
)


def public_texts(kind: str, *, count: int = 256, seed: int = 0, tokenizer: Any = None) -> list[str]:
    """Text that holds no patient data, whose mean feature centres the private rows.

    Parameters
    ----------
    kind : str
        ``generic``: :data:`GENERIC_SENTENCES`; ``vocabulary``: strings of random
        whole words from the tokenizer's vocabulary (needs ``tokenizer``);
        ``heart-codebook``: heart-disease records drawn uniformly from the UCI
        codebook's categories and plausible clinical ranges, written by
        :func:`fedfm.data.text.heart_row_to_text` (heart data only).
    count : int
        Texts to draw (``vocabulary``, ``heart-codebook``).
    seed : int
        Seed of the draw. The texts are public either way, so a fixed seed is fine.
    tokenizer : transformers tokenizer or None
        For ``vocabulary``.

    Returns
    -------
    list of str
    """
    rng = np.random.default_rng(seed)
    if kind == "generic":
        return list(GENERIC_SENTENCES)
    if kind == "vocabulary":
        if tokenizer is None:
            raise ValueError("public_texts('vocabulary') needs the tokenizer")
        words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
        lengths = rng.integers(8, 30, size=count)
        return [" ".join(words[i] for i in rng.integers(0, len(words), size=n)) for n in lengths]
    if kind == "heart-codebook":
        return [_codebook_heart_text(rng) for _ in range(count)]
    raise ValueError(f"public text kind must be one of {[c for c in CENTRINGS if c != 'none']}, got {kind!r}")


def _codebook_heart_text(rng: np.random.Generator) -> str:
    from fedfm.data.text import heart_row_to_text

    # Categories as the UCI codebook names them; numeric ranges are broad clinical ones
    # (not read from any patient table).
    row = {
        "age": int(rng.integers(28, 78)),
        "sex": str(rng.choice(["Male", "Female"])),
        "cp": str(rng.choice(["typical angina", "atypical angina", "non-anginal", "asymptomatic"])),
        "trestbps": int(rng.integers(90, 201)),
        "chol": int(rng.integers(120, 565)),
        "fbs": bool(rng.integers(0, 2)),
        "restecg": str(rng.choice(["normal", "st-t abnormality", "lv hypertrophy"])),
        "thalch": int(rng.integers(60, 203)),
        "exang": bool(rng.integers(0, 2)),
        "oldpeak": round(float(rng.uniform(0.0, 6.2)), 1),
    }
    return heart_row_to_text(row)


def public_images(*, count: int = 64, seed: int = 0, size: int = 64) -> list[bytes]:
    """Grey images drawn in code (PNG bytes): smooth random fields, the coarse shading any photograph or scan has.

    No X-ray set is public here, so a probe on images is centred on these
    (``probe-centring = "generic"``, what ``auto`` picks for images) or takes
    only its global scale from them (``"none"``). On PneumoniaMNIST's
    validation split their centre did as well as the hospitals' own mean
    feature would (``docs/privacy.md``, "Images").

    Parameters
    ----------
    count : int
        Images to draw.
    seed : int
        Seed of the draw (the images are public either way).
    size : int
        Pixels a side (the model's image processor resizes them as it does every row).

    Returns
    -------
    list of bytes
    """
    from PIL import Image

    from fedfm.data.images import png_bytes

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, size=(int(rng.integers(2, 9)),) * 2).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        field = field + rng.normal(0, float(rng.uniform(0, 12)), size=field.shape)
        images.append(png_bytes(np.clip(field, 0, 255)))
    return images


def public_rows(kind: str, *, data_kind: str, tokenizer: Any = None, count: int | None = None, seed: int = 0) -> Any:
    """Public rows of the kind a task reads (``data_kind``), labelled 0, whose features centre and scale a probe's.

    Text: :func:`public_texts` of ``kind`` (``none`` reads the generic sentences; 256 texts unless ``count``
    says otherwise). Images (``generic`` or ``none``): :func:`public_images` (64 unless ``count`` says otherwise).

    Returns
    -------
    datasets.Dataset
        Standard rows (``text`` or ``image``, and ``label``), to prepare with the task's ``tokenize``.

    Raises
    ------
    ValueError
        ``kind`` is a kind of text (``vocabulary``, ``heart-codebook``), but the task reads images.
    """
    from datasets import Dataset

    from fedfm.data.base import IMAGE
    from fedfm.data.images import image_rows

    if data_kind == IMAGE:
        if kind not in IMAGE_CENTRINGS:
            raise ValueError(f"public text cannot centre image features; centring must be one of "
                             f"{list(IMAGE_CENTRINGS)}, got {kind!r}")
        images = public_images(count=count or 64, seed=seed)
        return image_rows(images, [0] * len(images))
    texts = public_texts("generic" if kind == "none" else kind, count=count or 256, seed=seed, tokenizer=tokenizer)
    return Dataset.from_dict({"text": texts, "label": [0] * len(texts)})


def public_features(
    model: torch.nn.Module, task: Any, tokenizer: Any, rows: Any, *, max_length: int,
    batch_size: int = 64, device: torch.device | str = "cpu",
) -> np.ndarray:
    """Features of public standard ``rows`` (:func:`public_rows`), prepared as the task prepares every row."""
    prepared = task.tokenize(rows, tokenizer, max_length=max_length)
    features, _ = extract_features(model, task, prepared, tokenizer, batch_size=batch_size, device=device)
    return features


def public_centre(
    model: torch.nn.Module, task: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int,
    batch_size: int = 64, device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Features of public ``texts`` (tokenized as the task does) and their mean: the centring vector.

    Returns
    -------
    centre : np.ndarray
        float32, shape (hidden,).
    features : np.ndarray
        The public texts' features, shape (len(texts), hidden): :func:`public_scale` reads them.
    """
    from datasets import Dataset

    rows = Dataset.from_dict({"text": list(texts), "label": [0] * len(texts)})
    features = public_features(model, task, tokenizer, rows, max_length=max_length, batch_size=batch_size,
                               device=device)
    return features.mean(axis=0), features


@dataclass(frozen=True)
class FeatureTransform:
    """``x ↦ (x − centre) / scale`` (``scaling = "global"``) or ``(x − centre) / ‖x − centre‖`` (``"row"``).

    Both are data-independent per row (centre and scale come from public text),
    so they cost no privacy. Only the global one is affine, and so folds into the head.
    """

    centre: np.ndarray
    scale: float = 1.0
    scaling: str = "global"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"`scaling` must be one of {list(SCALINGS)}, got {self.scaling!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"`scale` must be a positive number, got {self.scale}")


def public_scale(public_features: np.ndarray, centre: np.ndarray) -> float:
    """A global scale from public features: their mean distance to ``centre`` (1 when that is 0)."""
    distance = float(np.linalg.norm(public_features - centre, axis=1).mean())
    return distance if distance > 0 else 1.0


def transform(features: np.ndarray, spec: FeatureTransform) -> np.ndarray:
    """The features a probe trains on (float64)."""
    centred = features.astype(np.float64) - spec.centre.astype(np.float64)
    if spec.scaling == "row":
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    return centred / spec.scale


# --------------------------------------------------------------------------- DP-GD


@dataclass(frozen=True)
class Head:
    """A softmax linear head: ``logits = x @ weight.T + bias``; weight (classes, hidden), bias (classes,)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias


def zero_head(num_classes: int, width: int) -> Head:
    """The zero-initialized head every hospital and the server start from (no data, no randomness)."""
    return Head(np.zeros((num_classes, width)), np.zeros(num_classes))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def per_example_gradients(head: Head, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cross-entropy gradient of (weight, bias), in closed form.

    With ``g = softmax(W x + b) − onehot(y)`` the gradient is ``(g xᵀ, g)``; its
    norm is ``‖g‖·sqrt(‖x‖² + 1)``.

    Returns
    -------
    coefficient : np.ndarray
        ``g``, shape (rows, classes).
    norms : np.ndarray
        Each row's gradient norm over weight and bias together, shape (rows,).
    """
    g = _softmax(head.logits(features))
    g[np.arange(len(labels)), labels] -= 1.0
    norms = np.linalg.norm(g, axis=1) * np.sqrt((features * features).sum(axis=1) + 1.0)
    return g, norms


def clipped_gradient_sum(
    head: Head, features: np.ndarray, labels: np.ndarray, max_grad_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sum over rows of each row's gradient clipped to ``max_grad_norm`` (weight part, bias part)."""
    g, norms = per_example_gradients(head, features, labels)
    factor = np.minimum(1.0, max_grad_norm / np.maximum(norms, 1e-12))
    scaled = g * factor[:, None]
    return scaled.T @ features, scaled.sum(axis=0)


def dp_gd(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    head: Head,
    steps: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> tuple[Head, int]:
    """Full-batch DP-GD of a softmax linear head from ``head``.

    Each step: every row's gradient clipped to ``max_grad_norm`` (C), summed,
    Gaussian noise N(0, σ²C²) added to each coordinate, divided by the fixed row
    count N (public: the hospital reports it anyway), and one SGD step. Every
    row is in every step, so the accountant's history entry is ``(σ, 1.0, steps)``.

    Parameters
    ----------
    features : np.ndarray
        Transformed features, shape (N, hidden).
    labels : np.ndarray
        Class ids, shape (N,).
    head : Head
        The start (the global head of the round).
    steps, learning_rate, max_grad_norm, noise_multiplier
        The DP-GD settings; σ = 0 trains without noise (clipping still applies).
    rng : np.random.Generator or None
        Only for tests: the noise then repeats. ``None`` draws from the
        operating system's entropy (:func:`fedfm.privacy.dpsgd.secret_rng`), never
        from a seed the server knows.

    Returns
    -------
    head : Head
        The trained head.
    steps : int
        Steps taken (to add to the hospital's ledger).
    """
    if max_grad_norm <= 0:
        raise ValueError(f"`max_grad_norm` must be > 0, got {max_grad_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier}")
    noise = rng if rng is not None else secret_rng()
    n = len(labels)
    weight, bias = head.weight.astype(np.float64).copy(), head.bias.astype(np.float64).copy()
    x = features.astype(np.float64)
    std = noise_multiplier * max_grad_norm
    for _ in range(steps):
        grad_w, grad_b = clipped_gradient_sum(Head(weight, bias), x, labels, max_grad_norm)
        if std > 0:
            grad_w = grad_w + noise.normal(0.0, std, size=grad_w.shape)
            grad_b = grad_b + noise.normal(0.0, std, size=grad_b.shape)
        # N, not the count of rows this step: N is fixed and public, a data-dependent divisor is not.
        weight -= learning_rate * grad_w / max(n, 1)
        bias -= learning_rate * grad_b / max(n, 1)
    return Head(weight, bias), steps


def federated_average(heads: Sequence[Head], weights: Sequence[float] | None = None) -> Head:
    """Weighted mean of hospitals' heads (FedAvg); equal weights when ``weights`` is None."""
    w = np.ones(len(heads)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return Head(sum(wi * h.weight for wi, h in zip(w, heads, strict=True)),
                sum(wi * h.bias for wi, h in zip(w, heads, strict=True)))


# --------------------------------------------------------------------------- accounting


def probe_history(noise_multiplier: float, steps: int, history: list[HistoryEntry] | None = None) -> list[HistoryEntry]:
    """``history`` followed by ``steps`` full-batch DP-GD steps: Opacus's ``(σ, 1.0, steps)`` entry."""
    return compose(list(history or []), noise_multiplier, 1.0, steps)


def probe_noise(target_epsilon: float, delta: float, steps: int, *, share: float = 1.0, accountant: str = "rdp") -> float:
    """σ with which ``steps`` full-batch DP-GD steps spend ``share`` of ``target_epsilon`` on their own.

    With ``share`` < 1 the rest of the budget is left to a later stage
    (:func:`calibrate_next_stage` then calibrates that stage against this one's history).
    """
    if not 0 < share <= 1:
        raise ValueError(f"`share` must be in (0, 1], got {share}")
    return calibrate(target_epsilon * share, delta, 1.0, steps, accountant)


def calibrate_next_stage(
    history: list[HistoryEntry],
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 1e-3,
) -> float:
    """The smallest σ (to ``tolerance``, relative) for a further stage so that ``history`` plus it stays within ``target_epsilon``.

    The stages compose in one Opacus history (RDP adds up exactly, which is
    tighter than splitting ε by hand), and the answer is checked with
    :func:`fedfm.privacy.accounting.epsilon_of`.

    Raises
    ------
    ValueError
        ``history`` alone already spends the budget.
    """
    def spent(sigma: float) -> float:
        return epsilon_of(compose(history, sigma, sample_rate, steps), delta, accountant)

    if epsilon_of(history, delta, accountant) >= target_epsilon:
        raise ValueError(f"the earlier stages already spend ε {epsilon_of(history, delta, accountant):.3g} "
                         f"of the budget {target_epsilon:g}: nothing is left for another stage")
    low, high = 0.0, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 keeps the stages within ε {target_epsilon:g}")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if spent(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


# --------------------------------------------------------------------------- export


def fold_transform(head: Head, spec: FeatureTransform) -> Head:
    """The head that reads raw features: ``W' = W / s``, ``b' = b − W μ / s``.

    Raises
    ------
    ValueError
        ``spec`` renormalizes each row (not affine, so it cannot fold).
    """
    if spec.scaling != "global":
        raise ValueError("only a global scale folds into the head; per-row normalization needs a module of its own")
    weight = head.weight / spec.scale
    return Head(weight, head.bias - weight @ spec.centre.astype(np.float64))


def write_head(model: torch.nn.Module, head: Head) -> None:
    """Put ``head`` into the model's classifier (the trainable copy peft saves, when peft wraps the model).

    After this, :func:`fedfm.adapters.get_adapter_state` carries the head, and
    the model's logits on raw rows are ``head.logits(features)``.
    """
    linear = head_linear(model)
    if tuple(linear.weight.shape) != head.weight.shape:
        raise ValueError(f"head weight has shape {head.weight.shape}, the model's classifier {tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(head.weight, dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(torch.as_tensor(head.bias, dtype=linear.bias.dtype))
