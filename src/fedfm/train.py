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


def _rank_hooks(named: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[Any]:
    """Gradient masks that keep LoRA components past ``rank`` where they are."""
    hooks = []
    for name, param in named:
        if "lora_A" in name or "lora_B" in name:
            mask = torch.zeros_like(param)
            if "lora_A" in name:
                mask[:rank] = 1.0
            else:
                mask[:, :rank] = 1.0
            hooks.append(param.register_hook(lambda grad, mask=mask: grad * mask))
    return hooks


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
    hooks = _rank_hooks(trained, rank) if rank is not None else []
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    collate = task.collate(tokenizer)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    losses: list[float] = []
    examples = 0
    for p in held:
        p.requires_grad_(False)
    model.train()
    try:
        for indices in _batches(lengths, spec, rng):
            batch = collate([dataset[i] for i in indices])
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                loss = task.loss(model, batch)
            objective = loss
            if anchor:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                objective = loss + 0.5 * proximal_mu * drift
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            examples += len(indices)
    finally:
        model.eval()
        for p in held:
            p.requires_grad_(True)
        for hook in hooks:
            hook.remove()
    return TrainResult(
        loss=float(np.mean(losses)) if losses else 0.0,
        steps=len(losses),
        examples=examples,
        seconds=time.perf_counter() - start,
    )
