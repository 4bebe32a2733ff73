"""The local training loop of one hospital (plain torch; Flower never appears here)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from fedfm.config import TrainSpec
from fedfm.privacy.dpsgd import DpSgd, empty_step, micro_batches, poisson_batches, private_training, secret_rng
from fedfm.tasks import Task


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float
    steps: int
    examples: int
    seconds: float


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked for (fast on CPUs with AMX and on GPUs); a no-op for float32."""
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


def _batches(lengths: list[int], spec: TrainSpec, rng: np.random.Generator) -> Iterator[list[int]]:
    if spec.local_steps > 0:
        steps = 0
        while True:
            for batch in bucketed_batches(lengths, spec.batch_size, rng):
                yield batch
                steps += 1
                if steps >= spec.local_steps:
                    return
    else:
        for _ in range(spec.local_epochs):
            yield from bucketed_batches(lengths, spec.batch_size, rng)


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
    frozen: tuple[str, ...] = (),
    rank: int | None = None,
    proximal_mu: float = 0.0,
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
    frozen : tuple of str
        Name fragments of trainable parameters to leave untouched in this call
        (FFA-LoRA freezes ``lora_A``); they are trainable again afterwards.
    rank : int, optional
        Train only the first ``rank`` LoRA components (rows of A, columns of B);
        the rest keep their values (zero, for heterogeneous-rank strategies).
    proximal_mu : float
        FedProx: add ``mu/2 * ||w - w_start||^2`` over the trained parameters.
    dp : DpSgd, optional
        Train with DP-SGD instead (Opacus): ``dp.steps`` Poisson-sampled steps,
        each example's gradient clipped to ``dp.max_grad_norm``, Gaussian noise
        added; ``spec``'s epochs, steps and clipping are then not used. The
        proximal term and rank masks act on the noised gradient (they do not
        read data, so the guarantee holds).

    Returns
    -------
    TrainResult
        Mean loss, steps, examples seen and seconds.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    held = [p for n, p in named if any(fragment in n for fragment in frozen)]
    trained = [(n, p) for n, p in named if not any(fragment in n for fragment in frozen)]
    params = [p for _, p in trained]
    masks = _rank_masks(trained, rank) if rank is not None else {}
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    collate = task.collate(tokenizer)
    lengths = [len(ids) for ids in dataset["input_ids"]]
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
            optimizer: Any = make_optimizer(params, spec)
            forward: torch.nn.Module = model
            if dp is not None:
                forward, optimizer = stack.enter_context(
                    private_training(model, optimizer, dp, len(lengths), after_noise=adjust_gradients)
                )
                batches: Iterator[list[int]] = poisson_batches(len(lengths), dp.sample_rate, dp.steps, secret_rng())
            else:
                batches = _batches(lengths, spec, rng)
            for indices in batches:
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if not indices:
                    empty_step(optimizer)
                    continue
                # DP: a Poisson batch may exceed train.batch-size; it runs as sorted micro-batches.
                chunks = micro_batches(indices, lengths, spec.batch_size) if dp is not None else [indices]
                for chunk in chunks:
                    batch = collate([dataset[i] for i in chunk])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with autocast(device, dtype):
                        loss = task.loss(forward, batch)
                    loss.backward()
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
    )
