"""Checks a hospital's update must pass before it may enter an aggregate (pure numpy)."""

from __future__ import annotations

import numpy as np


def update_problems(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[str]:
    """Why an update cannot be aggregated with the reference adapter; empty when it can.

    Parameters
    ----------
    update : dict of str to ndarray
        A hospital's adapter tensors by name.
    reference : dict of str to ndarray
        The global adapter the hospital was sent (names and shapes to match).

    Returns
    -------
    list of str
        One message per problem: missing or unexpected names, shape mismatches,
        non-numeric dtypes, NaN or Inf values.
    """
    problems: list[str] = []
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:2]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:2]}")
    for name in sorted(set(update) & set(reference)):
        value, ref = update[name], reference[name]
        if value.shape != ref.shape:
            problems.append(f"`{name}` has shape {value.shape}, expected {ref.shape}")
        elif not np.issubdtype(value.dtype, np.number):
            problems.append(f"`{name}` has non-numeric dtype {value.dtype}")
        elif not np.all(np.isfinite(value)):
            problems.append(f"`{name}` holds NaN or Inf")
    return problems
