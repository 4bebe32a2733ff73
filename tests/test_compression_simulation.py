"""Compressed replies through the ClientApp and through Flower's simulation: smaller, decoded, aggregated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from safetensors.numpy import load_file

from fedfm import keys
from fedfm.client import app
from fedfm.compression import INDICES, VALUES, topk_count
from fedfm.config import RunConfig, to_json
from fedfm.errors import ConfigError
from fedfm.wire import numpy_to_record
from fedfm.workspace import workspace_for
from tests.conftest import instruction


def _config(settings: dict[str, Any], **extra: Any) -> RunConfig:
    return RunConfig().replace(**{
        **settings,
        "data.partitioner": "iid",
        "data.num-hospitals": 3,
        "train.learning-rate": 2e-2,
        "train.local-steps": 3,
        "federation.num-rounds": 2,
        "federation.min-hospitals": 3,
        **extra,
    })


def test_topk_reply_sends_only_its_share_and_keeps_the_rest_at_home(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare
    config = _config(tiny_csv_settings, **{"compression.method": "topk", "compression.topk-fraction": 0.25})
    initial = {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}
    context = Context(run_id=1, node_id=101, node_config={keys.PARTITION_ID: 0}, state=RecordDict(), run_config={})
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(initial),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: 1}),
    })
    # Act
    answer = app(instruction(content, message_type="train"), context)
    # Assert: indices and values of a quarter of each tensor; the residual stays in the hospital's state
    assert not answer.has_error(), answer.error
    sent = answer.content[keys.ARRAYS]
    assert set(sent.keys()) == {INDICES, VALUES}
    assert sent[VALUES].numpy().size == sum(topk_count(v.size, 0.25) for v in initial.values())
    residual = context.state[keys.COMPRESSION_RESIDUAL]
    assert isinstance(residual, ArrayRecord) and set(residual.keys()) == set(initial)


def test_compression_that_cannot_work_is_refused_before_anything_loads() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"compression.method": "gzip", "compression.topk-fraction": 0.0})
    assert "`compression.method` must be one of ['none', 'float16', 'bfloat16', 'int8', 'topk'], got 'gzip'" in str(err.value)
    assert "`compression.topk-fraction` must be in (0, 1], got 0.0" in str(err.value)
    with pytest.raises(ConfigError, match="SecAgg"):
        RunConfig().replace(**{"compression.method": "int8", "privacy.secure-aggregation": True})
    with pytest.raises(ConfigError, match="client-level DP"):
        RunConfig().replace(**{"compression.method": "float16", "privacy.client-dp": "server-fixed"})


def _run(config: RunConfig, out: Path) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    import fedfm

    result = fedfm.run(config, out=out)
    assert result.summary["compression"] == config.compression.method
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines, load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def _up(lines: list[dict[str, Any]]) -> float:
    return sum(h["bytes_up"] for line in lines for h in line["per_hospital"].values())


@pytest.mark.integration
def test_compressed_federations_aggregate_what_was_meant(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    # Prepare: one round of the same federation (CPU training is deterministic), uncompressed and with every method
    one = {"federation.num-rounds": 1}
    plain_lines, plain = _run(_config(tiny_csv_settings, **one), tmp_path / "none")
    runs = {
        method: _run(_config(tiny_csv_settings, **one, **{"compression.method": method}), tmp_path / method)
        for method in ("float16", "bfloat16", "int8", "topk")
    }
    # Assert: the round aggregated all three hospitals, on fewer bytes
    for method, (lines, _) in runs.items():
        assert [line["aggregated"] for line in lines] == [True], method
        assert all(line["left_out"] == {} for line in lines), method
    # Replies also carry metrics; what a method saves is measured against the float32 tensors' bytes.
    tensors = 3 * sum(v.nbytes for v in plain.values())
    saved = {method: (_up(plain_lines) - _up(lines)) / tensors for method, (lines, _) in runs.items()}
    # (int8 and top-k pack all tensors into two arrays, so they also save per-array overhead)
    assert saved["float16"] > 0.45 and saved["bfloat16"] > 0.45
    assert saved["int8"] > 0.7
    assert saved["topk"] > 0.75
    # ... and the global adapter is what the uncompressed run reached, within each method's rounding
    # (B starts at zero, so the global B is the mean update; a hospital's own update is at most a few times larger)
    lora_b = [name for name in plain if "lora_B" in name]
    for method, rel in (("float16", 1e-3), ("bfloat16", 1e-2), ("int8", 2e-2)):
        for name in lora_b:
            scale = np.abs(plain[name]).max()
            assert np.abs(runs[method][1][name] - plain[name]).max() <= rel * scale + 1e-7, (method, name)
    # top-k sends a tenth of each hospital's update: B moves, sparsely (the rest waits at the hospitals)
    for name in lora_b:
        moved = np.count_nonzero(runs["topk"][1][name])
        assert 0 < moved <= 3 * topk_count(plain[name].size, 0.1), name


@pytest.mark.integration
@pytest.mark.parametrize(("strategy", "method"), [("ffa-lora", "topk"), ("fedsa-lora", "int8"), ("hetlora", "topk"),
                                                  ("flora", "int8"), ("fedadam", "int8")])
def test_update_compression_composes_with_strategies_that_share_other_parts(
    strategy: str, method: str, tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    extra: dict[str, Any] = {"federation.strategy": strategy, "compression.method": method}
    if strategy in ("hetlora", "flora"):
        extra["federation.client-ranks"] = (2, 4, 3)
    lines, adapter = _run(_config(tiny_csv_settings, **extra), tmp_path / strategy)
    assert [line["aggregated"] for line in lines] == [True, True]
    assert all(line["left_out"] == {} for line in lines), lines[-1]["left_out"]
    assert all(np.isfinite(v).all() for v in adapter.values())
