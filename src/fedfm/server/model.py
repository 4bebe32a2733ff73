"""The server's own copy of the model: the starting adapter, and a global record put into it."""

from __future__ import annotations

import numpy as np
import torch

from fedfm import strategies
from fedfm.adapters import load_global_adapter
from fedfm.config import RunConfig
from fedfm.workspace import Workspace


def initial_arrays(workspace: Workspace) -> dict[str, np.ndarray]:
    """The adapter the run starts from (this process's freshly built LoRA), as numpy arrays."""
    return {k: v.numpy() for k, v in workspace.loaded.initial_state.items()}


def load_global(
    workspace: Workspace, config: RunConfig, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Put a global record into this process's model as the server sees it; returns state and folded factors."""
    return load_global_adapter(workspace.loaded, strategies.client_plan(config, -1), arrays)
