"""FFA-LoRA: A frozen at a shared random initialisation, only B trained, sent and averaged.

Sun, Qin, Li, Ding (ICLR 2024), "Improving LoRA in Privacy-preserving Federated
Learning", https://arxiv.org/abs/2403.12313

With every hospital's A equal to the same fixed A, the mean of the products is
the product of the means, ``mean_k(B_k) A = mean_k(B_k A)``: plain averaging is
exact, and only half of the LoRA tensors travel. Every process builds the same
A from ``train.seed``, so A never leaves a hospital or the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedfm.strategies.base import AdapterStrategy, Update, weighted_mean
from fedfm.strategies.plan import ClientPlan

if TYPE_CHECKING:
    from fedfm.config import RunConfig


def aggregate(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of the hospitals' B matrices and head (A is not among them: it is fixed)."""
    return weighted_mean(updates, weights)


class FfaLora(AdapterStrategy):
    """Federated Freeze-A LoRA (Sun et al., ICLR 2024)."""

    linear = True

    @classmethod
    def client_plan(cls, config: RunConfig, hospital: int) -> ClientPlan:
        return ClientPlan(fixed=("lora_A",), learning_rate_scale=config.strategy.ffa_learning_rate_scale)

    def aggregate_arrays(self, server_round: int, updates: list[Update]) -> dict[str, np.ndarray]:
        return aggregate([u.arrays for u in updates], [u.weight for u in updates])
