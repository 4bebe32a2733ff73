"""FedSA-LoRA: only the A matrices are shared and averaged; each hospital keeps its own B.

Guo, Wu, Wang, Ma, Xu, Gao, Wang, Ji (ICLR 2025), "Selective Aggregation for
Low-Rank Adaptation in Federated Learning", https://arxiv.org/abs/2410.01463

The paper finds that A learns general knowledge and B hospital-specific
knowledge; averaging A and keeping B local personalizes the model. Each
hospital's B lives in its persistent Flower context state across rounds and
never leaves it. The task head is shared and averaged with A (fedfm's choice:
the label space is common to the federation).

The global adapter alone (A and head, B at its zero initialisation) is not a
model anyone uses: a run reports each hospital's personalized score on its own
test split; the server's global-test score shows what the shared part alone does.
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
    """Weighted mean of the hospitals' A matrices and head (their B matrices never arrive)."""
    return weighted_mean(updates, weights)


class FedSaLora(AdapterStrategy):
    """Federated Share-A LoRA (Guo et al., ICLR 2025)."""

    linear = True
    personalized = True

    @classmethod
    def client_plan(cls, config: RunConfig, hospital: int) -> ClientPlan:
        return ClientPlan(private=("lora_B",))

    def aggregate_arrays(self, server_round: int, updates: list[Update]) -> dict[str, np.ndarray]:
        return aggregate([u.arrays for u in updates], [u.weight for u in updates])
