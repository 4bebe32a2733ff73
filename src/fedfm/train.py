"""The local training loop of one hospital (plain torch; Flower never appears here)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from datasets import Dataset

from fedfm import interrupt
from fedfm.adapters import HEAD_MODULES
from fedfm.config import TrainSpec
from fedfm.errors import ConfigError
from fedfm.privacy.dpsgd import DpSgd, empty_step, micro_batches, poisson_batches, private_training, secret_rng
from fedfm.tasks import Task


class LocalPlan(Protocol):
    """What the training loop follows of a hospital's plan (:class:`fedfm.strategies.ClientPlan` is one).

    A protocol rather than the plan itself: ``train`` (layer 2) sits below ``strategies``.
    """

    @property
    def fixed(self) -> tuple[str, ...]:
        """Name fragments of trainable parameters left untouched (FFA-LoRA: ``lora_A``)."""
        ...

    @property
    def rank(self) -> int | None:
        """Train only the first ``rank`` LoRA components (rows of A, columns of B), if set."""
        ...

    @property
    def proximal_mu(self) -> float:
        """FedProx's ``mu``: adds ``mu/2 * ||w - w_start||^2`` over the trained parameters; 0 for none."""
        ...

    @property
    def learning_rate_scale(self) -> float:
        """Train at the round's learning rate times this (FFA-LoRA: B alone moves, so it takes larger steps)."""
        ...


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float
    steps: int
    examples: int
    seconds: float
    #: The round's peak local learning rate (the schedule's value after warm-up).
    learning_rate: float = 0.0


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked for (fast on CPUs with AMX and on GPUs); a no-op for float32.

    ``auto`` is bf16 on a CUDA device that supports it and float32 (no autocast) elsewhere,
    so a CPU run under ``auto`` is the same computation as under ``float32``.
    """
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of row indices whose rows have similar lengths.

    Rows are shuffled, cut into pools of 50 batches, sorted by length inside a
    pool and batched; the batch order is shuffled again. Padding shrinks while
    every epoch still sees a different mix.

    Parameters
    ----------
    lengths : list of int
        Token count of each row.
    batch_size : int
        Rows per batch (the last batch of a pool may be smaller).
    rng : numpy.random.Generator
        Source of the shuffles.

    Returns
    -------
    list of list of int
        Each row index exactly once.
    """
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool].tolist(), key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def _batches(lengths: list[int], spec: TrainSpec, rng: np.random.Generator) -> Iterator[list[list[int]]]:
    """Each optimizer step's batches: ``gradient-accumulation`` batches of ``batch-size`` rows (fewer at the end)."""
    accumulate = spec.gradient_accumulation
    if not lengths:
        return
    if spec.local_steps > 0:
        group: list[list[int]] = []
        steps = 0
        while True:
            for batch in bucketed_batches(lengths, spec.batch_size, rng):
                group.append(batch)
                if len(group) == accumulate:
                    yield group
                    group, steps = [], steps + 1
                    if steps >= spec.local_steps:
                        return
    else:
        batches = [b for _ in range(spec.local_epochs) for b in bucketed_batches(lengths, spec.batch_size, rng)]
        for start in range(0, len(batches), accumulate):
            yield batches[start : start + accumulate]


def planned_steps(num_rows: int, spec: TrainSpec) -> int:
    """Optimizer steps of one round without DP-SGD: ``local-steps``, or the accumulated batches of the epochs."""
    if spec.local_steps > 0:
        return spec.local_steps
    batches = spec.local_epochs * math.ceil(num_rows / spec.batch_size)
    return math.ceil(batches / spec.gradient_accumulation)


def warmup_steps(total: int, ratio: float) -> int:
    """Warm-up steps of a round of ``total`` optimizer steps: ``ratio`` of them, rounded up (0 when ratio is 0)."""
    return min(total, math.ceil(ratio * total)) if ratio > 0 else 0


def lr_factor(step: int, total: int, *, schedule: str, warmup_ratio: float) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based) of ``total`` in one round.

    Linear warm-up over the first ``warmup_steps(total, warmup_ratio)`` steps
    (the first step already moves: ``1/(W+1)``), then ``constant``, or
    ``linear`` / ``cosine`` decay towards 0 that never reaches it on the last step.

    Parameters
    ----------
    step : int
        The optimizer step about to be taken, from 0.
    total : int
        Optimizer steps in the round.
    schedule : str
        ``constant``, ``linear`` or ``cosine`` (``train.lr-schedule``).
    warmup_ratio : float
        ``train.warmup-ratio``.

    Returns
    -------
    float
        In (0, 1].
    """
    warm = warmup_steps(total, warmup_ratio)
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule == "constant" or total <= warm:
        return 1.0
    progress = (step - warm) / (total - warm)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def balanced_class_weights(labels: list[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """``N / (K x N_c)`` per class from one hospital's own training labels (sklearn's "balanced").

    ``K`` counts the classes present, so the weights average to exactly 1 over
    the rows and the loss keeps its scale; absent classes get weight 1 (they
    never occur in this hospital's loss).

    Parameters
    ----------
    labels : array of int
        The hospital's training labels.
    num_classes : int
        Classes of the model's head.

    Returns
    -------
    numpy.ndarray
        ``num_classes`` float32 weights.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _class_weights(model: torch.nn.Module, task: Task, dataset: Dataset, spec: TrainSpec) -> torch.Tensor | None:
    if spec.class_weights != "balanced":
        return None
    key = getattr(task, "class_weights_key", None)
    if key is None:
        raise ConfigError(f"`train.class-weights` {spec.class_weights!r} is not supported by task {task.name!r}; use 'none'")
    labels, num_classes = _labels(model, dataset)
    return torch.from_numpy(balanced_class_weights(labels, num_classes))


def _labels(model: torch.nn.Module, dataset: Dataset) -> tuple[np.ndarray, int]:
    """A hospital's training labels and the number of classes of the model's head."""
    labels = np.asarray(dataset["labels"], dtype=np.int64)
    config = getattr(model, "config", None)
    return labels, int(getattr(config, "num_labels", 0) or (labels.max() + 1 if labels.size else 1))


def log_class_prior(labels: list[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """``log((N_c + 1) / (N + K))`` per class from one hospital's own training labels (Laplace-smoothed, so a
    class the hospital lacks gets a large negative offset rather than minus infinity).

    Parameters
    ----------
    labels : array of int
        The hospital's training labels.
    num_classes : int
        Classes of the model's head (``K``).

    Returns
    -------
    numpy.ndarray
        ``num_classes`` float32 log-probabilities.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + num_classes)).astype(np.float32)


@contextlib.contextmanager
def logit_adjustment(model: torch.nn.Module, dataset: Dataset, spec: TrainSpec) -> Iterator[None]:
    """``train.class-weights = "logit-adjusted"``: the head's output gets the hospital's log class prior (times
    ``train.logit-adjustment-tau``) added while the block trains (a forward hook on the classification head), so
    the loss is logit-adjusted (Menon et al., ICLR 2021) and the head itself learns class scores free of this
    hospital's label mix. Evaluation outside the block sees the plain head.
    """
    if spec.class_weights != "logit-adjusted":
        yield
        return
    heads = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_MODULES]
    if not heads:
        raise ConfigError("`train.class-weights` 'logit-adjusted' needs a classification head (a module named "
                          f"{' or '.join(HEAD_MODULES)}); this model has none")
    labels, num_classes = _labels(model, dataset)
    offset = torch.from_numpy(log_class_prior(labels, num_classes)) * spec.logit_adjustment_tau

    def add_prior(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + offset.to(device=output.device, dtype=output.dtype)

    # The outermost head (peft's ModulesToSaveWrapper around the trained copy) adds it once.
    handle = heads[0].register_forward_hook(add_prior)
    try:
        yield
    finally:
        handle.remove()


def _rank_masks(named: list[tuple[str, torch.nn.Parameter]], rank: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Masks that keep LoRA components past ``rank`` where they are (rows of A, columns of B)."""
    masks = {}
    for name, param in named:
        if "lora_A" in name or "lora_B" in name:
            mask = torch.zeros_like(param)
            if "lora_A" in name:
                mask[:rank] = 1.0
            else:
                mask[:, :rank] = 1.0
            masks[param] = mask
    return masks


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    """The local optimizer ``train.optimizer`` names, fresh each round."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.learning_rate, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def train_local(
    model: torch.nn.Module,
    task: Task,
    dataset: Dataset,
    tokenizer: Any,
    *,
    spec: TrainSpec,
    device: torch.device,
    dtype: str = "float32",
    seed: int = 0,
    plan: LocalPlan | None = None,
    dp: DpSgd | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters on tokenized rows.

    Parameters
    ----------
    model : torch.nn.Module
        The LoRA-wrapped model; only parameters with ``requires_grad`` change.
    task : Task
        Provides collate and loss.
    dataset : Dataset
        Tokenized rows of this hospital.
    spec : TrainSpec
        Epochs or steps, batch size, optimizer settings.
    device : torch.device
        Where batches go.
    dtype : str
        ``float32`` or ``bfloat16`` autocast.
    seed : int
        Seeds shuffling and dropout; vary it per round and hospital.
    plan : LocalPlan, optional
        The hospital's plan (a :class:`fedfm.strategies.ClientPlan`): its
        ``fixed`` name fragments are left untouched in this call (FFA-LoRA
        freezes ``lora_A``; trainable again afterwards), only the first
        ``rank`` LoRA components train (the rest keep their values: zero, for
        heterogeneous-rank strategies), ``proximal_mu`` adds FedProx's
        ``mu/2 * ||w - w_start||^2``, and ``learning_rate_scale`` multiplies
        the learning rate. None trains every trainable parameter.
    dp : DpSgd, optional
        Train with DP-SGD instead (Opacus): ``dp.steps`` Poisson-sampled steps,
        each example's gradient clipped to ``dp.max_grad_norm``, Gaussian noise
        added; ``spec``'s epochs, steps and clipping are then not used. The
        proximal term and rank masks act on the noised gradient (they do not
        read data, so the guarantee holds), as does the learning-rate schedule.
        The configuration refuses gradient accumulation and class weights
        under DP-SGD (``fedfm.config`` validation).

    Notes
    -----
    ``spec.learning_rate`` is the round's rate (the client puts in the rate
    the server sent for the round); ``train.lr-schedule`` and
    ``train.warmup-ratio`` shape it over this call's optimizer steps, since
    the optimizer starts afresh every round. A step's loss is the mean over
    all its rows, whether they ran as one batch or as accumulated batches.

    Returns
    -------
    TrainResult
        Mean loss, steps, examples seen and seconds.
    """
    start = time.perf_counter()
    frozen = plan.fixed if plan is not None else ()
    rank = plan.rank if plan is not None else None
    proximal_mu = plan.proximal_mu if plan is not None else 0.0
    learning_rate = spec.learning_rate * (plan.learning_rate_scale if plan is not None else 1.0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    held = [p for n, p in named if any(fragment in n for fragment in frozen)]
    trained = [(n, p) for n, p in named if not any(fragment in n for fragment in frozen)]
    params = [p for _, p in trained]
    masks = _rank_masks(trained, rank) if rank is not None else {}
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    # Its own generator, so that the batches' order does not depend on whether images are changed.
    collate = task.training_collate(tokenizer, augment=spec.augment_images, rng=np.random.default_rng([seed, 1]))
    lengths = task.row_lengths(dataset)
    weights = _class_weights(model, task, dataset, spec)
    total = dp.steps if dp is not None else planned_steps(len(lengths), spec)
    losses: list[float] = []
    steps = examples = 0

    def adjust_gradients() -> None:
        # Rank masks and FedProx's pull towards the round's start, on whatever gradient the step uses.
        for p, mask in masks.items():
            if p.grad is not None:
                p.grad.mul_(mask)
        for p, a in zip(params if anchor else [], anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=proximal_mu)

    for p in held:
        p.requires_grad_(False)
    model.train()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(logit_adjustment(model, dataset, spec))
            optimizer: Any = make_optimizer(params, spec)
            forward: torch.nn.Module = model
            if dp is not None:
                forward, optimizer = stack.enter_context(
                    private_training(model, optimizer, dp, len(lengths), after_noise=adjust_gradients)
                )
                poisson = poisson_batches(len(lengths), dp.sample_rate, dp.steps, secret_rng())
                # DP: a Poisson batch may exceed train.batch-size; it runs as sorted micro-batches.
                groups: Iterator[list[list[int]]] = (
                    micro_batches(indices, lengths, spec.batch_size) for indices in poisson
                )
            else:
                groups = _batches(lengths, spec, rng)
            for chunks in groups:
                interrupt.check()  # Ctrl-C: the round is abandoned between steps (fedfm.interrupt)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate * lr_factor(
                        steps, total, schedule=spec.lr_schedule, warmup_ratio=spec.warmup_ratio
                    )
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if not chunks:
                    empty_step(optimizer)
                    continue
                rows = sum(len(chunk) for chunk in chunks)
                for chunk in chunks:
                    batch = collate([dataset[i] for i in chunk])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    if weights is not None:
                        batch[task.class_weights_key] = weights.to(device)  # type: ignore[attr-defined]
                    with autocast(device, dtype):
                        loss = task.loss(forward, batch)
                    # Accumulated batches: each weighted by its share of the step's rows. Under DP
                    # each forward pass keeps its own mean (Opacus undoes it per pass; see dpsgd.py).
                    (loss if dp is not None else loss * (len(chunk) / rows)).backward()
                    losses.append(float(loss.detach()) * len(chunk))
                    examples += len(chunk)
                if dp is None:
                    adjust_gradients()
                    if spec.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
    finally:
        model.eval()
        for p in held:
            p.requires_grad_(True)
    return TrainResult(
        loss=float(np.sum(losses) / examples) if examples else 0.0,
        steps=steps,
        examples=examples,
        seconds=time.perf_counter() - start,
        learning_rate=learning_rate,
    )
