"""A strategy of your own in about 30 lines: FedAvg with each hospital's update norm bounded.

Bounding the L2 norm of every update before averaging limits how far one
faulty or hostile hospital can pull the global adapter (Sun et al. 2019,
"Can You Really Backdoor Federated Learning?", https://arxiv.org/abs/1911.07963).
"""

from __future__ import annotations

import numpy as np

from fedfm.strategies import AdapterStrategy, Update, register, weighted_mean


def bounded_mean(current: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
                 weights: list[float], max_norm: float) -> dict[str, np.ndarray]:
    """Weighted mean of the updates after scaling each difference to the global down to ``max_norm``."""
    clipped = []
    for update in updates:
        delta = {k: update[k] - current[k] for k in update}
        norm = float(np.sqrt(sum((d.astype(np.float64) ** 2).sum() for d in delta.values())))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped.append({k: current[k] + scale * d for k, d in delta.items()})
    return weighted_mean(clipped, weights)


class NormBoundedFedAvg(AdapterStrategy):
    """FedAvg of updates clipped to an L2 norm of ``max_norm`` (pure maths in :func:`bounded_mean`)."""

    linear = False  # the server must see each update to clip it
    max_norm = 0.5

    def aggregate_arrays(self, server_round: int, updates: list[Update]) -> dict[str, np.ndarray]:
        return bounded_mean(self.current, [u.arrays for u in updates], [u.weight for u in updates], self.max_norm)


register("norm-bounded-fedavg", NormBoundedFedAvg)
