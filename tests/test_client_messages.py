"""What leaves a hospital: only adapter tensors and scalar metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from conftest import instruction
from fedfm import keys, strategies
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


def test_legacy_secagg_instruction_parses_to_the_same_instruction(config: RunConfig) -> None:
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedfm import legacy
    from fedfm.instruction import parse_instruction

    # Prepare: one round's instruction in fedfm's format and in Flower's legacy FitIns (arrays by position)
    node_config = {keys.PARTITION_ID: 1, keys.NUM_PARTITIONS: 2}
    entries = {keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: 3, keys.LEARNING_RATE: 0.01, keys.ATTEMPT: 1}
    arrays = {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}
    fitins = FitIns(ndarrays_to_parameters(list(arrays.values())), dict(entries))
    content = compat.fitins_to_recorddict(fitins, keep_input=True)
    # Execute
    expected = parse_instruction(ConfigRecord(entries), node_config)
    instruction, received = legacy.from_legacy(content, "fitins", node_config, lambda _: list(arrays))
    # Assert
    assert instruction == expected
    assert (instruction.server_round, instruction.learning_rate, instruction.attempt, instruction.hospital) == (3, 0.01, 1, 1)
    assert not instruction.audit and instruction.personalize_epochs == 0
    assert list(received) == list(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(received[name], value)


def test_instruction_without_a_learning_rate_takes_the_configured_one(config: RunConfig) -> None:
    from fedfm.config import round_learning_rate
    from fedfm.instruction import parse_instruction

    record = ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: 2, keys.AUDIT: True,
                           keys.PERSONALIZE_EPOCHS: 2})
    instruction = parse_instruction(record, {keys.PARTITION_ID: 0})
    assert instruction.learning_rate == round_learning_rate(config, 2)
    assert instruction.audit and instruction.personalize_epochs == 2 and instruction.attempt == 0
    assert instruction.plan == strategies.client_plan(config, 0)
