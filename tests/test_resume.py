"""Crash-safe resume: checkpoints hold everything a run needs, are verified, and a killed run ends where it would have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam

from conftest import reply
from fedfm import keys
from fedfm.config import RunConfig, load_config
from fedfm.errors import CheckpointError
from fedfm.rundir import RunDirectory, read_checkpoint
from fedfm.server import resume_point
from fedfm.strategies import GuardedStrategy
from fedfm.strategies.state import capture, restore
from fedfm.wire import numpy_to_record

GLOBAL = {"a.lora_A.weight": np.zeros((2, 3), np.float32), "a.lora_B.weight": np.ones((3, 2), np.float32)}


def _fedadam_after_one_round() -> GuardedStrategy:
    guard = GuardedStrategy(FedAdam(eta=0.1), min_replies=1)
    guard.inner.current_arrays = dict(GLOBAL)  # as FedAdam's configure_train records it
    guard._reference = GLOBAL
    content = RecordDict({
        keys.ARRAYS: numpy_to_record({k: v + 0.5 for k, v in GLOBAL.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 4, keys.HOSPITAL_INDEX: 0}),
    })
    arrays, _ = guard.aggregate_train(1, [reply(content, node_id=5)])
    assert arrays is not None
    return guard


def test_strategy_state_survives_a_checkpoint(tmp_path: Path) -> None:
    # Prepare: FedAdam after one round has its moments; write them with the global adapter
    trained = _fedadam_after_one_round()
    state, arrays = capture(trained)
    RunDirectory(tmp_path).write_checkpoint(1, GLOBAL, state={"strategy": state}, state_arrays=arrays)
    # Execute: a fresh strategy of the same configuration takes the state back
    checkpoint = read_checkpoint(tmp_path)
    fresh = GuardedStrategy(FedAdam(eta=0.1), min_replies=1)
    restore(fresh, checkpoint.state["strategy"], checkpoint.state_arrays)
    # Assert
    assert checkpoint.server_round == 1
    assert set(checkpoint.arrays) == set(GLOBAL)
    for name in GLOBAL:
        np.testing.assert_array_equal(fresh.inner.m_t[name], trained.inner.m_t[name])
        np.testing.assert_array_equal(fresh.inner.v_t[name], trained.inner.v_t[name])
        assert np.any(fresh.inner.m_t[name] != 0)
    assert fresh.inner.current_arrays is not None


def test_state_of_another_strategy_is_refused() -> None:
    from flwr.serverapp.strategy import FedAvgM

    state, arrays = capture(_fedadam_after_one_round())
    with pytest.raises(ValueError, match="holds the state of a FedAdam, but this run built FedAvgM"):
        restore(GuardedStrategy(FedAvgM()), state, arrays)


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path)
    directory.write_checkpoint(1, GLOBAL, state={"x": 1})
    directory.write_checkpoint(2, {k: v + 1 for k, v in GLOBAL.items()}, state={"x": 2})
    assert read_checkpoint(tmp_path).state == {"x": 2}
    # Older rounds beyond `keep` are removed with their state files
    directory.write_checkpoint(3, GLOBAL)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == [
        "round-0002.npz", "round-0002.state.npz", "round-0003.npz", "round-0003.state.npz",
    ]
    target = tmp_path / "checkpoints" / "round-0003.npz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"round-0003\.npz is corrupt: its SHA-256 differs"):
        read_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "round-0003.state.npz").unlink()
    (tmp_path / "checkpoints" / "latest.json").write_text(
        json.dumps({"round": 3, "file": "round-0002.npz", "sha256": "0" * 64})
    )
    with pytest.raises(CheckpointError, match=r"round-0002\.npz is corrupt"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        read_checkpoint(tmp_path / "elsewhere")


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    config = RunConfig().replace(**{"federation.num-rounds": 4})
    directory = RunDirectory(tmp_path)
    directory.write_config(config)
    directory.write_checkpoint(2, GLOBAL)
    # More rounds and another output folder are fine
    assert resume_point(config.replace(**{"federation.num-rounds": 6, "output.dir": "x"}), tmp_path).server_round == 2
    with pytest.raises(CheckpointError, match=r"1 setting\(s\) differ: train.learning-rate = 0.0005 in the run, 0.01 now"):
        resume_point(config.replace(**{"train.learning-rate": 0.01}), tmp_path)
    with pytest.raises(CheckpointError, match="already completed round 2, past federation.num-rounds = 1"):
        resume_point(config.replace(**{"federation.num-rounds": 1}), tmp_path)
    with pytest.raises(CheckpointError, match="holds no config.toml"):
        resume_point(config, tmp_path / "missing")


def test_cli_resume_of_a_corrupt_run_fails_before_anything_starts(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path / "run")
    directory.write_config(RunConfig())
    directory.write_checkpoint(1, GLOBAL)
    (tmp_path / "run" / "checkpoints" / "round-0001.npz").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "fedfm.cli", "run", "--resume", str(tmp_path / "run")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "round-0001.npz is corrupt" in proc.stderr
    assert "fedfm: " not in proc.stdout, "the refusal must come before the simulation starts"


def _settings(tiny_csv_settings: dict[str, Any]) -> dict[str, Any]:
    # FedAdam: the resumed run must also restore the server's moments to end where the uninterrupted one does.
    return {
        **tiny_csv_settings,
        "federation.num-rounds": 4,
        "federation.strategy": "fedadam",
        "strategy.eta": 0.05,
        "train.local-steps": 6,
        "federation.fraction-evaluate": 0.0,
    }


def _signal_after_round(
    config_file: Path, run_dir: Path, server_round: int, signum: int
) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Start ``fedfm run`` in its own process group; send ``signum`` to the whole group once ``server_round``
    is checkpointed (the next round is then in flight); the last checkpointed round and the process's end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedfm.cli", "run", str(config_file), "--out", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest.json"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and json.loads(latest.read_text())["round"] >= server_round:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signum)
        try:
            # Liveness, not speed: an interrupted run must end by itself (it used to hang until killed).
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return int(json.loads(latest.read_text())["round"]), subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference_run(tiny_csv_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    """The uninterrupted 4-round FedAdam run that interrupted and resumed runs must end equal to."""
    import fedfm

    config = RunConfig().replace(**_settings(tiny_csv_settings))
    return config, fedfm.run(config, out=tmp_path_factory.mktemp("reference") / "run").run_dir


@pytest.mark.integration
def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_adapter(
    reference_run: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    import fedfm

    # Prepare
    config, reference = reference_run
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    # Execute: a run killed (SIGKILL) after round 2, then resumed
    killed_at, _ = _signal_after_round(config_file, tmp_path / "killed", 2, signal.SIGKILL)
    assert 2 <= killed_at < 4, f"the run was not killed mid-way (checkpoint of round {killed_at})"
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = fedfm.run(resume=tmp_path / "killed")
    # Assert: the same final adapter, bit for bit; the same rounds on record; the resumed run says where it started
    expected, got = read_checkpoint(reference), read_checkpoint(resumed.run_dir)
    assert expected.server_round == got.server_round == 4
    for name, value in expected.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], value, err_msg=name)
    assert [e["round"] for e in resumed.history] == [1, 2, 3, 4]
    assert resumed.summary["resumed_from"] == killed_at
    assert resumed.summary["stopped"] is None
    assert load_config(resumed.run_dir / "config.toml").output.resume is False


@pytest.mark.integration
def test_ctrl_c_mid_round_stops_cleanly_and_resumes_bit_identical(
    reference_run: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    import fedfm

    # Prepare
    config, reference = reference_run
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    # Execute: SIGINT to the whole process group (what Ctrl-C in a terminal sends) while round 2 trains
    stopped_at, proc = _signal_after_round(config_file, tmp_path / "run", 1, signal.SIGINT)
    # Assert: the process ended by itself with one line saying how to resume; the last checkpoint is whole
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedfm: interrupted (Ctrl-C)") and f"fedfm run --resume {tmp_path / 'run'}" in last
    assert 1 <= stopped_at < 4 and read_checkpoint(tmp_path / "run").server_round == stopped_at
    assert not (tmp_path / "run" / "summary.json").exists()
    # The resumed run ends bit-identical to the uninterrupted one
    resumed = fedfm.run(resume=tmp_path / "run")
    expected, got = read_checkpoint(reference), read_checkpoint(resumed.run_dir)
    assert got.server_round == 4
    for name, value in expected.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], value, err_msg=name)
    assert [e["round"] for e in resumed.history] == [1, 2, 3, 4]
    assert resumed.summary["resumed_from"] == stopped_at


@pytest.mark.integration
def test_a_resumed_run_continues_every_hospitals_privacy_ledger(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    import fedfm
    from fedfm.privacy.accounting import HospitalLedger, default_delta
    from fedfm.privacy.dpsgd import sample_rate
    from fedfm.privacy.hospital import dp_batch_size
    from fedfm.workspace import workspace_for

    # Prepare: DP-SGD with a fixed σ, 2 rounds; then the same run resumed and extended to 3
    sigma, steps = 0.9, 2
    config = RunConfig().replace(**{
        **tiny_csv_settings,
        "train.local-steps": steps,
        "federation.num-rounds": 2,
        "federation.fraction-evaluate": 0.0,
        "privacy.mode": "dp-sgd",
        "privacy.recipe": "lora",
        "privacy.noise-multiplier": sigma,
        "privacy.target-epsilon": 1000.0,
    })
    # Execute
    fedfm.run(config, out=tmp_path / "run")
    resumed = fedfm.run(config.replace(**{"federation.num-rounds": 3}), resume=tmp_path / "run")
    # Assert: round 3's ε is that of one accountant over all three rounds' steps, not of one round
    assert [e["round"] for e in resumed.history] == [1, 2, 3]
    for index, name in enumerate(workspace_for(config).hospital_names):
        rows = len(workspace_for(config).hospital_rows("train", index))
        ledger = HospitalLedger(name, 1000.0, default_delta(rows), sigma, sample_rate(dp_batch_size(config), rows), steps)
        spent = [e["privacy"]["sample_level_epsilon"][name] for e in resumed.history]
        three = ledger.after_training(1, steps).after_training(2, steps).after_training(3, steps).epsilon()
        assert spent[2] > spent[1] > spent[0]
        assert spent[2] == pytest.approx(three, rel=1e-9)
