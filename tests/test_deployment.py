"""Deployment: each hospital's own data from its node config, and a real network of separate processes.

The integration tests start a real SuperLink (TLS, SuperNode authentication) and one real
SuperNode per hospital on 127.0.0.1, each SuperNode reading only its own file, and run fedfm
through ``flwr run`` exactly as docs/how-to/deploy.md tells a user to.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.config import parse_config_args

import fedfm
from conftest import instruction
from fedfm import keys, privacy
from fedfm.client import _workspace, app
from fedfm.config import RunConfig, to_json
from fedfm.data import load_source, node_data, node_federation
from fedfm.errors import ConfigError, DataError
from fedfm.wire import state_to_record
from fedfm.workspace import federation_for, workspace_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = ROOT / "examples" / "deployment" / "make_certs.py"
HEART_HOSPITALS = ROOT / "examples" / "deployment" / "heart_hospitals.py"
WORDS = {0: ["calm", "normal", "stable", "healthy"], 1: ["pain", "severe", "acute", "disease"]}
# Each hospital's own file has its own size, so a reply's row count says whose file was read.
HOSPITAL_ROWS = {"east": 20, "north": 30, "south": 40}
# The coordinator's list of hospitals (index order, not sorted) and classes (id order, not sorted).
HOSPITALS = ("south", "east", "north")
LABEL_NAMES = ("positive", "negative")
# A hospital that never saw one of the classes (its file has only "positive" rows).
ONE_CLASS = "east"
WARM = ("north", "south")  # hospitals whose instructions run in one long-lived `fedfm hospital` process
CONNECTION = "hospitals"  # the SuperLink connection's name in the flwr config (`flwr run . hospitals`)


def _write_notes(
    path: Path, rows: int, seed: int, *, hospitals: tuple[str, ...] = (), labels: tuple[int, ...] = (0, 1)
) -> Path:
    """Labelled notes (``labels`` in turn); with ``hospitals``, ``rows`` rows for each, in a ``hospital`` column."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"] + (["hospital"] if hospitals else []))
        for site in hospitals or ("",):
            for i in range(rows):
                label = labels[i % len(labels)]
                text = " ".join(rng.choice(WORDS[label]) for _ in range(6))
                writer.writerow([text, ["negative", "positive"][label]] + ([site] if hospitals else []))
    return path


# ---- the hospital's own data, from its node config ---------------------------------------------------------------


def test_without_data_path_a_hospital_uses_the_run_configuration() -> None:
    assert node_data({keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}) is None


def test_data_path_inside_data_root_is_split_into_local_train_and_test(tmp_path: Path) -> None:
    # Prepare
    _write_notes(tmp_path / "site" / "notes.csv", 30, seed=1)
    # Execute
    node = node_data({"data-root": str(tmp_path / "site"), "data-path": "notes.csv", "hospital": "north"})
    assert node is not None
    federation = node_federation(node, test_fraction=0.3, seed=0)
    # Assert
    assert (node.name, node.file_format, node.path) == ("north", "csv", (tmp_path / "site" / "notes.csv").resolve())
    [hospital] = federation.hospitals
    assert (hospital.name, len(hospital.train), len(hospital.test)) == ("north", 21, 9)
    assert federation.source.label_names == ["negative", "positive"]
    assert set(hospital.test["label"]) == {0, 1}  # stratified: both classes on both sides


def test_hospital_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = _write_notes(tmp_path / "St-Mary.csv", 4, seed=1)
    node = node_data({"data-path": str(path)})
    assert node is not None and node.name == "St-Mary"


@pytest.mark.parametrize(
    ("node_config", "error", "says"),
    [
        ({"data-path": ""}, ConfigError, "node config `data-path` must name the hospital's data file"),
        ({"data-path": "notes.csv"}, ConfigError, "`data-path` must be an absolute path, or relative to `data-root`"),
        ({"data-path": "{tmp}/missing.csv"}, DataError, "`data-path` names '{tmp}/missing.csv', which does not exist"),
        ({"data-path": "{tmp}/site"}, ConfigError, "must end in one of ['.csv', '.json', '.jsonl', '.parquet']"),
        ({"data-path": "{tmp}/site/folder.csv"}, DataError, "which does not exist or is not a file"),
        ({"data-root": "{tmp}/site", "data-path": "../elsewhere/other.csv"}, ConfigError,
         "resolves to '{tmp}/elsewhere/other.csv', outside `data-root` '{tmp}/site'"),
        ({"data-root": "{tmp}/site", "data-path": "link.csv"}, ConfigError, "outside `data-root`"),
        ({"data-root": "site", "data-path": "notes.csv"}, ConfigError, "`data-root` must be an absolute folder path"),
        ({"data-root": "{tmp}/nowhere", "data-path": "notes.csv"}, DataError, "`data-root` names"),
        ({"data-path": "{tmp}/site/notes.csv", "hospital": "a b"}, ConfigError, "`hospital` must be a name of letters"),
    ],
    ids=["empty", "relative-without-root", "missing", "no-suffix", "folder", "dot-dot-escape", "symlink-escape",
         "relative-root", "missing-root", "bad-name"],
)
def test_bad_node_config_names_the_key_and_the_allowed_form(
    tmp_path: Path, node_config: dict[str, str], error: type[Exception], says: str
) -> None:
    # Prepare: a data root with one file, a file outside it, and a link from inside to outside.
    tmp = tmp_path.resolve()
    _write_notes(tmp / "site" / "notes.csv", 6, seed=1)
    (tmp / "site" / "folder.csv").mkdir()
    _write_notes(tmp / "elsewhere" / "other.csv", 6, seed=2)
    (tmp / "site" / "link.csv").symlink_to(tmp / "elsewhere" / "other.csv")
    filled = {k: v.replace("{tmp}", str(tmp)) for k, v in node_config.items()}
    # Execute / Assert
    with pytest.raises(error) as raised:
        node_data(filled)
    assert says.replace("{tmp}", str(tmp)) in str(raised.value)


def test_unreadable_file_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "records.parquet"
    broken.write_bytes(b"this is not parquet")
    node = node_data({"data-path": str(broken)})
    assert node is not None
    with pytest.raises(DataError, match="cannot read .*records.parquet as parquet"):
        node_federation(node)


def test_a_supernode_trains_on_its_own_file_and_never_reads_the_run_configs(
    tmp_path: Path, tiny_csv_settings: dict[str, Any]
) -> None:
    # Prepare: the coordinator's run configuration names a file this hospital does not have.
    coordinator = RunConfig().replace(**tiny_csv_settings, **{"train.local-steps": 2})
    sent = RecordDict({
        keys.ARRAYS: state_to_record(workspace_for(coordinator).loaded.initial_state),
        keys.CONFIG: ConfigRecord({
            keys.RUN_CONFIG: to_json(coordinator.replace(**{"data.path": str(tmp_path / "coordinator-only.csv")})),
            keys.SERVER_ROUND: 1,
        }),
    })
    own = _write_notes(tmp_path / "hospital" / "records.csv", 50, seed=3)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={keys.PARTITION_ID: 1, "data-path": str(own), "hospital": "west"})
    # Execute
    trained = app(instruction(sent, message_type="train"), context)
    evaluated = app(instruction(sent, message_type="evaluate"), context)
    # Assert: 50 rows split 35/15 locally; the index is the node config's partition-id.
    assert not trained.has_error(), trained.error
    assert not evaluated.has_error(), evaluated.error
    assert trained.content[keys.METRICS][keys.NUM_EXAMPLES] == 35
    assert evaluated.content[keys.METRICS][keys.NUM_EXAMPLES] == 15
    assert trained.content[keys.METRICS][keys.HOSPITAL_INDEX] == 1


def test_partition_id_must_be_an_index(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    config = RunConfig().replace(**tiny_csv_settings)
    sent = RecordDict({keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: 1})})
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={keys.PARTITION_ID: "north", "data-path": str(tmp_path / "x.csv")})
    with pytest.raises(ConfigError, match="node config `partition-id` must be the hospital's index"):
        app(instruction(sent, message_type="train"), context)


# ---- the coordinator's list of hospitals (data.hospitals) and classes (data.label-names) ---------------------------


def _deployment(**settings: Any) -> RunConfig:
    """A coordinator's configuration without hospital rows: names, classes, no global test file."""
    return RunConfig().replace(**{"data.hospitals": ",".join(HOSPITALS), "data.label-names": ",".join(LABEL_NAMES),
                                  "federation.central-evaluation": False, **settings})


def test_a_supernode_known_by_name_trains_a_class_it_never_saw_with_the_servers_head(
    tmp_path: Path, tiny_bert: Path
) -> None:
    # Prepare: the server's adapter comes from the deployment's classes (three); this hospital's file has one.
    coordinator = _deployment(**{"model.name": str(tiny_bert), "lora.r": 4, "train.batch-size": 8,
                                 "train.local-steps": 2, "data.label-names": "positive,negative,unsure"})
    server = workspace_for(coordinator)
    assert server.num_labels == 3 and [h.name for h in server.federation.hospitals] == list(HOSPITALS)
    sent = RecordDict({
        keys.ARRAYS: state_to_record(server.loaded.initial_state),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(coordinator), keys.SERVER_ROUND: 1}),
    })
    own = _write_notes(tmp_path / "east" / "records.csv", 20, seed=3, labels=(0,))
    by_name = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"hospital": "east", "data-path": str(own)})
    by_index = Context(run_id=1, node_id=8, state=RecordDict(), run_config={},
                       node_config={keys.PARTITION_ID: 2, "data-path": str(own)})
    # Execute
    trained = app(instruction(sent, message_type="train"), by_name)
    # Assert: the index is the name's position in data.hospitals; the 3-class head fits a 1-class file.
    assert not trained.has_error(), trained.error
    assert trained.content[keys.METRICS][keys.HOSPITAL_INDEX] == HOSPITALS.index("east")
    assert trained.content[keys.METRICS][keys.NUM_EXAMPLES] == 14
    assert _workspace(coordinator, by_name).num_labels == 3
    # With only a partition-id, the hospital is known by its name in data.hospitals, not by its file's stem.
    assert _workspace(coordinator, by_index).hospital_name(2) == "north"


@pytest.mark.parametrize(
    ("node_config", "says"),
    [
        ({"hospital": "west", "data-path": "{own}"},
         "node config `hospital` 'west' is not one of the run's `data.hospitals` ['south', 'east', 'north']"),
        ({keys.PARTITION_ID: 3, "data-path": "{own}"},
         "node config `partition-id` 3 is out of range: the run's `data.hospitals` lists 3 hospitals"),
        ({keys.PARTITION_ID: 0, "hospital": "east", "data-path": "{own}"},
         ("node config `partition-id` 0 is 'south' in the run's `data.hospitals` ['south', 'east', 'north'], "
         "but `hospital` says 'east'")),
        ({"data-path": "{own}"}, "this SuperNode has no `partition-id` in its node config"),
        ({keys.PARTITION_ID: 1, "hospital": "east"},
         "this hospital has no `data-path` in its node config, but the run lists `data.hospitals`"),
    ],
    ids=["unknown-name", "index-out-of-range", "index-and-name-disagree", "neither", "no-data-path"],
)
def test_a_supernode_that_is_no_listed_hospital_is_refused_before_any_model_loads(
    tmp_path: Path, node_config: dict[str, Any], says: str
) -> None:
    # Prepare: model.name is an alias that would need loading, so an error after the lookup would be another one.
    own = _write_notes(tmp_path / "records.csv", 6, seed=1)
    sent = RecordDict({keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(_deployment()), keys.SERVER_ROUND: 1})})
    filled = {k: v.replace("{own}", str(own)) if isinstance(v, str) else v for k, v in node_config.items()}
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config=filled)
    # Execute / Assert
    with pytest.raises(ConfigError) as raised:
        app(instruction(sent, message_type="train"), context)
    assert says in str(raised.value)


def test_federation_for_builds_a_deployment_from_data_hospitals(tmp_path: Path) -> None:
    # Prepare: the coordinator holds a labelled test file, and no hospital's rows.
    path = _write_notes(tmp_path / "test.csv", 6, seed=1)
    data = _deployment(**{"data.path": str(path), "federation.central-evaluation": True}).data
    # Execute
    federation = federation_for(data)
    # Assert: the hospitals in data.hospitals' order, no rows; the whole file as global test, ids by data.label-names.
    assert [(h.name, len(h.train), len(h.test)) for h in federation.hospitals] == [(h, 0, 0) for h in HOSPITALS]
    assert federation.source.label_names == list(LABEL_NAMES)
    assert federation.global_test["label"] == [1, 0] * 3  # rows alternate negative, positive


def test_label_names_must_match_a_built_in_datasets_classes() -> None:
    data = RunConfig().replace(**{"data.label-names": "healthy,sick"}).data
    with pytest.raises(ConfigError, match=r"`data.label-names` \['healthy', 'sick'\] differ from the classes of "
                                          r"'heart_disease_uci', \['no heart disease', 'heart disease'\]"):
        federation_for(data)


def test_dp_sgd_leaves_each_hospitals_noise_to_the_hospital_when_the_server_has_no_rows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    config = _deployment(**{"privacy.mode": "dp-sgd", "privacy.hospital-epsilon": "east=2"})
    # Execute
    with caplog.at_level(logging.INFO, logger="fedfm"):
        plans = privacy.check(config, federation_for(config.data))
    # Assert: no plan from rows the server does not have, and the log says who calibrates.
    assert plans == []
    assert "each hospital checks δ against its own rows and calibrates its own noise" in caplog.text
    # Per-hospital budgets are still checked against the listed names.
    wrong = config.replace(**{"privacy.hospital-epsilon": "west=2"})
    with pytest.raises(ConfigError, match=r"`privacy.hospital-epsilon` names 'west', which is no hospital of this "
                                          r"run; hospitals: \['south', 'east', 'north'\]"):
        privacy.check(wrong, federation_for(wrong.data))


def _dp_train(tiny_bert: Path, own: Path, node_config: dict[str, Any], **settings: Any) -> Any:
    """Hospital east's reply to a DP-SGD training instruction of a deployment whose server holds no rows."""
    coordinator = _deployment(**{"model.name": str(tiny_bert), "lora.r": 4, "train.batch-size": 8,
                                 "train.local-steps": 2, "privacy.mode": "dp-sgd", "privacy.noise-multiplier": 2.0,
                                 **settings})
    sent = RecordDict({
        keys.ARRAYS: state_to_record(workspace_for(coordinator).loaded.initial_state),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(coordinator), keys.SERVER_ROUND: 1}),
    })
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"hospital": "east", "data-path": str(own), **node_config})
    return app(instruction(sent, message_type="train"), context)


def test_a_hospital_checks_its_own_delta_and_keeps_no_unnoised_statistic(tmp_path: Path, tiny_bert: Path) -> None:
    # Prepare: east's file has 20 rows, 14 of them for training; the server holds none, so it checked no δ.
    own = _write_notes(tmp_path / "east" / "records.csv", 20, seed=3)
    state = {keys.STATE_DIR: str(tmp_path / "east-state")}
    # Execute / Assert: δ = 0.9 would let a mechanism publish a whole row; the hospital refuses it itself.
    with pytest.raises(ConfigError, match=r"`privacy.delta` 0.9 is not below 1/N = 0.0714 for hospital 'east' "
                                          r"\(14 rows\)"):
        _dp_train(tiny_bert, own, state, **{"privacy.delta": 0.9})
    # A SuperNode's own δ cap wins over the run's; a ledger kept in memory only is the operator's explicit choice.
    trained = _dp_train(tiny_bert, own, {keys.DELTA_CAP: 1e-6, keys.LEDGER_IN_MEMORY: True},
                        **{"privacy.delta": 1e-3})
    assert not trained.has_error(), trained.error
    metrics = dict(trained.content[keys.METRICS])
    assert metrics[keys.DP_DELTA] == pytest.approx(1e-6)
    # Only what the ledger covers leaves: no loss, drawn-row count or time of the Poisson batches.
    assert keys.DP_EPSILON in metrics and metrics[keys.NUM_EXAMPLES] == 14
    assert not {keys.TRAIN_LOSS, keys.TRAIN_EXAMPLES, keys.TRAIN_SECONDS} & set(metrics)


def test_a_supernode_without_a_state_dir_refuses_dp_sgd(tmp_path: Path, tiny_bert: Path) -> None:
    own = _write_notes(tmp_path / "east" / "records.csv", 20, seed=3)
    with pytest.raises(ConfigError, match=r"hospital 'east' has nowhere to keep its privacy ledger across restarts "
                                          r"\(DP-SGD\): start its SuperNode with --node-config \"state-dir="):
        _dp_train(tiny_bert, own, {})


def test_a_stored_ledger_is_held_to_the_smallest_budget(tmp_path: Path, tiny_bert: Path) -> None:
    from fedfm.privacy.accounting import HospitalLedger, epsilon_of
    from fedfm.privacy.hospital import LEDGER_FILE

    # Prepare: an earlier run at ε = 8 left east's ledger in its state folder, having spent ε ≈ 2.6.
    own = _write_notes(tmp_path / "east" / "records.csv", 20, seed=3)
    folder = tmp_path / "east-state"
    history = [(2.0, 1.0, 6)]
    spent = epsilon_of(history, 1e-5)
    HospitalLedger(hospital="east", target_epsilon=8.0, delta=1e-5, noise_multiplier=2.0, sample_rate=1.0,
                   steps_per_round=2, history=history, rounds=[1, 2, 3]).save(folder / LEDGER_FILE)
    assert 2.0 < spent < 8.0
    # Execute: a new run that allows ε 8 again, on a SuperNode whose operator caps it at 2.
    refused = _dp_train(tiny_bert, own, {keys.STATE_DIR: str(folder), keys.EPSILON_CAP: 2.0},
                        **{"privacy.target-epsilon": 8.0})
    # Assert: the hospital refuses (its ledger is past the cap), and the stored ledger keeps the lower budget.
    metrics = dict(refused.content[keys.METRICS])
    assert keys.ARRAYS not in refused.content
    assert metrics[keys.DP_REFUSED] == 1 and metrics[keys.DP_TARGET_EPSILON] == 2.0
    assert metrics[keys.DP_EPSILON] == pytest.approx(spent)
    stored = HospitalLedger.load(folder / LEDGER_FILE)
    assert stored is not None and stored.target_epsilon == 2.0 and stored.history == history


def test_a_simulation_refuses_data_hospitals_before_ray_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`data.hospitals` \['south', 'east', 'north'\] lists a deployment's "
                                          r"hospitals"):
        fedfm.run(_deployment(), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- the certificate script ---------------------------------------------------------------------------------------


def test_make_certs_signs_a_server_certificate_for_localhost_and_one_p384_key_per_hospital(tmp_path: Path) -> None:
    # Execute
    done = subprocess.run([sys.executable, str(MAKE_CERTS), str(tmp_path), "--hospitals", "north", "south",
                           "--host", "superlink.example.org"], capture_output=True, text=True, timeout=120, check=False)
    # Assert
    assert done.returncode == 0, done.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "certificates" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certificates" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert (tmp_path / "certificates" / "server.key").stat().st_mode & 0o077 == 0
    for hospital in ("north", "south"):
        private = load_ssh_private_key((tmp_path / "keys" / hospital).read_bytes(), None)
        public = load_ssh_public_key((tmp_path / "keys" / f"{hospital}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public == private.public_key()


def test_heart_hospital_files_hold_each_hospitals_training_rows(tmp_path: Path) -> None:
    # Execute
    done = subprocess.run([sys.executable, str(HEART_HOSPITALS), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    # Assert
    assert done.returncode == 0, done.stderr
    # The files hold the quickstart federation's training rows, so the coordinator's test rows are in none.
    federation = federation_for(RunConfig().data)
    slugs = [hospital.name.lower().replace(" ", "-") for hospital in federation.hospitals]
    for slug, hospital in zip(slugs, federation.hospitals, strict=True):
        assert f'hospital="{slug}" data-root="{tmp_path / slug}"' in done.stdout
        node = node_data({"data-root": str(tmp_path / slug), "data-path": "records.csv"})
        assert node is not None
        rows = load_source("csv", path=node.path).train
        assert rows["text"] == hospital.train["text"]
        assert rows["label"] == hospital.train["label"]
    # The printed run configuration is a valid deployment: these hospitals, the table's classes, the held-out rows.
    [line] = [line for line in done.stdout.splitlines() if line.startswith("coordinator: --run-config ")]
    [run_config] = shlex.split(line.split("--run-config ", 1)[1])
    coordinator = RunConfig().replace(**parse_config_args([run_config]))  # as `flwr run --run-config` reads it
    assert coordinator.data.hospitals == tuple(slugs)
    deployment = federation_for(coordinator.data)
    assert deployment.source.label_names == federation.source.label_names
    assert deployment.global_test["text"] == federation.global_test["text"]
    assert deployment.global_test["label"] == federation.global_test["label"]


# ---- a real network: SuperLink + one SuperNode per hospital, over TLS, with node authentication ----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(condition: Any, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"{what} did not happen within {timeout} s\n{tails}")


@dataclass
class Network:
    """The processes of a test network and where their files are."""

    folder: Path
    env: dict[str, str]
    port: int
    certificates: Path
    keys: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    _files: list[IO[str]] = field(default_factory=list)

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start a process in its own session (so its children can be found and stopped with it)."""
        self.logs[name] = self.folder / f"{name}.log"
        log = self.logs[name].open("w")
        self._files.append(log)
        process = subprocess.Popen(command, env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def supernode(self, hospital: str, partition_id: int | None = None, *, warm: bool = False,
                  runtime_tls: bool = False) -> subprocess.Popen[bytes]:
        """A hospital's SuperNode as docs/how-to/deploy.md starts it: its own key, its own data, its name.

        ``warm``: with ``--isolation process``, beside one ``fedfm hospital`` process (named ``<hospital>-process``)
        that runs all its instructions; ``runtime_tls``: the SuperNode's Runtime API speaks TLS (the test CA's
        certificate for 127.0.0.1) and the hospital process checks it against the CA.
        """
        index = f"partition-id={partition_id} " if partition_id is not None else ""
        node_config = f'{index}hospital="{hospital}" data-root="{self.folder / hospital}" data-path="records.csv"'
        runtime_port = _free_port()
        tls = ["--ssl-ca-certfile", str(self.certificates / "ca.crt"),
               "--ssl-certfile", str(self.certificates / "server.pem"),
               "--ssl-keyfile", str(self.certificates / "server.key")] if runtime_tls else []
        node = self.start(hospital, [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certificates / "ca.crt"),
            "--auth-supernode-private-key", str(self.keys / hospital),
            "--node-config", node_config, "--port", str(runtime_port), *tls,
            *(["--isolation", "process"] if warm else []),
        ])
        if warm:
            trust = ["--root-certificates", str(self.certificates / "ca.crt")] if runtime_tls else ["--insecure"]
            self.start(f"{hospital}-process", [str(BIN / "fedfm"), "hospital", *trust,
                                               "--runtime-api-address", f"127.0.0.1:{runtime_port}"])
        return node

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def log(self, name: str) -> str:
        return self.logs[name].read_text()

    def stop(self) -> list[str]:
        """Stop every process group; return the processes of their sessions still alive afterwards."""
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
        for log in self._files:
            log.close()
        time.sleep(1)  # children of a stopped SuperNode or SuperLink leave shortly after it
        alive = []
        for process in self.processes.values():
            listed = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(process.pid)], capture_output=True,
                                    text=True, check=False).stdout.splitlines()
            alive += [line for line in listed if line.split()[1][0] != "Z"]
        return alive


def _start_network(folder: Path) -> Network:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(MAKE_CERTS), str(folder), "--hospitals", *HOSPITAL_ROWS, "intruder"],
                   check=True, capture_output=True, timeout=120)
    port = _free_port()
    home = folder / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{folder / "certificates" / "ca.crt"}"\n'
    )
    # The SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name.
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    network = Network(folder=folder, env=env, port=port, certificates=folder / "certificates", keys=folder / "keys")
    # Each hospital's own file lies in its own folder; the coordinator holds no rows.
    for seed, (hospital, rows) in enumerate(HOSPITAL_ROWS.items()):
        _write_notes(folder / hospital / "records.csv", rows, seed=10 + seed, labels=(0,) if hospital == ONE_CLASS else (0, 1))
    try:  # a network that fails to come up is stopped here: the fixture never gets it to stop
        network.start("superlink", [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(network.certificates / "ca.crt"),
            "--ssl-certfile", str(network.certificates / "server.pem"),
            "--ssl-keyfile", str(network.certificates / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
        ])
        _wait_until(lambda: "Uvicorn running on https://" in network.log("superlink"), "the SuperLink serving HTTPS",
                    120, [network.logs["superlink"]])
        for hospital in HOSPITAL_ROWS:  # the coordinator lists the hospitals' public keys
            done = network.flwr("supernode", "register", str(network.keys / f"{hospital}.pub"), CONNECTION)
            assert done.returncode == 0, done.stdout + done.stderr
        # Known by name in data.hospitals; east also by its index there. East runs Flower's default (a fresh
        # flwr-clientapp process per instruction), north and south are warm hospitals (one `fedfm hospital` process),
        # south's over a Runtime API with TLS.
        for hospital in HOSPITAL_ROWS:
            network.supernode(hospital, HOSPITALS.index(hospital) if hospital == "east" else None,
                              warm=hospital in WARM, runtime_tls=hospital == "south")
        _wait_until(lambda: network.log("superlink").count("[Fleet.ActivateNode] Activated") == len(HOSPITAL_ROWS),
                    "every listed SuperNode connecting", 180, list(network.logs.values()))
    except BaseException:
        network.stop()
        raise
    return network


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A SuperLink and three hospitals' SuperNodes, shared by the integration tests below (in file order)."""
    folder = tmp_path_factory.mktemp("network")
    network: Network | None = None
    try:
        network = _start_network(folder)
        yield network
    finally:
        if network is not None:
            alive = network.stop()
            assert alive == [], f"processes outlived the network: {alive}"


def _flwr_run(network: Network, tiny_bert: Path, run_dir: Path, **settings: Any) -> list[str]:
    """``flwr run . hospitals`` with the coordinator's settings: the test's tiny model, the hospitals' names and classes."""
    overrides = {
        "model.name": str(tiny_bert), "lora.r": 4, "train.batch-size": 8, "train.local-steps": 2,
        "data.hospitals": ",".join(HOSPITALS), "data.label-names": ",".join(LABEL_NAMES),
        "federation.central-evaluation": False, "federation.num-rounds": 2, "federation.min-hospitals": 2,
        "output.dir": str(run_dir), **settings,
    }
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    return [str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream", "--run-config", text]


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_three_hospitals_train_on_their_own_files_over_tls_and_an_unlisted_key_is_refused(
    network: Network, tiny_bert: Path, tmp_path: Path
) -> None:
    # The SuperLink speaks TLS with the certificate the test CA signed for 127.0.0.1.
    context = ssl.create_default_context(cafile=str(network.certificates / "ca.crt"))
    with socket.create_connection(("127.0.0.1", network.port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # Execute: an intruder's SuperNode (a key the coordinator never registered) tries to join while the three
    # hospitals run two rounds; they evaluate after the last one.
    intruder = network.supernode("intruder")
    run_dir = tmp_path / "run"
    done = subprocess.run(_flwr_run(network, tiny_bert, run_dir, **{"federation.evaluate-every": 2}),
                          env=network.env, cwd=network.folder, capture_output=True, text=True, timeout=900, check=False)
    # Assert: the intruder was refused and stopped; only the listed hospitals are in the federation.
    assert intruder.wait(timeout=180) != 0
    assert "Failed to activate SuperNode" in network.log("intruder")
    assert "No SuperNode found with the given public key" in network.log("superlink")
    listed = json.loads(network.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
    assert sorted(node["status"] for node in listed["nodes"]) == ["online"] * len(HOSPITAL_ROWS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert set(summary["final"]["per_hospital"]) == set(HOSPITAL_ROWS)
    rounds = _rounds(run_dir)
    for entry in rounds:
        # Each hospital trained on its own file (70 % of its rows) under its own name (looked up in data.hospitals),
        # and east, which never saw "negative", was not left out for a smaller classifier head.
        trained = {name: v["train"][keys.NUM_EXAMPLES] for name, v in entry["per_hospital"].items()}
        assert trained == {name: rows - round(0.3 * rows) for name, rows in HOSPITAL_ROWS.items()}
        assert entry["left_out"] == {}
    assert {name: v["evaluate"][keys.NUM_EXAMPLES] for name, v in rounds[1]["per_hospital"].items()} == {
        name: round(0.3 * rows) for name, rows in HOSPITAL_ROWS.items()
    }
    # No global test file: the round's global score is the hospitals' own evaluation, and the row counts in
    # summary.json are the ones the hospitals reported.
    assert rounds[1]["global"] == rounds[1]["federated"] and set(rounds[1]["global"]) >= {"accuracy", "macro-f1"}
    assert summary["global_test_rows"] == 0
    assert summary["hospitals"] == {
        name: {"train_rows": rows - round(0.3 * rows), "test_rows": round(0.3 * rows)} for name, rows in HOSPITAL_ROWS.items()
    }
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # The warm hospitals ran their three instructions (two trainings, one evaluation) in one process each, which
    # loaded the base model once; east's SuperNode started a process per instruction.
    for hospital in WARM:
        process = network.processes[f"{hospital}-process"]
        assert process.poll() is None
        assert _base_model_loads(network.log(f"{hospital}-process")) == [process.pid]
    assert "Starting Flower SuperExec" in network.log("east")
    assert not any("Starting Flower SuperExec" in network.log(hospital) for hospital in WARM)


def _base_model_loads(log: str) -> list[int]:
    """The process id of each base-model load a log reports."""
    return [int(line.rsplit("(process ", 1)[1].rstrip(")")) for line in log.splitlines() if "loaded base model" in line]


@pytest.mark.integration
def test_the_run_completes_when_a_hospital_dies_mid_round(network: Network, tiny_bert: Path, tmp_path: Path) -> None:
    # Prepare: the run starts with all three hospitals; hospitals do not evaluate (only training rounds).
    east_log, seen = network.logs["east"], len(network.log("east"))
    run_dir = tmp_path / "run"
    output = (tmp_path / "flwr-run.log").open("w")
    run = subprocess.Popen(_flwr_run(network, tiny_bert, run_dir, **{"federation.fraction-evaluate": 0.0}),
                           env=network.env, cwd=network.folder, stdout=output, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        # Execute: east dies (SuperNode and its ClientApp, no goodbye) once it has taken its round-2 instruction.
        _wait_until(lambda: east_log.read_text()[seen:].count("Receiving: train message") >= 2,
                    "east taking its round-2 instruction", 600, [east_log, tmp_path / "flwr-run.log"])
        os.killpg(network.processes["east"].pid, signal.SIGKILL)
        network.processes["east"].wait()
        returncode = run.wait(timeout=900)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        output.close()
    # Assert: north and south finished round 2 and the run.
    assert returncode == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    rounds = _rounds(run_dir)
    assert [entry["round"] for entry in rounds] == [1, 2]
    assert {name for name, v in rounds[0]["per_hospital"].items() if v["train"]} == set(HOSPITAL_ROWS)
    assert {name for name, v in rounds[1]["per_hospital"].items() if v["train"]} == {"north", "south"}
    assert rounds[1]["aggregated"] is True
    assert any(key.startswith("train:") for key in rounds[1]["left_out"]), rounds[1]["left_out"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["hospitals"]["east"] == {"train_rows": HOSPITAL_ROWS["east"] - round(0.3 * HOSPITAL_ROWS["east"]),
                                            "test_rows": None}  # it never evaluated
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # A new run in the warm processes released the first run's model and loaded the base once more.
    for hospital in WARM:
        log = network.log(f"{hospital}-process")
        assert _base_model_loads(log) == [network.processes[f"{hospital}-process"].pid] * 2
        assert "released the earlier run's model and rows" in log
