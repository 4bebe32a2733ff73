"""FLoRA: stack the hospitals' LoRA factors so the global update is exactly the weighted sum of B_k A_k.

Wang, Shen, Ye, Li, Jin, Chen, Zhang (NeurIPS 2024), "FLoRA: Federated
Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
https://arxiv.org/abs/2409.05976

Averaging A and B separately is not averaging their products:
``mean(B) mean(A) != mean(B A)``. FLoRA concatenates instead. With weights
``p_k``, stacking ``A = [p_1 A_1; ...; p_K A_K]`` (rows) and
``B = [B_1, ..., B_K]`` (columns) gives ``B A = sum_k p_k B_k A_k`` exactly,
whatever each hospital's rank ``r_k``. Hospitals add the stacked product to
their base weights and start the next round from a fresh adapter.

fedfm keeps the stacked factors of all rounds in the global record
(``<module>.stacked_A`` / ``.stacked_B``), so a hospital that missed rounds, or
a process that simulated other hospitals meanwhile, rebuilds the same base from
the original weights; their rank grows by ``sum_k r_k`` each round (the cost of
exactness the paper also pays). The task head is averaged as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedfm.config import hospital_rank
from fedfm.strategies.base import AdapterStrategy, Update, weighted_mean
from fedfm.strategies.plan import LORA_A, LORA_B, STACKED_A, STACKED_B, ClientPlan, is_lora, lora_modules

if TYPE_CHECKING:
    from fedfm.config import RunConfig


def empty_stack(initial: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rank-0 stacked factors for every LoRA module of an adapter (the global before round 1)."""
    out: dict[str, np.ndarray] = {}
    for module in lora_modules(initial):
        a, b = initial[module + LORA_A], initial[module + LORA_B]
        out[module + STACKED_A] = np.zeros((0, a.shape[1]), dtype=np.float32)
        out[module + STACKED_B] = np.zeros((b.shape[0], 0), dtype=np.float32)
    return out


def stack(
    previous: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
) -> dict[str, np.ndarray]:
    """Append this round's weighted factors to the stacked global.

    Parameters
    ----------
    previous : mapping of str to ndarray
        The global record: ``<module>.stacked_A`` (``R x in``), ``<module>.stacked_B``
        (``out x R``) and the averaged other tensors (head).
    updates : sequence of mapping of str to ndarray
        Per hospital: LoRA A (``r_k x in``), B (``out x r_k``) per module, and the other tensors.
    weights : sequence of float
        Example counts; normalised to ``p_k``.

    Returns
    -------
    dict of str to ndarray
        The new global: ``stacked_B @ stacked_A`` equals the previous product plus
        ``sum_k p_k B_k A_k``; other tensors are the weighted mean of the updates.
    """
    total = float(sum(weights))
    p = [w / total for w in weights]
    others = [{n: v for n, v in u.items() if not is_lora(n)} for u in updates]
    out = weighted_mean(others, weights) if others[0] else {}
    for module in lora_modules(updates[0]):
        a_parts = [previous[module + STACKED_A]] + [pk * u[module + LORA_A] for pk, u in zip(p, updates, strict=True)]
        b_parts = [previous[module + STACKED_B]] + [u[module + LORA_B] for u in updates]
        out[module + STACKED_A] = np.concatenate(a_parts, axis=0).astype(np.float32)
        out[module + STACKED_B] = np.concatenate(b_parts, axis=1).astype(np.float32)
    return out


class FLoRA(AdapterStrategy):
    """Stacking-based heterogeneous-rank LoRA aggregation (Wang et al., NeurIPS 2024)."""

    # The server concatenates individual updates: it must see each one, not only their sum.
    linear = False
    heterogeneous_ranks = True

    @classmethod
    def client_plan(cls, config: RunConfig, hospital: int) -> ClientPlan:
        rank = hospital_rank(config, hospital) if hospital >= 0 else None
        return ClientPlan(rank=rank, fold=True)

    def initial_arrays(self, initial: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        head = {n: v for n, v in initial.items() if not is_lora(n)}
        return {**head, **empty_stack(initial)}

    def aggregate_arrays(self, server_round: int, updates: list[Update]) -> dict[str, np.ndarray]:
        return stack(self.current, [u.arrays for u in updates], [u.weight for u in updates])
