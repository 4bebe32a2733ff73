"""Every registered strategy through Flower's simulation engine: tiny BERT, 3 hospitals, 2 rounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedfm import strategies
from fedfm.config import RunConfig

pytestmark = pytest.mark.integration

BUILT_IN = ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg",
            "krum", "multikrum", "ffa-lora", "fedsa-lora", "hetlora", "flora"]
RANKS = (2, 4, 3)


def test_the_table_covers_the_registry() -> None:
    assert sorted(BUILT_IN) == [n for n in strategies.available() if ":" not in n]


@pytest.mark.parametrize("name", BUILT_IN)
def test_strategy_runs_a_real_federation(name: str, tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    # Prepare
    import fedfm

    settings: dict[str, Any] = {**tiny_csv_settings}
    if name in ("hetlora", "flora"):
        settings["federation.client-ranks"] = RANKS
    config = RunConfig().replace(**{
        **settings,
        "data.partitioner": "iid",
        "data.num-hospitals": 3,
        "train.learning-rate": 2e-2,
        "train.local-steps": 4,
        "federation.num-rounds": 2,
        "federation.min-hospitals": 3,
        "federation.strategy": name,
    })
    # Execute
    result = fedfm.run(config, out=tmp_path / name)
    # Assert: two aggregated rounds, no hospital left out, a loadable adapter
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["aggregated"] is True, line
        assert line["left_out"] == {}
        assert len(line["per_hospital"]) == 3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.summary["strategy"] == name
    up = {h: v["bytes_up"] for h, v in lines[0]["per_hospital"].items()}
    if name in ("hetlora", "flora"):
        # Each hospital sends its own rank: rank 4 sends more than rank 3 more than rank 2.
        assert up["hospital-1"] > up["hospital-2"] > up["hospital-0"]
    if name == "hetlora":
        # From round 2 the server knows which node is which hospital and sends each only its rank.
        down = {h: v["bytes_down"] for h, v in lines[1]["per_hospital"].items()}
        assert down["hospital-1"] > down["hospital-2"] > down["hospital-0"]
    if name == "flora":
        adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert adapter_config["r"] == 2 * sum(RANKS)  # stacked over two rounds
    if name == "fedsa-lora":
        assert result.summary["personalized"] is True
