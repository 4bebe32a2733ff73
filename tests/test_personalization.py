"""Validation splits, best-round selection without test data, early stopping, and personalized scores."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from datasets import Dataset
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from conftest import reply
from fedfm import keys
from fedfm.config import RunConfig
from fedfm.data import split_hospital
from fedfm.errors import ConfigError
from fedfm.rundir import RunDirectory, read_checkpoint
from fedfm.server import Recorder, selection_json
from fedfm.strategies import GuardedStrategy, RoundRecord
from fedfm.strategies.selection import BestRound, best_round, validation_of
from fedfm.wire import numpy_to_record, record_to_numpy

# ---- the validation split ------------------------------------------------------------------------------------------


def _rows(n: int = 60) -> Dataset:
    return Dataset.from_dict({"id": list(range(n)), "text": [f"row {i}" for i in range(n)],
                              "label": [i % 3 for i in range(n)]})


def test_validation_rows_come_from_training_rows_only_and_are_disjoint() -> None:
    # Prepare
    rows = _rows()
    without = split_hospital("h", rows, index=1, test_fraction=0.3, seed=4)
    # Execute
    hospital = split_hospital("h", rows, index=1, test_fraction=0.3, seed=4, validation_fraction=0.2)
    again = split_hospital("h", rows, index=1, test_fraction=0.3, seed=4, validation_fraction=0.2)
    # Assert: the test rows are the same as without validation; validation is carved out of the train rows.
    train, test, validation = (set(d["id"]) for d in (hospital.train, hospital.test, hospital.validation))
    assert test == set(without.test["id"])
    assert train | validation == set(without.train["id"])
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert len(validation) == round(0.2 * len(without.train))
    assert set(hospital.validation["label"]) == {0, 1, 2}  # stratified
    assert list(again.validation["id"]) == list(hospital.validation["id"])  # seeded
    assert without.validation is None


def test_selection_settings_are_checked_together() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"federation.select-best": "validation", "federation.patience": -1,
                               "federation.select-metric": "f1", "federation.fraction-evaluate": 0.0})
    text = str(err.value)
    assert "`federation.select-metric` must be one of ['loss', 'accuracy', 'macro-f1'], got 'f1'" in text
    assert "`federation.patience` must be >= 0" in text
    assert "set `data.validation-fraction` > 0, got 0.0" in text
    assert "set `federation.fraction-evaluate` > 0, got 0.0" in text
    with pytest.raises(ConfigError, match="personalize-epochs` must be 0 with `privacy.mode` 'dp-sgd'"):
        RunConfig().replace(**{"federation.personalize-epochs": 1, "privacy.mode": "dp-sgd"})


# ---- choosing the best round ---------------------------------------------------------------------------------------

#: Per round: each hospital's (validation loss, validation accuracy, test accuracy). The validation loss is best in
#: round 2; the test accuracy is best in round 3, so a selection that peeked at test would pick round 3.
ROUNDS = {
    1: [(0.60, 0.60, 0.60), (0.70, 0.50, 0.55)],
    2: [(0.40, 0.80, 0.70), (0.45, 0.75, 0.65)],
    3: [(0.50, 0.70, 0.95), (0.55, 0.70, 0.90)],
    4: [(0.42, 0.78, 0.99), (0.46, 0.76, 0.98)],
}
VAL_ROWS, TEST_ROWS = (10, 30), (20, 40)


def _evaluate(server_round: int) -> dict[int, dict[str, float]]:
    return {
        h: {keys.NUM_EXAMPLES: TEST_ROWS[h], keys.HOSPITAL_INDEX: h, "accuracy": test, "loss": 1 - test,
            "val-loss": val_loss, "val-accuracy": val_acc, keys.VALIDATION_EXAMPLES: VAL_ROWS[h]}
        for h, (val_loss, val_acc, test) in enumerate(ROUNDS[server_round])
    }


def _adapter(server_round: int) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), float(server_round), dtype=np.float32)}


def _recorder(config: RunConfig, run_dir: Path) -> Recorder:
    strategy = SimpleNamespace(rounds={r: RoundRecord(evaluate=_evaluate(r)) for r in ROUNDS},
                               hospital_of=lambda node: None)
    return Recorder(config, SimpleNamespace(hospital_names=["north", "south"]), strategy, RunDirectory(run_dir))


def _config(**settings: Any) -> RunConfig:
    return RunConfig().replace(**{"data.validation-fraction": 0.1, "federation.select-best": "validation",
                                  "federation.central-evaluation": False, "federation.num-rounds": 6, **settings})


def test_validation_scores_are_weighted_by_validation_rows() -> None:
    weighted = validation_of(_evaluate(2).values())
    assert weighted["examples"] == 40
    assert weighted["loss"] == pytest.approx((0.40 * 10 + 0.45 * 30) / 40)
    assert validation_of([{keys.NUM_EXAMPLES: 5, "accuracy": 1.0}]) == {}  # no validation split: nothing to choose by


def test_the_best_round_is_chosen_by_validation_never_by_test(tmp_path: Path) -> None:
    # Prepare
    recorder = _recorder(_config(), tmp_path)
    # Execute: the server records rounds 1..3 as it would after each round
    for server_round in (1, 2, 3):
        recorder.record_round(server_round, numpy_to_record(_adapter(server_round)), None)
    summary = selection_json(recorder.config, recorder.history, recorder.best, recorder.best.round or 0)
    # Assert: round 2 by validation loss (and the same from metrics.jsonl alone), though test prefers round 3
    assert recorder.best.round == 2 and best_round(recorder.run_dir.lines(), "loss")[0] == 2
    assert recorder.best.score == pytest.approx((0.40 * 10 + 0.45 * 30) / 40)
    np.testing.assert_array_equal(recorder.best.arrays["lora_A"], _adapter(2)["lora_A"])
    assert max(recorder.history, key=lambda e: e["federated"]["accuracy"])["round"] == 3
    assert summary["best_round"] == summary["exported_round"] == 2
    assert summary["best"]["federated"]["accuracy"] < summary["last"]["federated"]["accuracy"]  # both reported
    assert summary["last"]["round"] == 3 and set(summary["validation_by_round"]) == {"1", "2", "3"}
    assert "val-loss" not in summary["best"]["per_hospital"]["north"]
    # Higher-is-better metrics choose the largest value.
    assert best_round(recorder.history, "accuracy")[0] == 2


def test_patience_stops_after_rounds_without_improvement() -> None:
    best = BestRound(metric="loss", patience=2)
    stops = {}
    for server_round, loss in [(1, 0.5), (2, 0.4), (3, 0.45), (4, float("nan")), (5, 0.3), (6, 0.31), (7, 0.32)]:
        best.observe(server_round, {"loss": loss}, _adapter(server_round))
        stops[server_round] = best.stop_reason(server_round, num_rounds=8)
    assert [r for r, why in stops.items() if why] == [4, 7]  # two rounds after round 2, then after round 5
    assert "did not improve for 2 round(s) after round 5" in str(stops[7])
    assert best.stop_reason(8, num_rounds=8) is None  # the last round ends the run anyway
    assert BestRound(metric="loss").stop_reason(9, num_rounds=20) is None  # patience 0: never


class _Grid:
    """Two hospitals that send back what they were sent (a Flower grid, for GuardedStrategy.run)."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        out = []
        for msg in messages:
            self.rounds.append(int(msg.content["config"]["server-round"]))
            node = msg.metadata.dst_node_id
            content = RecordDict({"arrays": msg.content["arrays"],
                                  "metrics": MetricRecord({keys.NUM_EXAMPLES: 5, keys.HOSPITAL_INDEX: node - 11})})
            out.append(reply(content, node_id=node))
        return out


def test_early_stopping_ends_the_round_loop_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: FedAvg with no evaluation; the stop hook says stop after round 2
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # a ServerApp process has them; Message() needs them
        monkeypatch.setattr(TaskIdentity, name, 1)

    strategy = GuardedStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2), min_replies=2)
    grid = _Grid()
    seen: list[int] = []
    # Execute
    final, stopped = strategy.run(
        grid, numpy_to_record(_adapter(0)), first_round=1, num_rounds=5, timeout=5.0, retries=0,
        train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
        evaluate_fn=lambda r, arrays: seen.append(r), stop_fn=lambda r: "patience" if r == 2 else None,
    )
    # Assert: rounds 1 and 2 ran and were recorded; nothing of round 3 was sent
    assert stopped == "patience" and seen == [0, 1, 2] and sorted(set(grid.rounds)) == [1, 2]
    np.testing.assert_array_equal(record_to_numpy(final)["lora_A"], _adapter(0)["lora_A"])


def test_a_run_resumed_from_round_0_does_not_evaluate_round_0_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The zero-shot evaluation of a large test set can take many minutes: its figures are in the checkpoint.
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    strategy = GuardedStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2), min_replies=2)
    seen: list[int] = []
    strategy.run(
        _Grid(), numpy_to_record(_adapter(0)), first_round=1, num_rounds=1, timeout=5.0, retries=0,
        train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
        evaluate_fn=lambda r, arrays: seen.append(r), evaluate_initial=False,
    )
    assert seen == [1]


def test_a_resumed_server_keeps_the_best_round_and_its_adapter(tmp_path: Path) -> None:
    # Prepare: rounds 1..3 recorded (and checkpointed) by one server, with patience 2
    config = _config(**{"federation.patience": 2})
    first = _recorder(config, tmp_path)
    for server_round in (1, 2, 3):
        first.record_round(server_round, numpy_to_record(_adapter(server_round)), None)
    # Execute: a new server process resumes from the round-3 checkpoint, then records round 4
    resumed = _recorder(config, tmp_path)
    resumed.resume_from(read_checkpoint(tmp_path))
    assert (resumed.best.round, resumed.best.score) == (first.best.round, first.best.score) == (2, first.best.score)
    np.testing.assert_array_equal(resumed.best.arrays["lora_A"], _adapter(2)["lora_A"])
    assert resumed.early_stop(3) is None  # one round since the best: patience 2 goes on
    resumed.record_round(4, numpy_to_record(_adapter(4)), None)
    # Assert: round 4 (validation loss 0.45 vs 0.4375) is no better; two rounds since round 2 stop the run
    assert resumed.best.round == 2
    assert "after round 2" in str(resumed.early_stop(4))


# ---- one tiny federation: validation + select-best + personalize-epochs (FedSA-LoRA keeps its B) -----------------


@pytest.mark.integration
def test_a_run_exports_the_best_validated_round_and_reports_personalized_scores(
    tiny_csv_settings: dict[str, Any], tiny_bert: Path, tmp_path: Path
) -> None:
    # Prepare
    import fedfm
    from fedfm.workspace import federation_for

    config = RunConfig().replace(**{
        **tiny_csv_settings,
        "data.validation-fraction": 0.25,
        "train.learning-rate": 2e-2,
        "train.local-steps": 3,
        "federation.num-rounds": 2,
        "federation.strategy": "fedsa-lora",
        "federation.select-best": "validation",
        "federation.personalize-epochs": 1,
    })
    hospitals = federation_for(config.data).hospitals
    # Execute
    result = fedfm.run(config, out=tmp_path / "run", progress=False)
    # Assert: every round's line has the weighted validation score from every hospital's validation rows
    lines = result.history
    for line in lines:
        assert line["validation"]["examples"] == sum(len(h.validation) for h in hospitals)
        for hospital in line["per_hospital"].values():
            assert {"val-loss", "val-accuracy", keys.VALIDATION_EXAMPLES, "accuracy",
                    "personalized-accuracy"} <= set(hospital["evaluate"])
    summary = result.summary
    chosen, score = best_round(lines, "loss")
    assert summary["best_round"] == chosen and summary["selection"]["exported_round"] == chosen
    assert summary["selection"]["best_validation"] == pytest.approx(score)
    assert summary["selection"]["best"]["global"] and summary["selection"]["last"]["round"] == 2
    assert summary["hospitals"]["north"]["validation_rows"] == len(hospitals[0].validation)
    # The exported adapter is the chosen round's global adapter.
    from safetensors.numpy import load_file

    exported = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    checkpoint = np.load(result.run_dir / "checkpoints" / f"round-{chosen:04d}.npz")
    shared = [n for n in checkpoint.files if "lora_A" in n]
    assert shared and all(np.array_equal(exported[n], checkpoint[n]) for n in shared)
    # Personalized: each hospital fine-tuned locally and sent its local-test scores only.
    personalized = result.final_personalized
    assert set(personalized) == {"north", "south"}
    assert summary["final"]["personalized_by"] == "fine-tune (1 epoch(s))"
    for hospital in hospitals:
        assert personalized[hospital.name][keys.NUM_EXAMPLES] == len(hospital.test)
        assert 0.0 <= personalized[hospital.name]["accuracy"] <= 1.0
    table = result.table()
    assert "personalized acc" in table and f"best round by validation loss: {chosen}" in table
    card = (result.adapter_dir / "README.md").read_text()
    assert f"The exported adapter is round {chosen}'s" in card and "Personalized per hospital" in card
    assert json.loads((result.run_dir / "summary.json").read_text())["selection"]["select_best"] == "validation"
