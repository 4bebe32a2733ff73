"""A hospital's state (ledger, kept arrays, residual) outlives its process; its arrays rewind with a resumed server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from conftest import instruction
from fedfm import keys
from fedfm.client import app
from fedfm.config import RunConfig, to_json
from fedfm.wire import numpy_to_record, record_to_numpy, state_to_record
from fedfm.workspace import workspace_for


def _context() -> Context:
    return Context(run_id=1, node_id=101, node_config={keys.PARTITION_ID: 1, keys.NUM_PARTITIONS: 2},
                   state=RecordDict(), run_config={})


def _train(config: RunConfig, context: Context, server_round: int, shared: dict[str, np.ndarray] | None = None):  # type: ignore[no-untyped-def]
    arrays = state_to_record(workspace_for(config).loaded.initial_state) if shared is None else numpy_to_record(shared)
    content = RecordDict({
        keys.ARRAYS: arrays,
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: server_round}),
    })
    answer = app(instruction(content, message_type="train"), context)
    assert not answer.has_error(), answer.error
    return record_to_numpy(answer.content[keys.ARRAYS])


def test_fedsa_local_b_survives_a_new_process_and_rewinds(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    # Prepare: FedSA-LoRA keeps each hospital's B at home; the run directory holds the hospitals' state folders
    config = RunConfig().replace(**tiny_csv_settings, **{
        "federation.strategy": "fedsa-lora", "train.local-steps": 2, "output.dir": str(tmp_path),
    })
    name = workspace_for(config).hospital_name(1)
    folder = tmp_path / "hospitals" / name
    first = _context()
    # Execute: round 1 in one process; round 2 both in the same process and in a fresh one
    sent_1 = _train(config, first, 1)
    continued = _train(config, first, 2, sent_1)
    fresh = _train(config, _context(), 2, sent_1)
    # ...and the old process asked for round 2 again (the server resumed from round 1's checkpoint)
    rewound = _train(config, first, 2, sent_1)
    # Assert
    assert sorted(p.name for p in folder.glob("context-state-*")) == [
        "context-state-round-0001.npz", "context-state-round-0002.npz",
    ]
    assert not any("lora_B" in k for k in sent_1), "FedSA-LoRA must not send B"
    for key, value in continued.items():
        np.testing.assert_array_equal(fresh[key], value, err_msg=key)
        np.testing.assert_array_equal(rewound[key], value, err_msg=key)
    # Without the saved state a fresh process would start from the initial B: a different update
    for path in folder.glob("context-state-*"):
        path.unlink()
    forgetful = _train(config, _context(), 2, sent_1)
    assert any(not np.array_equal(forgetful[k], continued[k]) for k in continued)


def test_state_folder_is_never_chosen_by_the_coordinator_on_a_supernode(tmp_path: Path) -> None:
    import pytest

    from fedfm.errors import ConfigError
    from fedfm.hospital_state import state_folder

    config = RunConfig().replace(**{"output.dir": str(tmp_path / "run")})
    # Simulation: under the run directory, by hospital name
    assert state_folder(config, {}, "north") == tmp_path / "run" / "hospitals" / "north"
    # A SuperNode with its own data ignores the run config's output.dir (the coordinator picked it)
    assert state_folder(config, {"data-path": "/srv/north.csv"}, "north") is None
    assert state_folder(config, {"data-path": "/srv/north.csv", "state-dir": str(tmp_path / "s")}, "north") == tmp_path / "s"
    # A hospital name that would leave the run directory is refused
    for name in ("../../etc", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="cannot name a state folder"):
            state_folder(config, {}, name)


def _ledger(hospital: str = "north") -> Any:
    from fedfm.privacy.accounting import HospitalLedger

    return HospitalLedger(hospital, 8.0, 1e-5, 1.1, 0.05, 4).after_training(1, 4)


def test_session_state_dict_round_trips_through_the_context() -> None:
    from fedfm.hospital_state import HospitalSession

    # Prepare
    kept = {"m.lora_B.weight": np.arange(6, dtype=np.float32).reshape(3, 2)}
    residual = {"m.lora_A.weight": np.ones((2, 3), np.float32)}
    session = HospitalSession(None, ledger=_ledger(), kept=kept, residual=residual)
    context = _context()
    # Execute: one save of a trained round, then a fresh load of the same context
    session.save(context, server_round=4)
    again = HospitalSession.load(context, None, server_round=5, training=True)
    # Assert: the same context-state keys as ever, and the same state back
    assert set(context.state) == {keys.PRIVACY_LEDGER, keys.KEPT_ARRAYS, keys.COMPRESSION_RESIDUAL, keys.STATE_ROUND}
    assert again.ledger == session.ledger and again.arrays_round == 4
    np.testing.assert_array_equal(again.kept["m.lora_B.weight"], kept["m.lora_B.weight"])
    np.testing.assert_array_equal(again.residual["m.lora_A.weight"], residual["m.lora_A.weight"])
    fresh = HospitalSession()
    fresh.load_state_dict(session.state_dict())
    assert fresh.ledger == session.ledger and fresh.arrays_round == 4 and set(fresh.kept) == set(kept)


def test_session_rewinds_arrays_but_never_the_ledger(tmp_path: Path) -> None:
    from fedfm.hospital_state import HospitalSession
    from fedfm.privacy.hospital import LEDGER_FILE

    # Prepare: rounds 1, 2 and 3 trained; a refusal in round 4 writes only the ledger
    context = _context()
    for server_round in (1, 2, 3):
        session = HospitalSession.load(context, tmp_path, server_round=server_round, training=True)
        session.kept = {"m.lora_B.weight": np.full((2, 2), server_round, np.float32)}
        session.ledger = _ledger().after_training(server_round + 1, 4)
        session.save(context, server_round=server_round)
    refusing = HospitalSession.load(context, tmp_path, server_round=4, training=True)
    assert refusing.ledger is not None
    refusing.ledger = refusing.ledger.after_refusal(4)
    refusing.save(context)
    # Execute: the server resumed from round 1's checkpoint asks for round 2 again; a new process too
    rewound = HospitalSession.load(context, tmp_path, server_round=2, training=True)
    new_process = HospitalSession.load(_context(), tmp_path, server_round=2, training=True)
    evaluating = HospitalSession.load(_context(), tmp_path, server_round=3, training=False)
    # Assert: files of the two newest trained rounds; the ledger keeps every step and the refusal
    assert sorted(p.name for p in tmp_path.glob("context-state-*")) == [
        "context-state-round-0002.npz", "context-state-round-0003.npz",
    ]
    assert rewound.arrays_round is None and rewound.kept == {}  # round 1's file is gone: nothing older to use
    assert new_process.arrays_round is None
    assert evaluating.arrays_round == 3 and float(evaluating.kept["m.lora_B.weight"][0, 0]) == 3.0
    for session in (rewound, new_process, evaluating):
        assert session.ledger is not None and session.ledger.refused == [4]
    assert rewound.ledger == HospitalSession.load(_context(), tmp_path, server_round=0, training=False).ledger
    assert (tmp_path / LEDGER_FILE).is_file()
