"""A simulation that joins an existing Ray cluster (``federation.ray-address``), against a real local head.

The head is started as a user would (``ray start --head``) with its own short
temp folder (Ray's socket paths must stay under the kernel's 107 bytes), and
every process of it is stopped afterwards by id: the processes whose command
line names that folder, and their children. (``ray stop --force`` would stop
every Ray on the machine, including other runs' own.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedfm.config import RunConfig

pytestmark = pytest.mark.integration

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_processes(folder: Path) -> set[int]:
    """The processes of the Ray started in ``folder``: those naming it, and all their descendants."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    todo = [int(row[0]) for row in rows if len(row) == 3 and str(folder) in row[2]]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _stop(folder: Path) -> set[int]:
    """Stop the Ray started in ``folder``: SIGTERM, then SIGKILL what is left after 5 s; the processes still alive.

    The processes are listed before any is signalled: a raylet's children (the dashboard and
    runtime-env agents, whose titles no longer name the folder) outlive it with init as their parent.
    """
    pids = _cluster_processes(folder)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids |= _cluster_processes(folder)
        for pid in _alive(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and _alive(pids):
            time.sleep(0.2)
    return _alive(pids)


def _alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` still running (zombies, already dead and awaiting their parent, are not)."""
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except (FileNotFoundError, IndexError):
            pass
    return alive


@pytest.fixture()
def ray_head() -> Iterator[tuple[str, Path]]:
    """A local Ray head with two CPUs: its address and its temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = _free_port()
    # The workers inherit the head's environment, not the driver's: the offline switches go here.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "RAY_worker_niceness": "0"}
    try:
        subprocess.run([str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2", "--disable-usage-stats",
                        "--include-dashboard=false", "--temp-dir", str(folder)],
                       check=True, capture_output=True, text=True, timeout=120, env=env)
        yield f"127.0.0.1:{port}", folder
    finally:
        import ray

        if ray.is_initialized():  # a failed run may leave this process connected
            ray.shutdown()
        left = _stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"Ray processes outlived the test: {sorted(left)}"


def test_a_simulation_runs_its_hospitals_on_an_existing_ray_cluster(
    ray_head: tuple[str, Path], tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    import fedfm

    # Prepare
    address, folder = ray_head
    config = RunConfig().replace(**tiny_csv_settings, **{
        "train.learning-rate": 2e-2,
        "train.local-epochs": 3,
        "federation.num-rounds": 2,
        "federation.min-hospitals": 2,
        # `auto` with one worker (this machine's 2 cores) would be in-process; an address makes it Ray
        "federation.backend": "auto",
        "federation.ray-address": address,
    })

    # Execute
    result = fedfm.run(config, out=tmp_path / "run", progress=False)

    # Assert: the run finished and learned ...
    assert [entry.round for entry in result.rounds] == [1, 2]
    assert set(result.final_per_hospital) == {"north", "south"}
    first, last = result.rounds[0].global_, result.rounds[-1].global_
    assert 0 <= last["accuracy"] <= 1 and last["loss"] < first["loss"]
    for entry in result.rounds:
        assert {h: "train-loss" in r.train for h, r in entry.per_hospital.items()} == {"north": True, "south": True}
    # ... this process joined that cluster as a driver, and the hospitals ran in its workers
    logs = folder / "session_latest" / "logs"
    assert list(logs.glob(f"python-core-driver-*_{os.getpid()}.log"))
    actors = [p for p in logs.glob("worker-*.out") if ":actor_name:ClientAppActor" in p.read_text(errors="replace")]
    assert actors
    import ray

    assert not ray.is_initialized()  # Flower's backend disconnected; the cluster is the fixture's to stop
