"""Sample-level DP-SGD inside a hospital, with Opacus on the trainable (LoRA) parameters.

:func:`fedfm.train.train_local` calls into this module when it is given a
:class:`DpSgd`: batches are Poisson-sampled, Opacus's ``GradSampleModule``
computes per-example gradients of the LoRA tensors (and the task head), and
Opacus's ``DPOptimizer`` clips each example's gradient and adds Gaussian
noise. The wrapping is undone after the round, so the shared base model of a
simulation worker, and the adapter's peft key names, are never changed.

Randomness that protects the data (which rows a step samples, the noise)
comes from the operating system, never from ``train.seed``: the server knows
that seed, and could otherwise replay the noise and subtract it.
"""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfm.config import TrainSpec

if TYPE_CHECKING:  # torch is imported where it is used: the server's accounting never needs it
    import torch


@dataclass(frozen=True)
class DpSgd:
    """What one round of DP-SGD does: σ, the per-example clip, Poisson rate and steps."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int


def sample_rate(batch_size: int, num_rows: int) -> float:
    """Probability that a row joins a step's batch: expected batch size / rows (at most 1)."""
    return min(1.0, batch_size / max(num_rows, 1))


def steps_per_round(spec: TrainSpec, batch_size: int, num_rows: int) -> int:
    """DP-SGD steps in one round: ``local-steps``, or the expected steps of ``local-epochs`` passes."""
    if spec.local_steps > 0:
        return spec.local_steps
    return max(1, round(spec.local_epochs / sample_rate(batch_size, num_rows)))


def secret_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy (not reproducible, on purpose)."""
    return np.random.default_rng(secrets.randbits(128))


def poisson_batches(num_rows: int, rate: float, steps: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """``steps`` batches, each row joining each batch independently with probability ``rate``.

    Batches vary in size and may be empty; that is what the accountant's
    sampling analysis assumes.
    """
    for _ in range(steps):
        yield np.flatnonzero(rng.random(num_rows) < rate).tolist()


def micro_batches(indices: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """One Poisson batch as length-sorted chunks of at most ``size`` rows.

    A Poisson batch is a random draw, so run as one forward pass every row
    would be padded to the batch's longest. Sorted chunks pad far less, and
    give the same per-example gradients: Opacus collects them across the
    chunks' backward passes and clips, sums and noises them in one step.
    Rows of one length (images: every image is the same number of patches)
    keep their drawn order.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


@contextlib.contextmanager
def private_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: DpSgd,
    num_rows: int,
    after_noise: Callable[[], None] | None = None,
) -> Iterator[tuple[torch.nn.Module, Any]]:
    """Wrap ``model`` for per-example gradients and ``optimizer`` for clipping and noise.

    Yields the module to run forward passes through and the ``DPOptimizer``.
    A step may follow several backward passes (micro-batches of one Poisson
    batch, each with its mean loss): the noised sum of clipped per-example
    gradients is divided by the *expected* batch size, which does not depend
    on the data, and then ``after_noise`` runs (it must not read data).
    On exit every Opacus hook and per-parameter attribute is removed again.
    Parameters must already have their final ``requires_grad`` for the round.
    """
    import torch
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # "mean" here only tells Opacus that each backward pass's loss is a mean
    # over its micro-batch, so per-example gradients come out unscaled.
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    noise = torch.Generator(device=next(p.device for p in model.parameters()))
    noise.manual_seed(secrets.randbits(63))
    expected = dp.sample_rate * num_rows
    # "sum": Opacus's own mean mode would also divide by the number of backward passes.
    private = DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=None,
        loss_reduction="sum",
        generator=noise,
    )

    def average() -> None:
        for p in private.params:
            if p.grad is not None:
                p.grad.div_(expected)
        if after_noise is not None:
            after_noise()

    private.attach_step_hook(lambda _: average())
    try:
        with warnings.catch_warnings():
            # LoRA layers see inputs that need no gradient; Opacus's hooks fire on outputs, as intended.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield wrapped, private
    finally:
        wrapped._close()  # removes hooks and Opacus's per-parameter attributes
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def empty_step(optimizer: Any) -> None:
    """A step on an empty Poisson batch: no gradient, but the noise is still added (and accounted)."""
    import torch

    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
