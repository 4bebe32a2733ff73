"""A warm hospital: one long-lived process runs every ClientApp task its SuperNode receives.

With Flower's default ``--isolation subprocess``, a SuperNode starts
``flower-superexec``, which starts a fresh ``flwr-clientapp`` process for every
instruction (train, evaluate): each one imports torch, transformers and fedfm,
loads the frozen base model and tokenizes the hospital's rows again, then
exits. On an H200 that was most of a 29-35 s NICTA round (docs/dev-notes.md);
with a 7B base it would be minutes per instruction.

``fedfm hospital`` takes the SuperExec's place beside a SuperNode started with
``--isolation process``. It speaks the SuperNode's own Runtime API exactly as
``flower-superexec`` and ``flwr-clientapp`` do (Flower's client, messages,
heartbeats and task outputs; nothing of its own on the wire), but runs each
acquired task in this process, one at a time, instead of starting another.
fedfm's per-process caches then do what they were built for: the base model,
the LoRA wrapper and the tokenized rows load once per run
(:func:`fedfm.workspace.workspace_for`), and a new run starts from empty caches
(:func:`fedfm.workspace.release`), so a process serving many runs never holds
two runs' models.

The ClientApp is the one the run's FAB names, installed and loaded with
Flower's own functions; its module is imported once per process. Runtime
installation of app dependencies is not offered: the hospital's environment is
the one this process runs in.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedfm.errors import ConfigError, FedfmError

logger = logging.getLogger("fedfm")

#: Seconds between two asks for a pending task while the SuperNode has none.
DEFAULT_POLL_SECONDS = 0.1


class _Stop(BaseException):
    """SIGTERM or SIGINT: finish reporting the task in hand, then leave."""


@dataclass
class WarmHospital:
    """Runs the ClientApp tasks of one SuperNode (``--isolation process``) in this process.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API, ``host:port`` (its ``--host``/``--port``).
    root_certificates : bytes or None
        The CA that signed the Runtime API's certificate (its ``--ssl-certfile``);
        ``None`` speaks plain HTTP, for a SuperNode on the same machine.
    poll_seconds : float
        Pause between two asks for a task while none is pending.
    """

    runtime_api_address: str
    root_certificates: bytes | None = None
    poll_seconds: float = DEFAULT_POLL_SECONDS
    #: Tasks run so far, and the run whose caches this process holds.
    tasks: int = 0
    current_run: int | None = None
    _installed: set[str] = field(default_factory=set)

    def _client(self, *interceptors: Any) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self, *, max_tasks: int | None = None) -> int:
        """Ask the SuperNode for tasks and run them until stopped (SIGTERM, Ctrl-C); return the tasks run."""
        def stop(_signum: int, _frame: FrameType | None) -> None:
            raise _Stop

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        executor = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        logger.info("fedfm hospital: serving the ClientApp tasks of the SuperNode at %s (one process, warm)",
                    self.runtime_api_address)
        try:
            while max_tasks is None or self.tasks < max_tasks:
                acquired = executor.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if acquired.HasField("task") and acquired.token:
                    self.run_task(acquired.token)
                else:
                    time.sleep(self.poll_seconds)
        except _Stop:
            logger.info("fedfm hospital: stopped after %d task(s)", self.tasks)
        finally:
            executor.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.tasks

    def run_task(self, token: str) -> None:
        """Pull one task's message and context, run the ClientApp on it here, push the reply and the task's end."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "stopped before the ClientApp finished"
        try:
            message, context, run, fab = pull_task_input(client)
            self._enter_run(run.run_id)
            if fab.hash_str not in self._installed:
                install_from_fab(fab.content, skip_prompt=True)
                self._installed.add(fab.hash_str)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            client_app = load(run.fab_id, run.fab_version, fab.hash_str)
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except _Stop:
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="hospital stopped"),
                                reply_to=message)
            raise
        except Exception as err:  # the ClientApp's failure is the task's, never this process's
            logger.error("fedfm hospital: the ClientApp raised %s: %s", type(err).__name__, err,
                         exc_info=not isinstance(err, ConfigError))
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(err)}:<'{err}'>"
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client=client, context=context, sub_status=status, details=details)
            finally:
                heartbeat.stop()
                client.close()
                self.tasks += 1

    def _enter_run(self, run_id: int) -> None:
        """Keep one run's caches: a task of another run starts from an empty process state."""
        if self.current_run is not None and run_id != self.current_run:
            from fedfm.workspace import release

            release()
            logger.info("fedfm hospital: run %d follows run %d; released the earlier run's model and rows",
                        run_id, self.current_run)
        self.current_run = run_id


def serve(runtime_api_address: str, *, root_certificates: str | None = None, insecure: bool = False,
          threads: int = 0, poll_seconds: float = DEFAULT_POLL_SECONDS) -> int:
    """``fedfm hospital``: check the options, then serve the SuperNode's tasks until stopped.

    Exactly one of ``root_certificates`` (a PEM file) and ``insecure`` says how
    to reach the Runtime API; ``threads`` > 0 sets torch's thread count (several
    hospitals sharing one machine), 0 leaves torch's default.
    """
    from pathlib import Path

    if bool(root_certificates) == insecure:
        raise FedfmError("fedfm hospital needs exactly one of --insecure (a SuperNode on this machine, plain HTTP) "
                          "and --root-certificates CA.pem (the CA of the SuperNode's --ssl-certfile)")
    if ":" not in runtime_api_address:
        raise FedfmError(f"--runtime-api-address {runtime_api_address!r} must be host:port, the SuperNode's "
                          "--host and --port (default 127.0.0.1:9094)")
    certificates = None
    if root_certificates:
        path = Path(root_certificates)
        if not path.is_file():
            raise FedfmError(f"--root-certificates {root_certificates}: no such file; give the CA certificate "
                              "(PEM) that signed the SuperNode's --ssl-certfile")
        certificates = path.read_bytes()
    if threads:
        from fedfm.client import use_threads

        use_threads(threads)
    return WarmHospital(runtime_api_address, root_certificates=certificates, poll_seconds=poll_seconds).serve()
