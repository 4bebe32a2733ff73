"""A run directory is never overwritten by accident, one process at a time works in it, and Ctrl-C stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfm import interrupt
from fedfm.cli import main
from fedfm.config import RunConfig, load_config
from fedfm.errors import CheckpointError, RunDirectoryError
from fedfm.rundir import LOCK_FILE, RoundEntry, RunDirectory, RunSummary, claim, read_checkpoint
from fedfm.server import resume_point

GLOBAL = {"a.lora_A.weight": np.zeros((2, 3), np.float32)}


def _finished_run(path: Path, config: RunConfig | None = None) -> RunConfig:
    """A run directory as a finished run leaves it (config, metrics, a checkpoint, a hospital's ledger)."""
    config = config or RunConfig()
    directory = RunDirectory(path)
    directory.write_config(config)
    directory.append_round(RoundEntry(round=1, global_={"accuracy": 0.5}))
    directory.write_checkpoint(5, GLOBAL)
    directory.write_summary(RunSummary(rounds=1))
    (path / "hospitals" / "north").mkdir(parents=True)
    (path / "hospitals" / "north" / "privacy-ledger.json").write_text("{}\n")
    return config


def _claim(path: Path, **how: bool) -> None:
    with claim(path, **how):
        pass


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_directory_that_holds_a_run_is_refused_untouched(tmp_path: Path) -> None:
    _finished_run(tmp_path / "run")
    before = _files(tmp_path / "run")
    with pytest.raises(RunDirectoryError, match=r"already holds a fedfm run: continue it with `fedfm run --resume") as err:
        _claim(tmp_path / "run")
    assert "--overwrite" in str(err.value)
    assert _files(tmp_path / "run") == before
    # A folder of other files is refused too, and --overwrite never deletes what is not a run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(RunDirectoryError, match=r"notes\.txt"):
            _claim(tmp_path / "mine", overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # An empty or missing folder is a new run's
    (tmp_path / "empty").mkdir()
    with claim(tmp_path / "empty"), claim(tmp_path / "new" / "run"):
        pass


def test_overwrite_deletes_the_old_run_first(tmp_path: Path) -> None:
    _finished_run(tmp_path / "run")
    with claim(tmp_path / "run", overwrite=True) as path:
        assert sorted(p.name for p in path.iterdir()) == [LOCK_FILE]
    with pytest.raises(RunDirectoryError, match="exclude each other"):
        _claim(tmp_path / "run", resume=True, overwrite=True)


def test_a_file_or_an_unwritable_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match=r"is a file, not a folder"):
        _claim(tmp_path / "file")
    with pytest.raises(RunDirectoryError, match=r"cannot write in run directory .*file/run"):
        _claim(tmp_path / "file" / "run")


_HOLDER = """
import sys, time
from fedfm.rundir import claim
with claim(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_process_at_a_time_and_a_killed_one_leaves_no_stale_lock(tmp_path: Path) -> None:
    # Prepare: another process holds the directory
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # Execute / Assert: this process is refused, naming the holder
        with pytest.raises(RunDirectoryError, match=rf"in use by another fedfm process \(pid {holder.pid}\)"):
            _claim(tmp_path / "run", resume=True)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # Its death released the lock
    with claim(tmp_path / "run"):
        _claim(tmp_path / "run")  # claims inside one process (fedfm.run, then its ServerApp) only count


def test_cli_refuses_a_finished_run_as_out_before_anything_loads(
    tiny_csv_settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _finished_run(tmp_path / "run")
    before = _files(tmp_path / "run")
    sets = [f"--set={k}={v}" for k, v in tiny_csv_settings.items()]
    assert main(["run", *sets, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedfm: error: run directory") and "already holds a fedfm run" in err, err
    assert len(err.strip().splitlines()) == 1, "refused before the data loads (no progress bars) and in one line"
    assert _files(tmp_path / "run") == before


@pytest.mark.integration
def test_overwrite_starts_afresh_with_nothing_of_the_old_run_left(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    import fedfm

    # Prepare: an old run with a checkpoint of round 5 and a hospital's privacy ledger
    _finished_run(tmp_path / "run")
    config = RunConfig().replace(**{**tiny_csv_settings, "federation.num-rounds": 1, "train.local-steps": 2,
                                    "federation.fraction-evaluate": 0.0})
    # Execute
    result = fedfm.run(config, out=tmp_path / "run", overwrite=True, progress=False)
    # Assert: only the new run's files; its checkpoint is whole and resumable
    names = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*")}
    assert "hospitals/north/privacy-ledger.json" not in names
    assert "checkpoints/round-0005.npz" not in names
    assert read_checkpoint(result.run_dir).server_round == 1
    assert [e["round"] for e in result.history] == [1]
    assert load_config(result.run_dir / "config.toml").output.overwrite is False


def test_resume_compares_with_the_configuration_stored_in_the_checkpoint(tmp_path: Path) -> None:
    # Prepare: a run's checkpoint, then its config.toml edited by hand
    config = RunConfig().replace(**{"federation.num-rounds": 4})
    directory = RunDirectory(tmp_path)
    directory.write_config(config)
    directory.write_checkpoint(2, GLOBAL)
    text = (tmp_path / "config.toml").read_text()
    text = text.replace("learning-rate = 0.0005", "learning-rate = 0.01").replace("\nr = 8", "\nr = 16")
    (tmp_path / "config.toml").write_text(text)
    edited = load_config(tmp_path / "config.toml")
    assert edited.train.learning_rate == 0.01 and edited.lora.r == 16
    # Execute / Assert: every difference is listed, against what the rounds ran under
    with pytest.raises(CheckpointError, match=r"2 setting\(s\) differ") as err:
        resume_point(edited, tmp_path)
    assert "lora.r = 8 in the run, 16 now" in str(err.value)
    assert "train.learning-rate = 0.0005 in the run, 0.01 now" in str(err.value)
    assert read_checkpoint(tmp_path).config == config.to_flat()
    # Operational settings may still change
    assert resume_point(config.replace(**{"federation.num-rounds": 6, "output.dir": "x"}), tmp_path).server_round == 2


def test_first_sigint_asks_for_a_stop_second_one_interrupts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interrupt.stop_on_sigint():
        assert not interrupt.requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in the main thread between bytecodes
        assert interrupt.requested()
        with pytest.raises(interrupt.RunInterrupted):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    # The handler is put back, and the stop does not leak into the next run
    assert signal.getsignal(signal.SIGINT) is before
    assert not interrupt.requested()
    interrupt.check()
