"""The in-process simulation backend: its choice, its isolation of hospitals from the server, its error replies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common import Context

from fedfm import engine
from fedfm.config import RunConfig
from fedfm.errors import ConfigError

from conftest import instruction


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _drawing_app(drawn: list[tuple[float, float, float]]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if "fail" in msg.content.config_records:
            raise RuntimeError("hospital disk full")
        drawn.append(_draws())
        return Message(RecordDict(), reply_to=msg)

    return app


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_auto_is_in_process_for_one_worker_and_ray_for_several() -> None:
    assert engine.resolve("auto", workers=1) == "in-process"
    assert engine.resolve("auto", workers=3) == "ray"
    assert engine.resolve("ray", workers=1) == "ray"
    assert engine.resolve("in-process", workers=1) == "in-process"


def test_bad_backend_settings_name_the_field_and_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"federation.backend": "threads"})
    assert "`federation.backend` must be one of ['auto', 'in-process', 'ray'], got 'threads'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"federation.backend": "in-process", "federation.num-workers": 2})
    assert "`federation.num-workers` is 2" in str(err.value)


def test_hospitals_draw_from_their_own_random_streams_not_the_servers() -> None:
    # Prepare: what the server's generators give when nothing else draws from them.
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected_server = [_draws() for _ in range(3)]
    drawn: list[tuple[float, float, float]] = []
    backend = engine.InProcessBackend({})
    backend.build(lambda: _drawing_app(drawn))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)

    # Execute: the server draws, a hospital runs, the server draws, another hospital runs, ...
    server = [_draws()]
    backend.process_message(instruction(RecordDict()), _context())
    server.append(_draws())
    backend.process_message(instruction(RecordDict()), _context())
    server.append(_draws())

    # Assert: the server's stream is untouched by the hospitals', and theirs goes on from call to call.
    assert server == expected_server
    assert len(drawn) == 2 and drawn[0] != drawn[1]


def test_a_hospital_that_raises_gives_flowers_client_app_error_and_keeps_the_servers_generators() -> None:
    backend = engine.InProcessBackend({})
    backend.build(lambda: _drawing_app([]))
    random.seed(3)
    before = random.getstate()
    content = RecordDict({"fail": ConfigRecord({"x": 1})})
    with pytest.raises(ClientAppException, match="hospital disk full"):
        backend.process_message(instruction(content), _context())
    assert random.getstate() == before


def test_the_ray_backend_is_restored_after_an_in_process_run() -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    with pytest.raises(KeyError), engine.backend("in-process"):
        assert raybackend.RayBackend is engine.InProcessBackend
        raise KeyError("the run failed")
    assert raybackend.RayBackend is original


def test_the_client_app_hands_freed_heap_back_after_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfm import client

    assert client._TRIM is not None  # glibc on Linux, where simulations of many hospitals run
    calls: list[int] = []
    monkeypatch.setattr(client, "_TRIM", lambda pad: calls.append(pad) or 1)
    message = instruction(RecordDict())
    reply = Message(RecordDict(), reply_to=message)

    def fails(msg: Message, context: Context) -> Message:
        raise RuntimeError("out of disk")

    assert client.memory_mod(message, _context(), lambda msg, context: reply) is reply
    with pytest.raises(RuntimeError, match="out of disk"):
        client.memory_mod(message, _context(), fails)
    assert calls == [0, 0]
