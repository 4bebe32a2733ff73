"""What a run writes, typed: a round's line of ``metrics.jsonl`` and ``summary.json``.

Each record is a frozen dataclass with ``to_json()`` (the exact JSON the run
directory holds: the same keys and nesting, written with ``sort_keys=True``)
and ``from_json()`` (which also reads lines and summaries that lack newer
keys, or were written by hand: a missing key takes its field's default). The
server builds them, :class:`fedfm.rundir.RunDirectory` writes them, and every
reader (``fedfm report``, ``fedfm privacy-report``, the model card,
:class:`fedfm.runner.RunResult`) reads them through :func:`fedfm.rundir.read_run`.
Field names follow the JSON keys, except ``global_`` (``global`` is a Python keyword).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Audit", "AuditScore", "ClientLevel", "FinalScores", "HospitalEntry", "HospitalPrivacy", "HospitalRows", "Metrics",
    "PrivacySummary", "RoundEntry", "RoundPrivacy", "RoundScores", "RunSummary", "Selection", "SentByHospital",
]

#: Metric name to value, as Flower's MetricRecord carries them (``accuracy``, ``loss``, ``num-examples``, ...).
Metrics = dict[str, float]


def _metrics(value: Any) -> Metrics:
    return dict(value) if isinstance(value, Mapping) else {}


def _by_name(value: Any) -> dict[str, Metrics]:
    return {str(k): _metrics(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _table(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# ------------------------------------------------------------------------------------------------ metrics.jsonl


@dataclass(frozen=True)
class HospitalEntry:
    """One hospital within a round: its replies' metrics and the bytes it sent and was sent.

    Attributes
    ----------
    train, evaluate : dict of str to float
        The metrics of its training and evaluation replies (empty when it sent none).
    bytes_up, bytes_down : int
        Bytes of its replies, and of the instructions sent to it, in this round.
    """

    train: Metrics = field(default_factory=dict)
    evaluate: Metrics = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"train": self.train, "evaluate": self.evaluate, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HospitalEntry:
        return cls(_metrics(data.get("train")), _metrics(data.get("evaluate")),
                   int(data.get("bytes_up", 0)), int(data.get("bytes_down", 0)))


@dataclass(frozen=True)
class ClientLevel:
    """The server's client-level DP ledger after a round (Flower's DP wrappers)."""

    #: ε when neighbouring federations differ by one hospital added or removed (the guarantee stated).
    epsilon: float
    delta: float
    releases: int
    noise_multiplier: float
    sample_rate: float
    clipping_norm: float
    #: ε when they differ by one hospital's data replaced (twice the sensitivity).
    epsilon_replace_one: float = float("nan")
    neighbouring: str = "add-or-remove-one-hospital"

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "releases": self.releases,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "clipping_norm": self.clipping_norm, "epsilon_replace_one": self.epsilon_replace_one,
                "neighbouring": self.neighbouring}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientLevel:
        nan = float("nan")
        return cls(data.get("epsilon", nan), data.get("delta", nan), data.get("releases", 0),
                   data.get("noise_multiplier", nan), data.get("sample_rate", nan), data.get("clipping_norm", nan),
                   data.get("epsilon_replace_one", nan), data.get("neighbouring", "add-or-remove-one-hospital"))


@dataclass(frozen=True)
class RoundPrivacy:
    """A round's privacy ledger: ε each hospital reported (DP-SGD) and the client-level ledger."""

    sample_level_epsilon: dict[str, float] = field(default_factory=dict)
    client_level: ClientLevel | None = None

    def __bool__(self) -> bool:
        return bool(self.sample_level_epsilon) or self.client_level is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sample_level_epsilon:
            out["sample_level_epsilon"] = self.sample_level_epsilon
        if self.client_level is not None:
            out["client_level"] = self.client_level.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundPrivacy:
        level = data.get("client_level")
        return cls(dict(_table(data.get("sample_level_epsilon"))),
                   ClientLevel.from_json(level) if isinstance(level, Mapping) else None)


@dataclass(frozen=True)
class RoundEntry:
    """One line of ``metrics.jsonl``: a finished round.

    Attributes
    ----------
    round : int
        The server round.
    global_ : dict of str to float
        The global adapter's metrics: central evaluation, else the hospitals' weighted mean (JSON ``global``).
    federated : dict of str to float
        The hospitals' example-weighted mean on their local test splits.
    validation : dict of str to float
        The hospitals' weighted validation scores (written only when there are any).
    per_hospital : dict of str to HospitalEntry
        By hospital name.
    bytes_up, bytes_down : int
        All hospitals' bytes in this round.
    aggregated : bool
        Whether the round's training replies were aggregated.
    left_out : dict of str to str
        Replies left out of the round, with the reason.
    retries : int
        Attempts of the round that failed before this one.
    seconds : float
        Wall time of the round.
    privacy : RoundPrivacy
        The round's privacy ledger (written only when there is one).
    """

    round: int
    global_: Metrics = field(default_factory=dict)
    federated: Metrics = field(default_factory=dict)
    validation: Metrics = field(default_factory=dict)
    per_hospital: dict[str, HospitalEntry] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    aggregated: bool = True
    left_out: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    seconds: float = 0.0
    privacy: RoundPrivacy = field(default_factory=RoundPrivacy)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "global": self.global_,
            "federated": self.federated,
            "per_hospital": {name: h.to_json() for name, h in self.per_hospital.items()},
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "aggregated": self.aggregated,
            "left_out": self.left_out,
            "retries": self.retries,
            "seconds": self.seconds,
        }
        if self.validation:
            out["validation"] = self.validation
        if self.privacy:
            out["privacy"] = self.privacy.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundEntry:
        """Read a line; ``round`` is required (``KeyError``, ``TypeError`` or ``ValueError`` without one)."""
        return cls(
            round=int(data["round"]),
            global_=_metrics(data.get("global")),
            federated=_metrics(data.get("federated")),
            validation=_metrics(data.get("validation")),
            per_hospital={str(k): HospitalEntry.from_json(v) for k, v in _table(data.get("per_hospital")).items()},
            bytes_up=int(data.get("bytes_up", 0)),
            bytes_down=int(data.get("bytes_down", 0)),
            aggregated=bool(data.get("aggregated", True)),
            left_out=dict(_table(data.get("left_out"))),
            retries=int(data.get("retries", 0)),
            seconds=data.get("seconds", 0.0),
            privacy=RoundPrivacy.from_json(_table(data.get("privacy"))),
        )

    def hospital(self, name: str) -> HospitalEntry:
        """``name``'s entry in this round (an empty one if it took no part)."""
        return self.per_hospital.get(name) or HospitalEntry()


# ------------------------------------------------------------------------------------------------- summary.json


@dataclass(frozen=True)
class RoundScores:
    """A round's test scores, as the summary shows them for the best and the last round."""

    round: int
    validation: Metrics = field(default_factory=dict)
    global_: Metrics = field(default_factory=dict)
    federated: Metrics = field(default_factory=dict)
    per_hospital: dict[str, Metrics] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "validation": self.validation, "global": self.global_,
                "federated": self.federated, "per_hospital": self.per_hospital}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundScores:
        return cls(int(data.get("round", 0)), _metrics(data.get("validation")), _metrics(data.get("global")),
                   _metrics(data.get("federated")), _by_name(data.get("per_hospital")))


@dataclass(frozen=True)
class Selection:
    """Which round was exported and why (``federation.select-best``), the best and last rounds side by side."""

    select_best: str = "last"
    metric: str = "loss"
    patience: int = 0
    best_round: int | None = None
    best_validation: float | None = None
    exported_round: int = 0
    validation_by_round: dict[str, float | None] = field(default_factory=dict)
    best: RoundScores | None = None
    last: RoundScores | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "select_best": self.select_best, "metric": self.metric, "patience": self.patience,
            "best_round": self.best_round, "best_validation": self.best_validation,
            "exported_round": self.exported_round, "validation_by_round": self.validation_by_round,
            "best": self.best.to_json() if self.best is not None else None,
            "last": self.last.to_json() if self.last is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selection:
        best, last = data.get("best"), data.get("last")
        return cls(
            select_best=data.get("select_best", "last"), metric=data.get("metric", "loss"),
            patience=data.get("patience", 0), best_round=data.get("best_round"),
            best_validation=data.get("best_validation"), exported_round=data.get("exported_round", 0),
            validation_by_round=dict(_table(data.get("validation_by_round"))),
            best=RoundScores.from_json(best) if isinstance(best, Mapping) else None,
            last=RoundScores.from_json(last) if isinstance(last, Mapping) else None,
        )


@dataclass(frozen=True)
class FinalScores:
    """The exported adapter's scores after the last round.

    Attributes
    ----------
    global_ : dict of str to float
        On the global test set (or the hospitals' weighted mean without central evaluation).
    federated : dict of str to float
        The hospitals' weighted mean on their local test splits.
    per_hospital : dict of str to dict
        Each hospital's local test scores.
    personalized : dict of str to dict
        Each hospital's own model on its local test rows: a local fine-tune of the
        exported adapter (``federation.personalize-epochs``), else the strategy's kept
        parts (FedSA-LoRA's B); empty for neither.
    personalized_by : str or None
        How ``personalized`` was made.
    """

    global_: Metrics = field(default_factory=dict)
    federated: Metrics = field(default_factory=dict)
    per_hospital: dict[str, Metrics] = field(default_factory=dict)
    personalized: dict[str, Metrics] = field(default_factory=dict)
    personalized_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"global": self.global_, "federated": self.federated, "per_hospital": self.per_hospital,
                "personalized": self.personalized, "personalized_by": self.personalized_by}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinalScores:
        return cls(_metrics(data.get("global")), _metrics(data.get("federated")), _by_name(data.get("per_hospital")),
                   _by_name(data.get("personalized")), data.get("personalized_by"))


@dataclass(frozen=True)
class HospitalRows:
    """A hospital's row counts: the federation's, or in a deployment what its replies reported (None: none yet)."""

    train_rows: int | None = None
    test_rows: int | None = None
    validation_rows: int | None = None  # written only when the hospital has a validation split

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train_rows": self.train_rows, "test_rows": self.test_rows}
        if self.validation_rows is not None:
            out["validation_rows"] = self.validation_rows
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HospitalRows:
        return cls(data.get("train_rows"), data.get("test_rows"), data.get("validation_rows"))


@dataclass(frozen=True)
class SentByHospital:
    """What left a hospital over the run: the tensor names its replies had to hold, and its bytes up."""

    tensors: tuple[str, ...] = ()
    bytes_up: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"tensors": list(self.tensors), "bytes_up": self.bytes_up}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SentByHospital:
        return cls(tuple(data.get("tensors") or ()), int(data.get("bytes_up", 0)))


@dataclass(frozen=True)
class HospitalPrivacy:
    """A hospital's DP-SGD ledger as it last reported it, and the rounds it trained in and refused."""

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds_trained: tuple[int, ...] = ()
    rounds_refused: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
                "rounds_trained": list(self.rounds_trained), "rounds_refused": list(self.rounds_refused)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HospitalPrivacy:
        nan = float("nan")
        return cls(data.get("epsilon", nan), data.get("delta", nan), data.get("target_epsilon", nan),
                   data.get("noise_multiplier", nan), data.get("sample_rate", nan), data.get("steps", 0),
                   tuple(data.get("rounds_trained") or ()), tuple(data.get("rounds_refused") or ()))


@dataclass(frozen=True)
class AuditScore:
    """One hospital's membership-inference result on its own rows."""

    auc: float
    members: int
    nonmembers: int

    def to_json(self) -> dict[str, Any]:
        return {"auc": self.auc, "members": self.members, "nonmembers": self.nonmembers}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditScore:
        return cls(data.get("auc", float("nan")), data.get("members", 0), data.get("nonmembers", 0))


@dataclass(frozen=True)
class Audit:
    """The privacy audit after the last round (``privacy.audit``)."""

    attack: str
    hospitals: dict[str, AuditScore] = field(default_factory=dict)
    mean_auc: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "hospitals": {k: v.to_json() for k, v in self.hospitals.items()},
                "mean_auc": self.mean_auc}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Audit:
        return cls(data.get("attack", ""), {k: AuditScore.from_json(v) for k, v in _table(data.get("hospitals")).items()},
                   data.get("mean_auc"))


@dataclass(frozen=True)
class PrivacySummary:
    """The run's privacy settings and ledgers."""

    mode: str = "none"
    hospitals: dict[str, HospitalPrivacy] = field(default_factory=dict)
    client_dp: str = "none"
    secure_aggregation: bool = False
    #: SecAgg+: how many different adapters the server's strategy was handed per round (1: only the sum).
    server_saw_distinct_updates: dict[int, int] | None = None
    client_level: ClientLevel | None = None
    audit: Audit | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "hospitals": {k: v.to_json() for k, v in self.hospitals.items()},
            "client_dp": self.client_dp, "secure_aggregation": self.secure_aggregation,
            "server_saw_distinct_updates": self.server_saw_distinct_updates,
            "client_level": self.client_level.to_json() if self.client_level is not None else None,
            "audit": self.audit.to_json() if self.audit is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacySummary:
        level, audit, distinct = data.get("client_level"), data.get("audit"), data.get("server_saw_distinct_updates")
        return cls(
            mode=data.get("mode", "none"),
            hospitals={k: HospitalPrivacy.from_json(v) for k, v in _table(data.get("hospitals")).items()},
            client_dp=data.get("client_dp", "none"), secure_aggregation=bool(data.get("secure_aggregation", False)),
            # JSON keys are strings; the rounds are numbers again (so they sort as numbers when written).
            server_saw_distinct_updates={int(k): int(v) for k, v in distinct.items()} if isinstance(distinct, Mapping) else None,
            client_level=ClientLevel.from_json(level) if isinstance(level, Mapping) else None,
            audit=Audit.from_json(audit) if isinstance(audit, Mapping) else None,
        )


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: what a finished run produced.

    Attributes
    ----------
    rounds : int
        Rounds recorded in ``metrics.jsonl``.
    stopped : str or None
        Why the run stopped before ``federation.num-rounds`` (None: it did not).
    early_stopped : bool
        Whether that was early stopping (``federation.patience``), not a failure.
    best_round : int or None
        The best round by validation (None: no round was validated).
    selection : Selection
        Which round was exported and why.
    resumed_from : int or None
        The round a resumed run continued after.
    initial_global : dict or None
        The starting adapter's global metrics (JSON ``initial.global``).
    final : FinalScores
        The exported adapter's scores.
    hospitals : dict of str to HospitalRows
        Each hospital's row counts.
    global_test_rows : int
        Rows of the global test set.
    central_evaluation : bool
        Without it, ``final.global_`` is the hospitals' weighted mean on their local test splits.
    bytes_up, bytes_down : int
        All bytes of the run (JSON ``bytes.up``, ``bytes.down``).
    sent_by_hospital : dict of str to SentByHospital
        What left each hospital.
    adapter_parameters, base_parameters, adapter_tensors, adapter_bytes : int
        Sizes of the adapter and the base model.
    personalized : bool
        Whether the strategy keeps parts at each hospital (FedSA-LoRA's B).
    privacy : PrivacySummary
        Privacy settings, ledgers and audit.
    wall_seconds : float
        The run's wall time, earlier sessions of a resumed run included.
    model, dataset, strategy, compression : str
        The run's main settings.
    """

    rounds: int = 0
    stopped: str | None = None
    early_stopped: bool = False
    best_round: int | None = None
    selection: Selection = field(default_factory=Selection)
    resumed_from: int | None = None
    initial_global: Metrics | None = None
    final: FinalScores = field(default_factory=FinalScores)
    hospitals: dict[str, HospitalRows] = field(default_factory=dict)
    global_test_rows: int | None = None
    central_evaluation: bool = True
    bytes_up: int = 0
    bytes_down: int = 0
    sent_by_hospital: dict[str, SentByHospital] = field(default_factory=dict)
    adapter_parameters: int | None = None
    base_parameters: int | None = None
    adapter_tensors: int | None = None
    adapter_bytes: int | None = None
    personalized: bool = False
    privacy: PrivacySummary = field(default_factory=PrivacySummary)
    wall_seconds: float | None = None
    model: str | None = None
    dataset: str | None = None
    strategy: str | None = None
    compression: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "stopped": self.stopped,
            "early_stopped": self.early_stopped,
            "best_round": self.best_round,
            "selection": self.selection.to_json(),
            "resumed_from": self.resumed_from,
            "initial": {"global": self.initial_global},
            "final": self.final.to_json(),
            "hospitals": {k: v.to_json() for k, v in self.hospitals.items()},
            "global_test_rows": self.global_test_rows,
            "central_evaluation": self.central_evaluation,
            "bytes": {"up": self.bytes_up, "down": self.bytes_down},
            "sent_by_hospital": {k: v.to_json() for k, v in self.sent_by_hospital.items()},
            "adapter_parameters": self.adapter_parameters,
            "base_parameters": self.base_parameters,
            "adapter_tensors": self.adapter_tensors,
            "adapter_bytes": self.adapter_bytes,
            "personalized": self.personalized,
            "privacy": self.privacy.to_json(),
            "wall_seconds": self.wall_seconds,
            "model": self.model,
            "dataset": self.dataset,
            "strategy": self.strategy,
            "compression": self.compression,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        size = _table(data.get("bytes"))
        initial = _table(data.get("initial")).get("global")
        return cls(
            rounds=int(data.get("rounds", 0)),
            stopped=data.get("stopped"),
            early_stopped=bool(data.get("early_stopped", False)),
            best_round=data.get("best_round"),
            selection=Selection.from_json(_table(data.get("selection"))),
            resumed_from=data.get("resumed_from"),
            initial_global=_metrics(initial) if isinstance(initial, Mapping) else None,
            final=FinalScores.from_json(_table(data.get("final"))),
            hospitals={k: HospitalRows.from_json(v) for k, v in _table(data.get("hospitals")).items()},
            global_test_rows=data.get("global_test_rows"),
            central_evaluation=bool(data.get("central_evaluation", True)),
            bytes_up=int(size.get("up", 0)),
            bytes_down=int(size.get("down", 0)),
            sent_by_hospital={k: SentByHospital.from_json(v) for k, v in _table(data.get("sent_by_hospital")).items()},
            adapter_parameters=data.get("adapter_parameters"),
            base_parameters=data.get("base_parameters"),
            adapter_tensors=data.get("adapter_tensors"),
            adapter_bytes=data.get("adapter_bytes"),
            personalized=bool(data.get("personalized", False)),
            privacy=PrivacySummary.from_json(_table(data.get("privacy"))),
            wall_seconds=data.get("wall_seconds"),
            model=data.get("model"),
            dataset=data.get("dataset"),
            strategy=data.get("strategy"),
            compression=data.get("compression"),
        )
