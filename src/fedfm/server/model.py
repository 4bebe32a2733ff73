"""The server's own copy of the model: the starting adapter, and a global record put into it."""

from __future__ import annotations

import numpy as np
import torch

from fedfm import strategies
from fedfm.adapters import set_adapter_state, set_base_delta
from fedfm.config import RunConfig
from fedfm.workspace import Workspace


def initial_arrays(workspace: Workspace) -> dict[str, np.ndarray]:
    """The adapter the run starts from (this process's freshly built LoRA), as numpy arrays."""
    return {k: v.numpy() for k, v in workspace.loaded.initial_state.items()}


def load_global(
    workspace: Workspace, config: RunConfig, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Put a global record into this process's model as the server sees it; returns state and folded factors."""
    plan = strategies.client_plan(config, -1)
    state, fold = plan.materialize(initial_arrays(workspace), arrays)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    set_base_delta(workspace.loaded, fold)
    set_adapter_state(workspace.loaded.model, tensors)
    return tensors, fold
