"""The one boundary between torch tensors and Flower records."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

if TYPE_CHECKING:
    import torch

# torch is imported inside the two functions that need it, so that the
# strategies can use the numpy half of this module without loading torch.


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors (by peft name) into an ArrayRecord, names kept."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord back into named torch tensors."""
    import torch

    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays (for the strategies' pure maths)."""
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays into an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower serializes them (tensors and metrics)."""
    return int(sum(record.count_bytes() for record in content.values()))
