"""Corrupted updates from simulated faulty or hostile hospitals (robustness experiments; pure numpy).

``[attack] hospitals = [8, 9]`` makes those hospitals train as usual and then
send a corrupted adapter instead, so a strategy's robustness is measured on a
real federation rather than asserted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def corrupt(
    sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *, kind: str, scale: float, seed: int
) -> dict[str, np.ndarray]:
    """The adapter a hostile hospital sends in place of its honest one.

    Parameters
    ----------
    sent : mapping of str to ndarray
        The honest adapter after local training.
    received : mapping of str to ndarray
        The same tensors as they were before training (the global).
    kind : str
        ``sign-flip``: ``global - scale * update``; ``scale``: ``global + scale * update``;
        ``noise``: ``global + N(0, scale^2)``; ``nan``: NaN everywhere.
    scale : float
        Strength.
    seed : int
        Seeds the noise.

    Returns
    -------
    dict of str to ndarray
        Same names, shapes and dtypes as ``sent``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, value in sent.items():
        base = np.asarray(received[name], dtype=np.float64)
        update = np.asarray(value, dtype=np.float64) - base
        if kind == "sign-flip":
            bad = base - scale * update
        elif kind == "scale":
            bad = base + scale * update
        elif kind == "noise":
            bad = base + rng.normal(0.0, scale, size=base.shape)
        elif kind == "nan":
            bad = np.full(base.shape, np.nan)
        else:
            raise ValueError(f"unknown attack kind {kind!r}; known: sign-flip, scale, noise, nan")
        out[name] = bad.astype(value.dtype)
    return out


def fails(*, rate: float, seed: int, server_round: int, hospital: int, attempt: int = 0) -> bool:
    """Whether a simulated hospital crashes this time it is asked (a reproducible draw; ``rate`` 0 never)."""
    if rate <= 0:
        return False
    return bool(np.random.default_rng([seed, server_round, hospital, attempt, 0xFA17]).random() < rate)
