"""fedfm's round loop: the steps of Flower's ``Strategy.start``, resumable and with retries.

Flower's loop always starts at round 1 and cannot run a failed round again;
a resumed run starts at round k+1, and a round whose hospitals failed is run
again (``federation.round-retries``, each attempt's train config carrying
``fedfm-attempt``). The loop drives a guarded strategy
(:class:`fedfm.strategies.GuardedStrategy`, whose :meth:`~GuardedStrategy.run`
calls it, as Flower's ``Strategy.start`` is called on the strategy) through
whatever grid it is given: :func:`fedfm.server.serve` gives Flower's grid
wrapped in :class:`fedfm.interrupt.InterruptibleGrid`, so Ctrl-C ends the wait
for replies. It knows nothing of the screening or the recording: it only asks
the strategy for the round's record (``faults``, ``retries``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedfm import keys

logger = logging.getLogger("fedfm")


class RoundFaults(Protocol):
    """What the loop reads and counts in a round's record (the guard's ``RoundRecord``)."""

    faults: int
    retries: int


class RoundStrategy(Protocol):
    """What the loop needs of a strategy: Flower's four round steps, its round records, its quorum."""

    min_replies: int

    def round_record(self, server_round: int) -> RoundFaults: ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None: ...


def run_rounds(
    strategy: RoundStrategy,
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
    """Rounds ``first_round`` to ``num_rounds``: train, aggregate, evaluate, then ``evaluate_fn``.

    A round in which hospitals failed (no reply, or an error) and fewer than
    the strategy's ``min_replies`` valid updates came is run again, up to
    ``retries`` times; then the run stops after the last complete round.
    ``stop_fn(server_round)``, asked after each complete round (after
    ``evaluate_fn``), may stop the run there too by giving a reason (early
    stopping). ``round_config(server_round)`` gives train-config entries that
    change with the round (its local learning rate, ``federation.lr-decay``).
    ``evaluate_initial=False`` skips the round-0 evaluation (a run resumed from
    its round-0 checkpoint has it already).

    Returns
    -------
    tuple
        The final global record, and why the run stopped early (None when every round completed).
    """
    if evaluate_fn is not None and first_round == 1 and evaluate_initial:
        evaluate_fn(0, arrays)
    for server_round in range(first_round, num_rounds + 1):
        record = strategy.round_record(server_round)
        for attempt in range(retries + 1):
            entries = {**(round_config(server_round) if round_config is not None else {}),
                       **({keys.ATTEMPT: attempt} if attempt else {})}
            config = ConfigRecord({**dict(train_config), **entries}) if entries else train_config
            replies = grid.send_and_receive(
                messages=strategy.configure_train(server_round, arrays, config, grid), timeout=timeout
            )
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None or record.faults == 0:
                break
            if attempt < retries:
                record.retries += 1
                logger.warning("round %d: %d hospital(s) failed; running the round again (retry %d of %d)",
                               server_round, record.faults, attempt + 1, retries)
        else:
            return arrays, (
                f"round {server_round}: fewer than {strategy.min_replies} hospitals sent a valid update "
                f"after {retries} retries ({record.faults} failed in the last attempt)"
            )
        if new_arrays is not None:
            arrays = new_arrays
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout
        )
        strategy.aggregate_evaluate(server_round, replies)
        if evaluate_fn is not None:
            evaluate_fn(server_round, arrays)
        reason = stop_fn(server_round) if stop_fn is not None else None
        if reason:
            return arrays, reason
    return arrays, None
