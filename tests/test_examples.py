"""The examples run as written (real MiniLM, capped rows), and a user's strategy runs from a config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = ROOT / "examples" / "custom_strategy"
SMALL = ["data.max-train-per-hospital=16", "data.max-test=32", "federation.num-rounds=1"]

pytestmark = pytest.mark.integration


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.slow
def test_custom_strategy_example_script(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(CUSTOM / "run.py"), *SMALL], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "strategy: norm-bounded-fedavg" in done.stdout
    summary = json.loads((tmp_path / "runs" / "custom-strategy" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["strategy"] == "norm-bounded-fedavg"


@pytest.mark.slow
def test_python_api_example(tmp_path: Path) -> None:
    # One round on at most 40 rows a hospital (the quickstart command test runs the recipe's shape), written
    # under the test's folder: the example finds the quickstart beside itself and writes runs/ where it runs.
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "1",
                           "data.max-train-per-hospital=40"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 1: global accuracy" in done.stdout


def test_a_users_strategy_named_by_import_path_runs_from_the_command_line(
    tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: the user's module is in the folder fedfm runs from, nowhere else.
    (tmp_path / "my_strategy.py").write_text((CUSTOM / "norm_bounded.py").read_text())
    settings = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in tiny_csv_settings.items()]
    overrides = [*settings, "federation.num-rounds=2", "federation.strategy=my_strategy:NormBoundedFedAvg"]
    command = [str(Path(sys.executable).parent / "fedfm"), "run", "--out", str(tmp_path / "run")]
    for text in overrides:
        command += ["--set", text]
    # Execute
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "my_strategy:NormBoundedFedAvg" and summary["rounds"] == 2


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.toml")), ids=lambda p: p.name)
def test_every_example_configuration_is_valid_and_its_data_loads(path: Path) -> None:
    from fedfm.config import load_config
    from fedfm.data import load_source

    config = load_config(path)
    source = load_source(config.data.dataset)
    assert len(source.train) > 0
