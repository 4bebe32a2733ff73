"""Secure aggregation with Flower's SecAgg+: the server sees only the sum, and that sum is FedAvg's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfm import strategies
from fedfm.config import RunConfig
from fedfm.errors import ConfigError


def _config(settings: dict[str, Any], **extra: Any) -> RunConfig:
    return RunConfig().replace(**{
        **settings,
        "data.partitioner": "iid", "data.num-hospitals": 3,
        "train.local-steps": 3, "train.learning-rate": 2e-2,
        "federation.num-rounds": 1, "federation.min-hospitals": 3,
        **extra,
    })


@pytest.mark.parametrize("strategy", ["fedmedian", "krum", "hetlora", "flora"])
def test_secure_aggregation_is_refused_for_strategies_that_are_not_linear(strategy: str) -> None:
    config = RunConfig().replace(**{"federation.strategy": strategy, "privacy.secure-aggregation": True})
    with pytest.raises(ConfigError, match="needs a strategy whose aggregate is a weighted sum"):
        strategies.check(config)


def test_secure_aggregation_with_client_level_dp_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="cannot be combined with `privacy.client-dp`"):
        RunConfig().replace(**{"privacy.secure-aggregation": True, "privacy.client-dp": "server-fixed"})


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "ffa-lora", "fedsa-lora"])
def test_linear_strategies_are_accepted(strategy: str) -> None:
    strategies.check(RunConfig().replace(**{"federation.strategy": strategy, "privacy.secure-aggregation": True}))


@pytest.mark.integration
def test_secagg_aggregate_equals_the_plain_fedavg_aggregate(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    import fedfm

    # Execute: the same round, once in the clear and once under SecAgg+
    plain = fedfm.run(_config(tiny_csv_settings), out=tmp_path / "plain")
    secure = fedfm.run(_config(tiny_csv_settings, **{"privacy.secure-aggregation": True}), out=tmp_path / "secure")
    # Assert: the global adapters agree to SecAgg+'s quantization (2^22 levels over [-8, 8])
    def checkpoint(run: Any) -> dict[str, np.ndarray]:
        meta = json.loads((run.run_dir / "checkpoints" / "latest.json").read_text())
        return dict(np.load(run.run_dir / "checkpoints" / meta["file"]))

    a, b = checkpoint(plain), checkpoint(secure)
    assert set(a) == set(b)
    changed = [name for name in a if not np.allclose(a[name], fedfm_initial(secure)[name])]
    assert changed, "the round changed nothing; the comparison would be empty"
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=2e-5, rtol=0)
    line = json.loads((secure.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["aggregated"] is True
    assert sorted(line["per_hospital"]) == ["hospital-0", "hospital-1", "hospital-2"]
    assert all("train" in v and "evaluate" in v for v in line["per_hospital"].values())
    assert secure.summary["privacy"]["secure_aggregation"] is True
    # What reached the server's strategy: one vector (the unmasked sum), not three updates.
    assert secure.summary["privacy"]["server_saw_distinct_updates"] == {"1": 1}
    assert secure.final_global["accuracy"] == pytest.approx(plain.final_global["accuracy"])


def fedfm_initial(run: Any) -> dict[str, np.ndarray]:
    from fedfm.config import load_config
    from fedfm.workspace import workspace_for

    config = load_config(run.run_dir / "config.toml")
    return {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}


def test_secagg_instruction_carries_the_rounds_learning_rate() -> None:
    from fedfm import keys
    from fedfm.config import round_learning_rate
    from fedfm.secagg import bridge

    config = RunConfig().replace(**{"privacy.secure-aggregation": True, "federation.num-rounds": 4,
                                    "federation.lr-decay": "linear", "train.learning-rate": 1e-3})
    strategy = bridge(config, num_hospitals=3, initial={"w": np.zeros(2, dtype=np.float32)}, instructions={})
    rates = [strategy.on_fit_config_fn(r)[keys.LEARNING_RATE] for r in (1, 4)]
    assert rates == [round_learning_rate(config, 1), round_learning_rate(config, 4)]
    assert rates[0] == pytest.approx(1e-3) and rates[1] == pytest.approx(1e-4)
