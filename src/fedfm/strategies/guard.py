"""A strategy wrapper that screens replies and records what each hospital sent.

Wrapping (as Flower's DP wrappers do) keeps every strategy, Flower's or a
user's, behind the same checks: a reply with an error, a malformed, mis-shaped
or non-finite adapter, or a missing example count is logged with the
hospital's id and left out of the round; it never reaches the aggregate. The
checks themselves are pure functions that return a reason
(:mod:`fedfm.strategies.screening`); the round loop is
:func:`fedfm.strategies.rounds.run_rounds` (:meth:`GuardedStrategy.run`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedfm import keys
from fedfm.compression import DELTA_METHODS, CompressionError, decode
from fedfm.strategies.plan import ClientPlan, truncate_rank
from fedfm.strategies.rounds import run_rounds
from fedfm.strategies.screening import (
    NO_REPLY,
    error_reason,
    evaluate_reason,
    examples_reason,
    norm_reasons,
    refusal_reason,
    shape_reason,
    update_norm,
    update_reason,
)
from fedfm.wire import numpy_to_record, payload_bytes, record_to_numpy

logger = logging.getLogger("fedfm")


@dataclass
class RoundRecord:
    """What one round exchanged, per hospital (keyed by hospital index)."""

    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)  # by node id: sent before a hospital names itself
    bytes_up: dict[int, int] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    train_aggregated: bool = False
    #: Training replies that passed the screen and went into the aggregate.
    train_replies: int = 0
    #: Hospitals asked to train that sent no reply or an error (the last attempt).
    faults: int = 0
    #: Times the round ran again because too few hospitals replied.
    retries: int = 0


def _metrics_of(content: Any) -> MetricRecord | None:
    records = [r for r in content.values() if isinstance(r, MetricRecord)]
    return records[0] if len(records) == 1 else None


def _common_metrics(replies: list[Message]) -> list[Message]:
    """The replies with only the metrics every one of them reports (Flower refuses to average differing keys).

    A hospital may report a metric the others cannot (an image classifier's AUC needs both classes in the
    hospital's test rows); each hospital's own values are recorded in full before this.
    """
    keys = [set(m.keys()) for m in (_metrics_of(r.content) for r in replies) if m is not None]
    common = set.intersection(*keys) if keys else set()
    for reply in replies:
        for name, record in list(reply.content.items()):
            if isinstance(record, MetricRecord) and set(record.keys()) != common:
                reply.content[name] = MetricRecord({k: v for k, v in record.items() if k in common})
    return replies


def _numbers(metrics: MetricRecord) -> dict[str, float]:
    """A reply's scalar metrics as floats (what the round's line records)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # type: ignore[arg-type]


class GuardedStrategy(Strategy):
    """Screen and record the replies of any Flower strategy.

    Parameters
    ----------
    inner : Strategy
        The strategy that configures rounds and aggregates.
    min_replies : int
        Fewest valid training replies needed to aggregate; below it the round
        keeps the previous global adapter.
    initial : dict of str to ndarray, optional
        The model's full initial adapter. With ``plan_of``, each hospital's
        reply must have the names and shapes its plan sends (e.g. its own
        LoRA rank); without, replies must match the global record sent.
    plan_of : callable, optional
        ``hospital index -> ClientPlan``.
    evaluate_when : callable, optional
        ``server round -> bool``: rounds whose hospitals evaluate (default: all).
    uniform_weights : bool
        Give every hospital the same weight (example count 1) in the aggregate,
        as client-level DP's sensitivity assumes. The recorded metrics keep the
        real counts.
    compression : str
        How hospitals encode their replies (``[compression] method``). Replies
        are counted as sent, then decoded against what this hospital started
        the round from, then screened; the inner strategy sees float32 arrays.
    update_norm_limit : float
        Leave out an update whose change to what its hospital started from is
        more than this many times the round's median change (0: no check).
        Robust to a minority of scaled updates; with two hospitals it can
        never fire (each is within 2x of the median).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        min_replies: int = 1,
        initial: dict[str, Any] | None = None,
        plan_of: Callable[[int], ClientPlan] | None = None,
        evaluate_when: Callable[[int], bool] | None = None,
        uniform_weights: bool = False,
        compression: str = "none",
        update_norm_limit: float = 0.0,
    ) -> None:
        self.inner = inner
        self.update_norm_limit = update_norm_limit
        self._asked: set[int] = set()
        self.compression = compression
        self._sent: dict[int, ArrayRecord] = {}
        self._sent_numpy: dict[int, dict[str, Any]] = {}
        self.uniform_weights = uniform_weights
        self.min_replies = min_replies
        self.rounds: dict[int, RoundRecord] = {}
        self._reference: dict[str, Any] = {}
        self._node_to_hospital: dict[int, int] = {}
        self._initial = initial
        self._plan_of = plan_of
        self._templates: dict[int, dict[str, Any]] = {}
        self._evaluate_when = evaluate_when

    def template(self, index: int) -> dict[str, Any]:
        """Names and shapes hospital ``index`` must send."""
        if self._initial is None or self._plan_of is None:
            return self._reference
        if index not in self._templates:
            self._templates[index] = self._plan_of(index).shared(self._initial)
        return self._templates[index]

    def summary(self) -> None:
        self.inner.summary()

    def state_dict(self) -> dict[str, Any]:
        """Nothing to checkpoint here: what a round exchanged is in ``metrics.jsonl``; node ids change on restart."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :meth:`state_dict`."""

    def round_record(self, server_round: int) -> RoundRecord:
        """What round ``server_round`` exchanged so far (created empty on first use)."""
        return self.rounds.setdefault(server_round, RoundRecord())

    def _hospital(self, node_id: int, metrics: MetricRecord | None) -> int:
        if metrics is not None and keys.HOSPITAL_INDEX in metrics:
            self._node_to_hospital[node_id] = int(metrics[keys.HOSPITAL_INDEX])  # type: ignore[arg-type]
        return self._node_to_hospital.get(node_id, -1)

    def _in_hospital_order(self, replies: list[Message]) -> list[Message]:
        """Replies sorted by hospital, not by arrival: a float sum of three or more updates depends on the order
        of its terms, and a rerun or a resumed run must reach the same global adapter bit for bit."""
        return sorted(replies, key=lambda msg: (self._node_to_hospital.get(msg.metadata.src_node_id, -1),
                                                msg.metadata.src_node_id))

    def hospital_of(self, node_id: int) -> int | None:
        """The hospital index a node reported, once it has replied."""
        return self._node_to_hospital.get(node_id)

    def _name(self, node_id: int) -> str:
        index = self._node_to_hospital.get(node_id)
        return f"hospital {index} (node {node_id})" if index is not None else f"node {node_id}"

    def _record_down(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        record = self.round_record(server_round)
        for msg in messages:
            node = msg.metadata.dst_node_id
            record.bytes_down[node] = record.bytes_down.get(node, 0) + payload_bytes(msg.content)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = record_to_numpy(arrays)
        messages = [self._fit_to_rank(m) for m in self.inner.configure_train(server_round, arrays, config, grid)]
        self._sent_numpy.clear()
        self._sent = {m.metadata.dst_node_id: m.content[keys.ARRAYS] for m in messages  # type: ignore[misc]
                      if isinstance(m.content.get(keys.ARRAYS), ArrayRecord)}
        self._asked = {m.metadata.dst_node_id for m in messages}
        self.round_record(server_round).faults = 0
        return self._record_down(server_round, messages)

    def _start_of(self, node_id: int, index: int) -> dict[str, Any]:
        """The shared tensors hospital ``index`` started this round from, as it computed them."""
        record = self._sent.get(node_id)
        if record is None:
            raise CompressionError("no adapter was sent to this node this round")
        key = id(record)
        if key not in self._sent_numpy:  # the same global record usually goes to every hospital
            self._sent_numpy[key] = record_to_numpy(record)
        sent = self._sent_numpy[key]
        if self._initial is None or self._plan_of is None:
            return sent
        plan = self._plan_of(index)
        return plan.shared(plan.materialize(self._initial, sent)[0])

    def _decode(self, update: dict[str, Any], node_id: int, index: int) -> dict[str, Any]:
        if self.compression in DELTA_METHODS:
            return decode(update, self._start_of(node_id, index), self.compression)
        return decode(update, self.template(index), self.compression)

    def _fit_to_rank(self, msg: Message) -> Message:
        """Send a hospital of smaller LoRA rank only its components, once its replies have named it."""
        index = self._node_to_hospital.get(msg.metadata.dst_node_id)
        if index is None or self._plan_of is None:
            return msg
        rank = self._plan_of(index).rank
        content = msg.content
        if rank is None or not isinstance(content.get(keys.ARRAYS), ArrayRecord):
            return msg
        arrays = truncate_rank(record_to_numpy(content[keys.ARRAYS]), rank)  # type: ignore[arg-type]
        fitted = RecordDict({name: record for name, record in content.items() if name != keys.ARRAYS})
        fitted[keys.ARRAYS] = numpy_to_record(arrays)
        return Message(content=fitted, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._evaluate_when is not None and not self._evaluate_when(server_round):
            return []
        return self._record_down(server_round, self.inner.configure_evaluate(server_round, arrays, config, grid))

    def _leave_out(self, record: RoundRecord, node_id: int, phase: str, reason: str) -> None:
        name = self._name(node_id)
        attempt = f" (retry {record.retries})" if record.retries and phase == "train" else ""
        record.left_out[f"{phase}:{name}{attempt}"] = reason
        logger.warning("%s left out of %s: %s", name, phase, reason)

    def _screen_train(self, msg: Message, record: RoundRecord) -> bool:
        """Whether a training reply enters the aggregate; records what it reported and sent, logs why not."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            record.faults += 1
            self._leave_out(record, node, "train", error_reason(msg.error.reason))
            return False
        content = msg.content
        metrics = _metrics_of(content)
        index = self._hospital(node, metrics)
        refused = refusal_reason(metrics)
        if refused is not None and metrics is not None:
            # Its ledger still counts: the round's metrics line shows the ε it stopped at.
            record.train[index] = _numbers(metrics)
            record.bytes_up[index] = record.bytes_up.get(index, 0) + payload_bytes(content)
            self._leave_out(record, node, "train", refused)
            return False
        arrays = [r for r in content.values() if isinstance(r, ArrayRecord)]
        reason = shape_reason(len(arrays), metrics)
        if reason is None and metrics is not None:
            reason = examples_reason(metrics)
        if reason is not None or metrics is None:
            self._leave_out(record, node, "train", reason or "")
            return False
        try:
            update = record_to_numpy(arrays[0])
        except Exception as err:  # noqa: BLE001  # a corrupt buffer must not crash the server
            self._leave_out(record, node, "train", f"unreadable arrays: {err}")
            return False
        sent_bytes = payload_bytes(content)
        if self.compression != "none":
            try:
                update = self._decode(update, node, index)
            except CompressionError as err:
                self._leave_out(record, node, "train", f"undecodable {self.compression} update: {err}")
                return False
        reason = update_reason(update, self.template(index))
        if reason is not None:
            self._leave_out(record, node, "train", reason)
            return False
        if self.compression != "none":
            # The inner strategy aggregates the decoded float32 tensors.
            name = next(k for k, r in content.items() if isinstance(r, ArrayRecord))
            content[name] = numpy_to_record(update)
        record.bytes_up[index] = record.bytes_up.get(index, 0) + sent_bytes
        record.train[index] = _numbers(metrics)
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.round_record(server_round)
        replies = list(replies)
        for node in sorted(self._asked - {msg.metadata.src_node_id for msg in replies}):
            record.faults += 1
            self._leave_out(record, node, "train", NO_REPLY)
        valid = [msg for msg in replies if self._screen_train(msg, record)]
        valid = self._screen_norms(valid, record)
        if len(valid) < self.min_replies:
            logger.warning(
                "round %d: %d valid training replies, fewer than the %d required; the global adapter stays as it was",
                server_round, len(valid), self.min_replies,
            )
            return None, None
        if self.uniform_weights:
            for msg in valid:
                _metrics_of(msg.content)[keys.NUM_EXAMPLES] = 1  # type: ignore[index]
        record.train_replies = len(valid)
        arrays, metrics = self.inner.aggregate_train(server_round, self._in_hospital_order(valid))
        record.train_aggregated = arrays is not None
        return self._keep_dtypes(arrays), metrics

    def _screen_norms(self, valid: list[Message], record: RoundRecord) -> list[Message]:
        """Leave out updates whose change is far larger than the round's median change."""
        if self.update_norm_limit <= 0 or len(valid) < 3:
            return valid
        norms = []
        for msg in valid:
            node = msg.metadata.src_node_id
            update = record_to_numpy(next(r for r in msg.content.values() if isinstance(r, ArrayRecord)))
            norms.append(update_norm(update, self._start_of(node, self._node_to_hospital.get(node, -1))))
        kept = []
        for msg, reason in zip(valid, norm_reasons(norms, self.update_norm_limit), strict=True):
            if reason is None:
                kept.append(msg)
                continue
            record.train.pop(self._node_to_hospital.get(msg.metadata.src_node_id, -1), None)
            self._leave_out(record, msg.metadata.src_node_id, "train", reason)
        return kept

    def run(self, grid: Grid, arrays: ArrayRecord, **loop: Any) -> tuple[ArrayRecord, str | None]:
        """Rounds through this guard, as Flower's ``Strategy.start`` runs on a strategy.

        ``loop`` holds :func:`fedfm.strategies.rounds.run_rounds`'s keyword
        arguments (``first_round``, ``num_rounds``, ``timeout``, ``retries``, the
        configs and hooks), documented there once.

        Returns
        -------
        tuple
            The final global record, and why the run stopped early (None when every round completed).
        """
        return run_rounds(self, grid, arrays, **loop)

    def _keep_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The global keeps the dtypes it was sent in (Flower's FedOpt steps promote float32 to float64)."""
        if arrays is None:
            return None
        values = record_to_numpy(arrays)
        drifted = {n for n, v in values.items() if n in self._reference and v.dtype != self._reference[n].dtype}
        if not drifted:
            return arrays
        return numpy_to_record({n: v.astype(self._reference[n].dtype) if n in drifted else v for n, v in values.items()})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        record = self.round_record(server_round)
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._leave_out(record, node, "evaluate", error_reason(msg.error.reason))
                continue
            metrics = _metrics_of(msg.content)
            reason = evaluate_reason(metrics)
            if reason is not None or metrics is None:
                self._leave_out(record, node, "evaluate", reason or "")
                continue
            index = self._hospital(node, metrics)
            record.bytes_up[index] = record.bytes_up.get(index, 0) + payload_bytes(msg.content)
            record.evaluate[index] = _numbers(metrics)
            valid.append(msg)
        if not valid:
            return None
        return self.inner.aggregate_evaluate(server_round, _common_metrics(self._in_hospital_order(valid)))
