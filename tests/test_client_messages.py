"""What leaves a hospital: only adapter tensors and scalar metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from conftest import instruction
from fedfm import keys
from fedfm.client import app
from fedfm.config import RunConfig, to_json
from fedfm.errors import ConfigError
from fedfm.wire import payload_bytes, state_to_record
from fedfm.workspace import workspace_for


@pytest.fixture()
def config(tiny_csv_settings: dict[str, Any]) -> RunConfig:
    return RunConfig().replace(**tiny_csv_settings, **{"train.local-steps": 3})


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={keys.PARTITION_ID: partition, keys.NUM_PARTITIONS: 2},
                   state=RecordDict(), run_config={})


def _content(config: RunConfig, server_round: int = 1) -> RecordDict:
    initial = workspace_for(config).loaded.initial_state
    return RecordDict(
        {
            keys.ARRAYS: state_to_record(initial),
            keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: server_round}),
        }
    )


def test_train_reply_carries_only_lora_tensors_and_scalar_metrics(config: RunConfig) -> None:
    # Prepare
    workspace = workspace_for(config)
    sent = _content(config)
    # Execute
    answer = app(instruction(sent, message_type="train"), _context(1))
    # Assert
    assert not answer.has_error(), answer.error
    records = dict(answer.content.items())
    assert set(records) == {keys.ARRAYS, keys.METRICS}
    arrays, metrics = records[keys.ARRAYS], records[keys.METRICS]
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    for name in arrays:
        assert "lora_A" in name or "lora_B" in name or ".classifier." in name, f"{name} must not leave the hospital"
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics[keys.NUM_EXAMPLES] == len(workspace.federation.hospitals[1].train)
    assert metrics[keys.HOSPITAL_INDEX] == 1
    parameters = sum(a.numpy().size for a in arrays.values())
    assert parameters < 0.02 * workspace.loaded.base_parameters
    assert payload_bytes(answer.content) < 0.02 * 4 * workspace.loaded.base_parameters
    # The adapter was trained: at least one LoRA tensor moved.
    before = {k: v.numpy() for k, v in sent[keys.ARRAYS].items()}  # type: ignore[union-attr]
    assert any(not np.allclose(before[k], v.numpy()) for k, v in arrays.items())


def test_evaluate_reply_carries_only_metrics(config: RunConfig) -> None:
    answer = app(instruction(_content(config), message_type="evaluate"), _context(0))
    assert not answer.has_error(), answer.error
    records = dict(answer.content.items())
    assert list(records) == [keys.METRICS]
    metrics = records[keys.METRICS]
    assert {"accuracy", "macro-f1", "loss", keys.NUM_EXAMPLES} <= set(metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_missing_partition_id_names_the_node_config_key(config: RunConfig) -> None:
    # Flower's runtime turns this exception into an error reply that the server logs.
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match=f"--node-config \"{keys.PARTITION_ID}="):
        app(instruction(_content(config), message_type="train"), context)
