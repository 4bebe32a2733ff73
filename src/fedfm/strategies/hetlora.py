"""HetLoRA: hospitals train different LoRA ranks; the server zero-pads, aggregates and truncates.

Cho, Liu, Ma, Ghosh, Joshi (EMNLP 2024), "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", https://arxiv.org/abs/2401.06432

Hospital k trains the first ``r_k`` components of the global rank-``R`` adapter
(``federation.client-ranks``; ``R = lora.r``) and sends only those. The server
zero-pads every update to rank R and averages each module's factors with the
paper's sparsity weights, ``p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F``, so a
hospital whose update carries more signal counts more and the zeros of small
ranks do not dilute the large ones as much. ``strategy.hetlora-weighting =
"examples"`` gives plain zero-padded averaging by example counts instead (the
naive baseline). Rank self-pruning from the paper is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedfm.config import hospital_rank
from fedfm.strategies.base import AdapterStrategy, Update, weighted_mean
from fedfm.strategies.plan import LORA_A, LORA_B, ClientPlan, is_lora, lora_modules, pad_rank

if TYPE_CHECKING:
    from fedfm.config import RunConfig


def product_norm(a: np.ndarray, b: np.ndarray) -> float:
    """``||B A||_F`` computed through the small ``r x r`` Gram matrices."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(max(np.trace((b64.T @ b64) @ (a64 @ a64.T)), 0.0)))


def aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    rank: int,
    weighting: str = "sparsity",
) -> dict[str, np.ndarray]:
    """Zero-pad each update to ``rank`` and average.

    Parameters
    ----------
    updates : sequence of mapping of str to ndarray
        Per hospital: LoRA A (``r_k x in``) and B (``out x r_k``) per module, and
        any other tensors (e.g. the head) at their full shapes.
    weights : sequence of float
        Example counts, used for the non-LoRA tensors, and for LoRA factors when
        ``weighting`` is ``examples``.
    rank : int
        The global rank R.
    weighting : str
        ``sparsity`` (per module, proportional to ``||B_k A_k||_F``) or ``examples``.

    Returns
    -------
    dict of str to ndarray
        The rank-R global adapter.
    """
    padded = [pad_rank(u, rank) for u in updates]
    others = [{n: v for n, v in p.items() if not is_lora(n)} for p in padded]
    out = weighted_mean(others, weights) if others[0] else {}
    for module in lora_modules(updates[0]):
        a_name, b_name = module + LORA_A, module + LORA_B
        module_weights = list(weights)
        if weighting == "sparsity":
            norms = [product_norm(u[a_name], u[b_name]) for u in updates]
            if sum(norms) > 0:
                module_weights = norms
        out.update(weighted_mean([{a_name: p[a_name], b_name: p[b_name]} for p in padded], module_weights))
    return out


class HetLora(AdapterStrategy):
    """Heterogeneous-rank LoRA by zero-padding and truncation (Cho et al., EMNLP 2024)."""

    # Sparsity weights depend on each update's own norm: the server must see every update.
    linear = False
    heterogeneous_ranks = True

    @classmethod
    def client_plan(cls, config: RunConfig, hospital: int) -> ClientPlan:
        if hospital < 0:
            return ClientPlan()
        return ClientPlan(rank=hospital_rank(config, hospital))

    def aggregate_arrays(self, server_round: int, updates: list[Update]) -> dict[str, np.ndarray]:
        return aggregate(
            [u.arrays for u in updates],
            [u.weight for u in updates],
            rank=self.config.lora.r,
            weighting=self.config.strategy.hetlora_weighting,
        )
