"""A hospital's kept arrays outlive its process, and rewind with a server resumed from an earlier round."""

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
    from fedfm.privacy.hospital import state_dir

    config = RunConfig().replace(**{"output.dir": str(tmp_path / "run")})
    # Simulation: under the run directory, by hospital name
    assert state_dir(config, {}, "north") == tmp_path / "run" / "hospitals" / "north"
    # A SuperNode with its own data ignores the run config's output.dir (the coordinator picked it)
    assert state_dir(config, {"data-path": "/srv/north.csv"}, "north") is None
    assert state_dir(config, {"data-path": "/srv/north.csv", "state-dir": str(tmp_path / "s")}, "north") == tmp_path / "s"
    # A hospital name that would leave the run directory is refused
    for name in ("../../etc", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="cannot name a state folder"):
            state_dir(config, {}, name)
