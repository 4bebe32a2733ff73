"""Whole federations in Flower's simulation engine (in-process and Ray backends), with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm.config import RunConfig

pytestmark = pytest.mark.integration


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if ("raylet" in line or "gcs_server" in line or "ray::" in line)]


def _tiny_run(settings: dict[str, Any], run_dir: Path, backend: str):  # type: ignore[no-untyped-def]
    import fedfm

    config = RunConfig().replace(
        **settings,
        **{
            "train.learning-rate": 2e-2,
            "train.local-epochs": 3,
            "federation.num-rounds": 2,
            "federation.min-hospitals": 2,
            "federation.backend": backend,
        }
    )
    return config, fedfm.run(config, out=run_dir)


@pytest.fixture(scope="module")
def finished(tiny_csv_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The default backend on this machine's cores (in-process with one worker)."""
    return _tiny_run(tiny_csv_settings, tmp_path_factory.mktemp("run") / "tiny", "auto")


@pytest.fixture(scope="module")
def finished_on_ray(tiny_csv_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _tiny_run(tiny_csv_settings, tmp_path_factory.mktemp("run") / "tiny-ray", "ray")


def test_run_directory_has_every_promised_file(finished) -> None:  # type: ignore[no-untyped-def]
    config, result = finished
    run_dir = result.run_dir
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/latest.json"):
        assert (run_dir / name).is_file(), name
    from fedfm.config import load_config

    assert load_config(run_dir / "config.toml") == config


def test_metrics_lines_and_summary(finished) -> None:  # type: ignore[no-untyped-def]
    _, result = finished
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert set(line["per_hospital"]) == {"north", "south"}
        assert {"accuracy", "macro-f1", "loss"} <= set(line["global"])
        assert line["bytes_up"] > 0 and line["bytes_down"] > 0
        assert line["aggregated"] is True and line["left_out"] == {}
        for hospital in line["per_hospital"].values():
            assert hospital["bytes_up"] > 0 and hospital["bytes_down"] > 0
            assert {"accuracy", "num-examples"} <= set(hospital["evaluate"])
            assert {"train-loss", "num-examples"} <= set(hospital["train"])
    summary = result.summary
    assert summary["rounds"] == 2
    assert set(summary["final"]["per_hospital"]) == {"north", "south"}
    assert summary["bytes"]["up"] == sum(line["bytes_up"] for line in lines)
    assert summary["bytes"]["down"] == sum(line["bytes_down"] for line in lines)
    assert 0 < summary["adapter_parameters"] < 0.02 * summary["base_parameters"]
    assert summary["wall_seconds"] > 0
    # Each round's upload per hospital is about one adapter, far below the base model.
    per_hospital_up = lines[0]["per_hospital"]["north"]["bytes_up"]
    assert per_hospital_up < 0.02 * 4 * summary["base_parameters"]


def test_tiny_federation_learns_the_separable_task(finished) -> None:  # type: ignore[no-untyped-def]
    _, result = finished
    assert result.summary["initial"]["global"]["accuracy"] <= 0.75
    assert result.final_global["accuracy"] >= 0.9


def test_adapter_loads_with_plain_peft_and_matches_the_final_checkpoint(finished, tiny_bert: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification

    _, result = finished
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    exported = get_peft_model_state_dict(model)
    meta = json.loads((result.run_dir / "checkpoints" / "latest.json").read_text())
    assert meta["round"] == 2
    checkpoint = np.load(result.run_dir / "checkpoints" / meta["file"])
    assert set(checkpoint.files) == set(exported)
    for name in checkpoint.files:
        torch.testing.assert_close(exported[name], torch.from_numpy(checkpoint[name]))


def test_ray_and_in_process_backends_learn_the_same_federation(finished, finished_on_ray) -> None:  # type: ignore[no-untyped-def]
    """The in-process backend changes where hospitals run, not what they compute, send or receive."""
    _, local = finished
    _, ray = finished_on_ray
    for mine, theirs in zip(local.history, ray.history, strict=True):
        assert mine["round"] == theirs["round"]
        assert mine["global"] == pytest.approx(theirs["global"], abs=1e-5)
        # Instructions carry the run configuration, whose backend name and paths differ by a few bytes.
        assert mine["bytes_up"] == theirs["bytes_up"]
        assert mine["bytes_down"] == pytest.approx(theirs["bytes_down"], rel=0.01)
        for name, hospital in mine["per_hospital"].items():
            assert hospital["train"]["train-loss"] == pytest.approx(theirs["per_hospital"][name]["train"]["train-loss"],
                                                                    abs=1e-5)
    # Ray stops with its run; the in-process run never started it.
    mine = [line for line in _ray_processes() if str(os.getpid()) in line.split()[1:2]]
    assert mine == []


def test_cli_reports_bad_config_before_loading_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning-rate = 70\n[federation]\nnum-rounds = 0\n")
    proc = subprocess.run([sys.executable, "-m", "fedfm.cli", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "`train.learning-rate` must be in (0, 10], got 70.0" in proc.stderr
    assert "`federation.num-rounds` must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quickstart_command_with_real_minilm_on_four_hospitals(tmp_path: Path) -> None:
    """The README's quickstart config through the `fedfm` command, shortened to 2 small rounds."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, "-m", "fedfm.cli", "run", str(root / "examples" / "quickstart" / "heart.toml"),
         "--set", "federation.num-rounds=2", "--set", "data.max-train-per-hospital=24", "--set", "data.max-test=24",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hospitals = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    # Quiet: the first line is fedfm's, and no library's progress bar or deprecation warning reaches the user
    # (stderr holds only the progress display's lines).
    assert proc.stdout.startswith("fedfm: 4 hospitals (Cleveland, Hungary, Switzerland, VA Long Beach)")
    assert all(line.startswith("progress: ") for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert "Warning" not in proc.stdout and "it/s]" not in proc.stdout and "loaded base model" not in proc.stdout
    # A progress line per round and the final table with every hospital.
    assert "round 1/2" in proc.stdout and "round 2/2" in proc.stdout
    table = proc.stdout[proc.stdout.index("accuracy  macro-f1"):]
    for name in ["global test", *hospitals]:
        assert name in table
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["final"]["per_hospital"]) == hospitals
    assert summary["base_parameters"] > 22_000_000  # the real all-MiniLM-L6-v2
    assert summary["adapter_parameters"] < 0.02 * summary["base_parameters"]
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for hospital in hospitals:
        # What each hospital uploads in a round: one adapter and a few metrics, ~0.3 MB.
        assert 0 < line["per_hospital"][hospital]["bytes_up"] < 0.02 * 4 * summary["base_parameters"]


def _tiny_pubmedqa(tiny_llama_dir: Path, **overrides: object) -> RunConfig:
    """One round of 2 IID hospitals with 6 PubMedQA training questions each, on the tiny Llama."""
    settings = {
        "model.name": str(tiny_llama_dir),
        "model.task": "causal-qa",
        "model.max-length": 96,
        "data.dataset": "pubmedqa",
        "data.partitioner": "iid",
        "data.num-hospitals": 2,
        "data.max-train-per-hospital": 6,
        "federation.num-rounds": 1,
    }
    return RunConfig().replace(**{**settings, **overrides})


def test_causal_lm_federation_on_pubmedqa_with_a_tiny_llama(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A causal LM through the same Flower apps: PubMedQA's official questions, answers scored by likelihood."""
    import fedfm

    config = _tiny_pubmedqa(tiny_llama_dir, **{"data.max-test": 6, "train.batch-size": 3, "train.eval-batch-size": 6})
    result = fedfm.run(config, out=tmp_path / "qa")
    assert result.summary["rounds"] == 1
    assert result.summary["global_test_rows"] == 6
    assert set(result.final_per_hospital) == {"hospital-0", "hospital-1"}
    for metrics in [result.final_global, *result.final_per_hospital.values()]:
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    # Only LoRA tensors of the attention projections travel for a causal LM (no head).
    from safetensors.torch import load_file

    names = list(load_file(result.adapter_dir / "adapter_model.safetensors"))
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert all("q_proj" in n or "v_proj" in n for n in names)


def test_conclusion_augmentation_doubles_what_each_hospital_trains_on(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`data.augment = "conclusion"` reaches training through the Flower apps: 6 questions, 12 training rows."""
    import fedfm

    config = _tiny_pubmedqa(
        tiny_llama_dir,
        **{"data.max-test": 4, "data.augment": "conclusion", "train.batch-size": 4, "train.eval-batch-size": 4,
           "federation.central-evaluation": False},
    )
    result = fedfm.run(config, out=tmp_path / "qa")
    line = json.loads((tmp_path / "qa" / "metrics.jsonl").read_text().splitlines()[-1])
    for hospital in ("hospital-0", "hospital-1"):
        train = line["per_hospital"][hospital]["train"]
        assert train["num-examples"] == 12 and train["train-steps"] == 3  # 6 questions + their 6 copies, batches of 4
        assert line["per_hospital"][hospital]["evaluate"]["num-examples"] == 4  # test questions are not doubled
    # Central evaluation is off: the first row is the hospitals' weighted mean over their 8 test questions.
    table = result.table()
    assert "global test" not in table and "nan" not in table
    assert table.splitlines()[1].split()[:2] == ["hospitals'", "mean"] and table.splitlines()[1].split()[-1] == "8"
    assert "hospital-0" in table and "hospital-1" in table
    card = (result.adapter_dir / "README.md").read_text()
    assert "| hospitals' weighted mean (no central evaluation) | 8 |" in card and "| global test set |" not in card


def test_the_table_of_a_run_without_any_test_scores_says_how_to_score_it(tmp_path: Path) -> None:
    from fedfm.runner import RunResult

    summary = {"final": {"global": {}, "per_hospital": {"a": {}, "b": {}}}, "global_test_rows": 500}
    table = RunResult(tmp_path, summary, []).table()
    assert table.startswith("no test scores") and f"fedfm evaluate --adapter {tmp_path / 'adapter'}" in table
