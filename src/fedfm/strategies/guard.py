"""A strategy wrapper that screens replies and records what each hospital sent.

Wrapping (as Flower's DP wrappers do) keeps every strategy, Flower's or a
user's, behind the same checks: a reply with an error, a malformed, mis-shaped
or non-finite adapter, or a missing example count is logged with the
hospital's id and left out of the round; it never reaches the aggregate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedfm import keys
from fedfm.compression import DELTA_METHODS, CompressionError, decode
from fedfm.strategies.plan import ClientPlan, truncate_rank
from fedfm.strategies.validation import update_problems
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


def _short(reason: str | None, limit: int = 300) -> str:
    """The gist of an error reply: the exception's own message, without the traceback a simulation wraps it in."""
    text = str(reason)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.strip().strip("'>").splitlines() if line.strip()]
    text = lines[-1] if lines else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metrics_of(content: Any) -> MetricRecord | None:
    records = [r for r in content.values() if isinstance(r, MetricRecord)]
    return records[0] if len(records) == 1 else None


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

    def _round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord())

    def _hospital(self, node_id: int, metrics: MetricRecord | None) -> int:
        if metrics is not None and keys.HOSPITAL_INDEX in metrics:
            self._node_to_hospital[node_id] = int(metrics[keys.HOSPITAL_INDEX])  # type: ignore[arg-type]
        return self._node_to_hospital.get(node_id, -1)

    def hospital_of(self, node_id: int) -> int | None:
        """The hospital index a node reported, once it has replied."""
        return self._node_to_hospital.get(node_id)

    def _name(self, node_id: int) -> str:
        index = self._node_to_hospital.get(node_id)
        return f"hospital {index} (node {node_id})" if index is not None else f"node {node_id}"

    def _record_down(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        record = self._round(server_round)
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
        self._round(server_round).faults = 0
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
        node = msg.metadata.src_node_id
        if msg.has_error():
            record.faults += 1
            self._leave_out(record, node, "train", f"error reply: {_short(msg.error.reason)}")
            return False
        content = msg.content
        metrics = _metrics_of(content)
        index = self._hospital(node, metrics)
        if metrics is not None and metrics.get(keys.DP_REFUSED):
            # Its ledger still counts: the round's metrics line shows the ε it stopped at.
            record.train[index] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # type: ignore[arg-type]
            record.bytes_up[index] = record.bytes_up.get(index, 0) + payload_bytes(content)
            self._leave_out(
                record, node, "train",
                f"refused to train: its DP budget ε {metrics.get(keys.DP_TARGET_EPSILON)} is spent "
                f"(ε {float(metrics.get(keys.DP_EPSILON, 0.0)):.3f} so far)",  # type: ignore[arg-type]
            )
            return False
        arrays = [r for r in content.values() if isinstance(r, ArrayRecord)]
        if len(arrays) != 1 or metrics is None:
            self._leave_out(record, node, "train", "reply must hold exactly one ArrayRecord and one MetricRecord")
            return False
        examples = metrics.get(keys.NUM_EXAMPLES)
        if not isinstance(examples, (int, float)) or examples <= 0:
            self._leave_out(record, node, "train", f"`{keys.NUM_EXAMPLES}` must be a positive number, got {examples!r}")
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
        problems = update_problems(update, self.template(index))
        if problems:
            self._leave_out(record, node, "train", "; ".join(problems))
            return False
        if self.compression != "none":
            # The inner strategy aggregates the decoded float32 tensors.
            name = next(k for k, r in content.items() if isinstance(r, ArrayRecord))
            content[name] = numpy_to_record(update)
        record.bytes_up[index] = record.bytes_up.get(index, 0) + sent_bytes
        record.train[index] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # type: ignore[arg-type]
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self._round(server_round)
        replies = list(replies)
        for node in sorted(self._asked - {msg.metadata.src_node_id for msg in replies}):
            record.faults += 1
            self._leave_out(record, node, "train", "no reply within federation.round-timeout (down, disconnected or too slow)")
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
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        record.train_aggregated = arrays is not None
        return self._keep_dtypes(arrays), metrics

    def _screen_norms(self, valid: list[Message], record: RoundRecord) -> list[Message]:
        """Leave out updates whose change is far larger than the round's median change."""
        if self.update_norm_limit <= 0 or len(valid) < 3:
            return valid
        norms = []
        for msg in valid:
            node = msg.metadata.src_node_id
            index = self._node_to_hospital.get(node, -1)
            update = record_to_numpy(next(r for r in msg.content.values() if isinstance(r, ArrayRecord)))
            start = self._start_of(node, index)
            norms.append(float(np.sqrt(sum(
                np.sum((update[k].astype(np.float64) - start[k].astype(np.float64)) ** 2) for k in update
            ))))
        median = float(np.median(norms))
        if median <= 0:
            return valid
        kept = []
        for msg, norm in zip(valid, norms, strict=True):
            if norm > self.update_norm_limit * median:
                index = self._node_to_hospital.get(msg.metadata.src_node_id, -1)
                record.train.pop(index, None)
                self._leave_out(
                    record, msg.metadata.src_node_id, "train",
                    f"update norm {norm:.3g} is {norm / median:.1f}x the round's median {median:.3g} "
                    f"(federation.update-norm-limit {self.update_norm_limit:g})",
                )
            else:
                kept.append(msg)
        return kept

    def run(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        *,
        first_round: int,
        num_rounds: int,
        timeout: float,
        retries: int,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
        stop_fn: Callable[[int], str | None] | None = None,
        round_config: Callable[[int], dict[str, Any]] | None = None,
        evaluate_initial: bool = True,
    ) -> tuple[ArrayRecord, str | None]:
        """Rounds ``first_round`` to ``num_rounds`` (Flower's ``start`` loop, resumable, with retries).

        A round in which hospitals failed (no reply, or an error) and fewer
        than ``min_replies`` valid updates came is run again, up to
        ``retries`` times; then the run stops after the last complete round.
        ``stop_fn(server_round)``, asked after each complete round (after
        ``evaluate_fn``), may stop the run there too by giving a reason (early stopping).
        ``round_config(server_round)`` gives train-config entries that change with
        the round (its local learning rate, ``federation.lr-decay``).
        ``evaluate_initial=False`` skips the round-0 evaluation (a run resumed
        from its round-0 checkpoint has it already).

        Returns
        -------
        tuple
            The final global record, and why the run stopped early (None when
            every round completed).
        """
        if evaluate_fn is not None and first_round == 1 and evaluate_initial:
            evaluate_fn(0, arrays)
        for server_round in range(first_round, num_rounds + 1):
            record = self._round(server_round)
            for attempt in range(retries + 1):
                entries = {**(round_config(server_round) if round_config is not None else {}),
                           **({keys.ATTEMPT: attempt} if attempt else {})}
                config = ConfigRecord({**dict(train_config), **entries}) if entries else train_config
                replies = grid.send_and_receive(
                    messages=self.configure_train(server_round, arrays, config, grid), timeout=timeout
                )
                new_arrays, _ = self.aggregate_train(server_round, replies)
                if new_arrays is not None or record.faults == 0:
                    break
                if attempt < retries:
                    record.retries += 1
                    logger.warning("round %d: %d hospital(s) failed; running the round again (retry %d of %d)",
                                   server_round, record.faults, attempt + 1, retries)
            else:
                return arrays, (
                    f"round {server_round}: fewer than {self.min_replies} hospitals sent a valid update "
                    f"after {retries} retries ({record.faults} failed in the last attempt)"
                )
            if new_arrays is not None:
                arrays = new_arrays
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout
            )
            self.aggregate_evaluate(server_round, replies)
            if evaluate_fn is not None:
                evaluate_fn(server_round, arrays)
            reason = stop_fn(server_round) if stop_fn is not None else None
            if reason:
                return arrays, reason
        return arrays, None

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
        record = self._round(server_round)
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._leave_out(record, node, "evaluate", f"error reply: {_short(msg.error.reason)}")
                continue
            metrics = _metrics_of(msg.content)
            if metrics is None or not isinstance(metrics.get(keys.NUM_EXAMPLES), (int, float)):
                self._leave_out(record, node, "evaluate", "reply must hold one MetricRecord with `num-examples`")
                continue
            index = self._hospital(node, metrics)
            record.bytes_up[index] = record.bytes_up.get(index, 0) + payload_bytes(msg.content)
            record.evaluate[index] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # type: ignore[arg-type]
            valid.append(msg)
        if not valid:
            return None
        return self.inner.aggregate_evaluate(server_round, valid)
