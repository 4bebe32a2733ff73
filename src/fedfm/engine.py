"""Where a simulation's hospitals run: Flower's Ray backend, or fedfm's in-process backend.

With one simulation worker (the default on a machine of up to three cores), Ray
adds only start-up: ``ray.init``, a worker process that imports torch,
transformers and fedfm again and loads its own copy of the model, and
``ray.shutdown`` after every run. The in-process backend runs each hospital's
ClientApp in a thread of this process instead, one message at a time, the way
Flower's Ray backend runs it in its single actor:

- the hospitals get their own workspace (model, tokenized rows), never the
  server's (:func:`fedfm.workspace.workspace_for`'s ``side``), so a late
  hospital still training after a round timeout cannot touch the model the
  server evaluates;
- Python's, numpy's and torch's global random generators are swapped for the
  hospitals' own while a ClientApp runs, so hospitals and server draw from
  separate streams as they do in two processes;
- messages are copied on the way in and out, as a process boundary copies
  them, so neither side sees the other change a record after sending it;
- an exception in a ClientApp becomes the error reply Flower's Ray backend
  would send, which the server logs with the hospital's id.

Flower 1.42's simulation engine always builds its ``RayBackend``
(``flwr.server.superlink.fleet.vce.vce_api.start_vce``); :func:`backend` puts
the in-process one in its place for the duration of one run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from flwr.app import Error
from flwr.app.message import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException
from flwr.common.constant import ErrorCode
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from fedfm.interrupt import RunInterrupted

_SWAP = threading.Lock()


def resolve(name: str, *, workers: int, ray_settings: bool = False) -> str:
    """The backend a run uses: ``auto`` is in-process for one worker, Ray for several.

    Parameters
    ----------
    name : str
        ``federation.backend``.
    workers : int
        The run's simulation workers.
    ray_settings : bool
        A setting only Ray reads is given (``federation.ray-address``, ``federation.gpus-per-hospital``):
        ``auto`` is then Ray whatever the workers.
    """
    if name == "auto":
        return "in-process" if workers == 1 and not ray_settings else "ray"
    return name


def ray_options(
    *, workers: int, threads: int, gpus_per_hospital: float, address: str, gpus: int, quiet: bool
) -> dict[str, Any]:
    """Flower's ``backend_config`` for its Ray backend: what each worker reserves, and how Ray starts.

    Parameters
    ----------
    workers, threads : int
        Simulation workers and the torch threads (Ray CPUs) each reserves.
    gpus_per_hospital : float
        A worker's share of a GPU (``federation.gpus-per-hospital``); 0 splits one GPU among the
        workers when there are ``gpus``, and reserves none otherwise.
    address : str
        An existing cluster to join (``federation.ray-address``); empty starts a local Ray.
    gpus : int
        The GPUs this machine's torch sees (0 on a CPU machine, or with ``model.device = "cpu"``).
    quiet : bool
        Keep Ray's own logs off the terminal (a hospital's failure still reaches the server as an
        error reply).

    Returns
    -------
    dict
        ``client_resources`` and ``init_args``.
    """
    share = gpus_per_hospital if gpus_per_hospital > 0 else (1.0 / workers if gpus else 0.0)
    logging_options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False} if quiet else {}
    # ray.init refuses num_cpus and num_gpus when it joins a cluster: the cluster's own `ray start` said them.
    init_args: dict[str, Any] = (
        {"address": address, **logging_options} if address
        else {"num_cpus": workers * threads, "num_gpus": gpus, "include_dashboard": False, **logging_options}
    )
    return {"client_resources": {"num_cpus": threads, "num_gpus": share}, "init_args": init_args}


def _generators() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_generators(state: tuple[Any, ...]) -> None:
    python, numpy_state, torch_state, cuda = state
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class InProcessBackend(Backend):
    """Runs every hospital's ClientApp in this process, one message at a time.

    Parameters
    ----------
    backend_config : dict
        Flower's backend configuration; nothing in it applies here (no
        resources to reserve, no Ray to start).
    """

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None
        self._hospital_generators: tuple[Any, ...] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Keep the ClientApp loader; nothing else needs starting."""
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        """One message at a time."""
        return 1

    def is_worker_idle(self) -> bool:
        """Always: Flower's simulation loop hands messages over one by one."""
        return True

    def terminate(self) -> None:
        """Nothing to stop."""

    @contextlib.contextmanager
    def _hospital_side(self) -> Iterator[None]:
        server_side = _generators()
        if self._hospital_generators is not None:
            _set_generators(self._hospital_generators)
        try:
            yield
        finally:
            self._hospital_generators = _generators()
            _set_generators(server_side)

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message``; its reply and the hospital's updated context."""
        if self.app_fn is None:
            raise ValueError("the in-process backend was not built: Flower calls build() before any message")
        # Copies, as a process boundary would make: Flower's server side may change a record it has sent
        # (SecAgg+'s workflow does), and a hospital must never see that.
        message = copy.deepcopy(message)
        with self._hospital_side():
            try:
                reply = copy.deepcopy(self.app_fn()(message=message, context=context))
            except RunInterrupted:
                # Ctrl-C: the server is abandoning the round too. An error reply, without the traceback
                # Flower's worker would log for an exception.
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="interrupted"),
                               reply_to=message), context
            except Exception as err:  # the same wrapping as Flower's Ray actor: an error reply, not a crash
                raise ClientAppException(str(err)) from err
        return reply, context


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Make Flower's simulation engine use backend ``name`` (``in-process`` or ``ray``) inside the block."""
    if name == "ray":
        yield
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    with _SWAP:
        original = raybackend.RayBackend
        raybackend.RayBackend = InProcessBackend  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            raybackend.RayBackend = original  # type: ignore[misc]
