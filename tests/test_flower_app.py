"""The project is a Flower App: `flwr run .` drives the same ServerApp and ClientApp."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from fedfm.config import load_config, to_flat

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_pyproject_run_config_is_the_quickstart_config() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedfm.server:app", "clientapp": "fedfm.client:app"}
    quickstart = to_flat(load_config(ROOT / "examples" / "quickstart" / "heart.toml"))
    assert app["config"] == quickstart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"SuperLink did not open port {port} within {timeout} s:\n{log.read_text()}")


def _toml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.integration
def test_flwr_run_dot_on_a_local_superlink(tmp_path: Path, tiny_bert: Path, two_hospital_csv: Path) -> None:
    # Prepare: a SuperLink in simulation mode that this test owns, and a Flower config pointing at it.
    port = _free_port()  # Flower 1.42 serves the Control, Fleet and Runtime APIs on one HTTP port
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # The SuperLink starts `flower-superexec` and friends by name: the venv's bin must be on PATH.
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "superlink.log").open("w")
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    run_dir = tmp_path / "run"
    overrides = {
        "model.name": str(tiny_bert), "lora.r": 4, "data.dataset": "csv", "data.path": str(two_hospital_csv),
        "data.partition-column": "hospital", "train.batch-size": 8, "train.learning-rate": 0.02,
        "train.local-epochs": 3, "federation.num-rounds": 2, "federation.min-hospitals": 2, "output.dir": str(run_dir),
    }
    try:
        _wait_for_port(port, superlink, tmp_path / "superlink.log")
        # Execute
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "test", "--stream", "--federation-config", "num-supernodes=2",
             "--run-config", " ".join(f"{k}={_toml(v)}" for k, v in overrides.items())],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        # Assert
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        deadline = time.time() + 120
        while not (run_dir / "summary.json").exists() and time.time() < deadline:
            time.sleep(1)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 2
        assert set(summary["final"]["per_hospital"]) == {"north", "south"}
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        try:
            os.killpg(superlink.pid, signal.SIGTERM)
            superlink.wait(timeout=30)
        except ProcessLookupError:
            pass  # it already ended (the assertion above says why)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait()
        log.close()
    leftover = subprocess.run(["pgrep", "-s", str(superlink.pid)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes of the SuperLink's session outlived it: {leftover}"
