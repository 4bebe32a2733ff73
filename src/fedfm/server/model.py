"""The server's own copy of the model: the starting adapter, and a global record put into it."""

from __future__ import annotations

import numpy as np
import torch

from fedfm import strategies
from fedfm.adapters import load_global_adapter
from fedfm.config import RunConfig
from fedfm.privacy.hospital import recipe_of
from fedfm.privacy.linear_probe import zero_head_arrays
from fedfm.workspace import Workspace


def initial_arrays(workspace: Workspace, config: RunConfig) -> dict[str, np.ndarray]:
    """The adapter the run starts from (this process's freshly built LoRA), as numpy arrays.

    Under the DP linear probe the head starts at zero (:mod:`fedfm.privacy.linear_probe`). ``config`` is the
    run's own: a cached workspace may have been built for another run of the same model and data, whose
    privacy settings differ.
    """
    arrays = {k: v.numpy() for k, v in workspace.loaded.initial_state.items()}
    if config.privacy.mode == "dp-sgd" and recipe_of(config) == "linear-probe":
        return zero_head_arrays(arrays)
    return arrays


def load_global(
    workspace: Workspace, config: RunConfig, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Put a global record into this process's model as the server sees it; returns state and folded factors."""
    return load_global_adapter(workspace.loaded, strategies.client_plan(config, -1), arrays)
