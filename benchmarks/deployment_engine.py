"""A federation on Flower's Deployment Engine, all on this machine: one SuperLink, one SuperNode per hospital.

The quality benchmark's federated arm normally runs in Flower's simulation
engine (Ray). ``python benchmarks/quality.py --engine deployment`` runs it here
instead, through the same processes a real deployment uses (docs/how-to/deploy.md)
minus TLS and node authentication, which only matter between machines:

- ``flower-superlink --insecure`` on a free localhost port, state in memory;
- ``flower-supernode --insecure --node-config partition-id=I`` for each of the
  ``data.num-hospitals`` hospitals (each trains on the partition the run
  configuration gives index I, as in a simulation);
- ``flwr run <repo> local --stream --run-config ...`` with the run's flat configuration.

It needs no Ray, so it also runs where Ray is not installed (the GPU machines
some sessions are lent, see docs/dev-notes.md). By default (``warm=False``)
Flower starts a fresh ``flwr-clientapp`` process for every instruction, so each
round pays the model load in every hospital; the figures include it. With
``warm=True`` each SuperNode runs with ``--isolation process`` beside one
``fedfm hospital`` process that runs all its instructions and keeps the model
and rows loaded (docs/how-to/deploy.md, "Warm hospitals").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from typing_extensions import Self

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _executable(name: str) -> str:
    """Flower's console scripts live beside the running Python, or on PATH (``pip install --target``)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


@dataclass
class LocalFederation:
    """The processes of a local Deployment Engine federation and their logs."""

    folder: Path
    hospitals: int
    keep_logs: Path | None = None
    warm: bool = False
    #: Torch threads of each warm hospital process (0: torch's default).
    threads: int = 0
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.folder / f"{name}.log").open("wb")
        self._logs.append(log)
        # Its own session, so the process and the children Flower starts stop together.
        self.processes[name] = subprocess.Popen(command, env=self.env, cwd=self.folder, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, condition: Any, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} before {what}:\n{self.log(name)[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not happen within {timeout:.0f} s:\n{self.log('superlink')[-3000:]}")

    def start(self) -> None:
        """Start the SuperLink and every SuperNode; return once all SuperNodes are connected."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        home = self.folder / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        # SuperLink and SuperNodes start flwr-serverapp / flwr-clientapp by name.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                    "PATH": path}
        self._start("superlink", [
            _executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port), "--database", ":flwr-in-memory:",
        ])
        self._wait(lambda: "Uvicorn running on" in self.log("superlink"), "the SuperLink serving", 120)
        for index in range(self.hospitals):
            runtime_port = _free_port()
            self._start(f"supernode-{index}", [
                _executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--node-config", f"partition-id={index}", "--port", str(runtime_port),
                *(["--isolation", "process"] if self.warm else []),
            ])
            if self.warm:
                # `python -m fedfm.cli`: the GPU machines run fedfm from PYTHONPATH, without its console script.
                self._start(f"hospital-{index}", [
                    sys.executable, "-m", "fedfm.cli", "hospital", "--insecure", "--runtime-api-address",
                    f"127.0.0.1:{runtime_port}", *(["--threads", str(self.threads)] if self.threads else []),
                ])
        self._wait(lambda: self.log("superlink").count("Activated") >= self.hospitals,
                   f"all {self.hospitals} SuperNodes connecting", 180)

    def run(self, flat_config: dict[str, Any], *, timeout: float) -> float:
        """``flwr run`` the repository's app with this configuration; return its wall seconds."""
        text = " ".join(f"{key}={json.dumps(value)}" for key, value in flat_config.items())
        started = time.perf_counter()
        with (self.folder / "flwr-run.log").open("wb") as log:
            done = subprocess.run([_executable("flwr"), "run", str(ROOT), CONNECTION, "--stream", "--run-config", text],
                                  env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"flwr run exited with {done.returncode}:\n{self.log('flwr-run')[-4000:]}")
        return wall

    def stop(self) -> None:
        """Stop every process group (SIGTERM, then SIGKILL after 30 s)."""
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in self._logs:
            log.close()
        if self.keep_logs is not None:
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            for log_path in self.folder.glob("*.log"):
                shutil.copy(log_path, self.keep_logs / log_path.name)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
