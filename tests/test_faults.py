"""Faults survived: crashing hospitals, NaN and scaled updates, too few replies — nothing lost, every rejection logged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from conftest import reply
from fedfm import keys
from fedfm.attacks import fails
from fedfm.rundir import read_checkpoint
from fedfm.strategies import GuardedStrategy
from fedfm.wire import numpy_to_record

START = {"a.lora_A.weight": np.zeros((2, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}


def _guard(**kwargs: Any) -> GuardedStrategy:
    from flwr.serverapp.strategy import FedAvg

    guard = GuardedStrategy(FedAvg(), min_replies=1, **kwargs)
    guard._reference = START
    return guard


def _reply(node: int, value: float):  # type: ignore[no-untyped-def]
    content = RecordDict({
        keys.ARRAYS: numpy_to_record({k: np.full(v.shape, value, np.float32) for k, v in START.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.HOSPITAL_INDEX: node - 100}),
    })
    return reply(content, node_id=node)


def _asked(guard: GuardedStrategy, nodes: list[int]) -> None:
    """What configure_train records: the nodes asked and the record each was sent."""
    guard._asked = set(nodes)
    guard._sent = {node: numpy_to_record(START) for node in nodes}


def test_an_update_far_larger_than_the_median_is_left_out() -> None:
    guard = _guard(update_norm_limit=10.0)
    _asked(guard, [100, 101, 102, 103])
    arrays, _ = guard.aggregate_train(1, [_reply(100, 1.0), _reply(101, 1.2), _reply(102, 0.9), _reply(103, 40.0)])
    assert arrays is not None
    for value in arrays.values():
        np.testing.assert_allclose(value.numpy(), (1.0 + 1.2 + 0.9) / 3, rtol=1e-6)
    reason = guard.rounds[1].left_out["train:hospital 3 (node 103)"]
    assert "x the round's median" in reason and "federation.update-norm-limit 10" in reason
    assert set(guard.rounds[1].train) == {0, 1, 2}


def test_the_norm_screen_can_be_turned_off() -> None:
    guard = _guard(update_norm_limit=0.0)
    _asked(guard, [100, 101, 102])
    guard.aggregate_train(1, [_reply(100, 1.0), _reply(101, 1.0), _reply(102, 40.0)])
    assert guard.rounds[1].left_out == {}


def test_a_hospital_that_never_replies_is_logged_as_a_fault() -> None:
    guard = _guard()
    _asked(guard, [100, 101, 102])
    arrays, _ = guard.aggregate_train(1, [_reply(100, 1.0), _reply(101, 1.0)])
    assert arrays is not None
    assert guard.rounds[1].faults == 1
    assert "no reply within federation.round-timeout" in guard.rounds[1].left_out["train:node 102"]


def test_simulated_failures_are_reproducible_and_redrawn_per_attempt() -> None:
    draws = [fails(rate=0.3, seed=0, server_round=r, hospital=h) for r in range(1, 51) for h in range(10)]
    assert draws == [fails(rate=0.3, seed=0, server_round=r, hospital=h) for r in range(1, 51) for h in range(10)]
    assert 0.2 < np.mean(draws) < 0.4
    retried = [fails(rate=0.3, seed=0, server_round=r, hospital=h, attempt=1) for r in range(1, 51) for h in range(10)]
    assert retried != draws
    assert not any(fails(rate=0.0, seed=0, server_round=r, hospital=0) for r in range(50))


@pytest.mark.integration
def test_federation_survives_crashes_nan_and_scaled_updates(tiny_csv_settings: dict[str, Any], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import fedfm

    # Prepare: 10 hospitals; 30% crash at random each round; hospital 8 sends NaN, hospital 9 a 100x update
    settings = {
        **tiny_csv_settings,
        "data.partitioner": "iid",
        "data.num-hospitals": 10,
        "federation.num-rounds": 3,
        "federation.min-hospitals": 5,
        "federation.fraction-evaluate": 0.0,
        "federation.round-retries": 3,
        "train.local-steps": 2,
        "attack.failure-rate": 0.3,
        "attack.hospitals": [8, 9],
        "attack.kinds": ["nan", "scale"],
        "attack.scale": 100.0,
    }
    # Execute (fedfm's logger does not propagate: listen on it directly)
    fedfm_logger = logging.getLogger("fedfm")
    fedfm_logger.addHandler(caplog.handler)
    try:
        result = fedfm.run(fedfm.RunConfig().replace(**settings), out=tmp_path / "run")
    finally:
        fedfm_logger.removeHandler(caplog.handler)
    # Assert: every round completed, and every fault is on record with its reason
    assert result.summary["stopped"] is None
    assert [e["round"] for e in result.history] == [1, 2, 3]
    reasons: Counter[str] = Counter()
    for entry in result.history:
        assert entry["aggregated"], entry["left_out"]
        for who, why in entry["left_out"].items():
            if "simulated failure" in why:
                reasons["crash"] += 1
            elif "hospital 8" in who and "NaN or Inf" in why:
                reasons["nan"] += 1
            elif "hospital 9" in who and "x the round's median" in why:
                reasons["scaled"] += 1
            else:
                raise AssertionError(f"unexpected rejection {who}: {why}")
        trained = {int(name.split("-")[1]) for name, v in entry["per_hospital"].items() if v["train"]}
        assert not trained & {8, 9}, "a corrupted update entered the aggregate"
    assert reasons["crash"] >= 3 and reasons["nan"] >= 1 and reasons["scaled"] >= 1, reasons
    # A hospital that crashed in a round comes back and trains in a later one
    crashed = {(e["round"], int(why.split("hospital ")[1].split()[0]))
               for e in result.history for why in e["left_out"].values() if "simulated failure" in why}
    trained_in = {(e["round"], int(name.split("-")[1]))
                  for e in result.history for name, v in e["per_hospital"].items() if v["train"]}
    assert any((r2, h) in trained_in for r, h in crashed for r2 in range(r + 1, 4)), (crashed, trained_in)
    logged = [r.getMessage() for r in caplog.records if "left out of train" in r.getMessage()]
    assert len(logged) == sum(reasons.values())
    final = read_checkpoint(result.run_dir)
    assert all(np.all(np.isfinite(v)) for v in final.arrays.values())
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    print("faults:", dict(reasons), "retries:", [e["retries"] for e in lines])


@pytest.mark.integration
def test_a_run_that_cannot_go_on_stops_cleanly_and_resumes(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    import fedfm

    # Prepare: both hospitals are needed, and each fails 90% of the time
    settings = {
        **tiny_csv_settings,
        "federation.num-rounds": 2,
        "federation.min-hospitals": 2,
        "federation.fraction-evaluate": 0.0,
        "federation.round-retries": 1,
        "train.local-steps": 2,
        "attack.failure-rate": 0.9,
    }
    config = fedfm.RunConfig().replace(**settings)
    # Execute: the run gives up in round 1; the hospitals come back (no failures) and it is resumed
    stopped = fedfm.run(config, out=tmp_path / "run")
    resumed = fedfm.run(config.replace(**{"attack.failure-rate": 0.0}), resume=tmp_path / "run")
    # Assert
    assert stopped.summary["stopped"].startswith("round 1: fewer than 2 hospitals sent a valid update after 1 retries")
    assert stopped.history == [] and (stopped.run_dir / "adapter").is_dir()
    assert resumed.summary["resumed_from"] == 0 and resumed.summary["stopped"] is None
    assert [e["round"] for e in resumed.history] == [1, 2]
    assert all(e["aggregated"] for e in resumed.history)
