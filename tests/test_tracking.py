"""Experiment tracking (`output.tracking`): what a run logs, read back with the tracker's own API.

Each test runs a real tiny federation (the tiny BERT, two hospitals) and
compares what MLflow's client or TensorBoard's event reader returns with the
run directory's own ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedfm
from fedfm.config import RunConfig

pytestmark = pytest.mark.integration


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_gets_every_round_the_settings_and_the_exported_files_and_a_resumed_run_continues(
    tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    # Prepare: one round now, a second one on resume; the store is MLflow's SQLite file beside the run directory.
    config = RunConfig().replace(**tiny_csv_settings, **{
        "federation.num-rounds": 1, "federation.min-hospitals": 2, "output.tracking": "mlflow"})
    run_dir = tmp_path / "runs" / "first"
    # Execute
    fedfm.run(config, out=run_dir, progress=False)
    fedfm.run(config.replace(**{"federation.num-rounds": 2}), resume=run_dir, progress=False)
    # Assert: one MLflow run, in the default store, finished.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedfm")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run.info.run_id
    # Every round's numbers are the run directory's, step = round (round 0: before training).
    lines = _lines(run_dir)
    assert [entry["round"] for entry in lines] == [1, 2]

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    summary = json.loads((run_dir / "summary.json").read_text())
    assert history("global/accuracy") == {
        0: pytest.approx(summary["initial"]["global"]["accuracy"]),
        **{entry["round"]: pytest.approx(entry["global"]["accuracy"]) for entry in lines},
    }
    for hospital in ("north", "south"):
        assert history(f"hospital/{hospital}/evaluate/accuracy") == {
            e["round"]: pytest.approx(e["per_hospital"][hospital]["evaluate"]["accuracy"]) for e in lines}
        assert history(f"bytes/{hospital}/up") == {e["round"]: e["per_hospital"][hospital]["bytes_up"] for e in lines}
    assert history("bytes/down") == {e["round"]: e["bytes_down"] for e in lines}
    # The resolved settings as parameters (logged once), and the adapter and report as artifacts.
    params = run.data.params
    assert params["model.name"] == str(tiny_csv_settings["model.name"]) and params["lora.r"] == "4"
    assert params["federation.num-rounds"] == "1"  # the first session's value: a resume logs no parameters
    adapter = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    report = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert "adapter/adapter_model.safetensors" in adapter and "report/report.md" in report


def test_tensorboard_gets_every_round_and_each_hospitals_epsilon(
    tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare: DP-SGD, so each hospital reports ε every round.
    config = RunConfig().replace(**tiny_csv_settings, **{
        "federation.num-rounds": 2, "federation.min-hospitals": 2, "train.local-steps": 2,
        "privacy.mode": "dp-sgd", "privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 1000.0,
        "output.tracking": "tensorboard"})
    run_dir = tmp_path / "run"
    # Execute
    fedfm.run(config, out=run_dir, progress=False)
    # Assert: TensorBoard's own reader finds the run directory's numbers.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()

    def scalars(tag: str) -> dict[int, float]:
        return {event.step: event.value for event in events.Scalars(tag)}

    lines = _lines(run_dir)
    for hospital in ("north", "south"):
        epsilons = {e["round"]: e["privacy"]["sample_level_epsilon"][hospital] for e in lines}
        assert scalars(f"privacy/epsilon/{hospital}") == pytest.approx(epsilons, rel=1e-6)
        assert epsilons[2] > epsilons[1] > 0
    assert scalars("bytes/up") == {e["round"]: e["bytes_up"] for e in lines}
    assert {step for step in scalars("global/accuracy")} == {0, 1, 2}
    assert "config/text_summary" in events.Tags()["tensors"]  # the settings, as a text summary
