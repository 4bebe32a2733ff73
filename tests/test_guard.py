"""Bad hospital replies are logged with their id and left out; good ones aggregate as FedAvg."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Error, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from conftest import reply
from fedfm import keys
from fedfm.strategies import GuardedStrategy, update_problems
from fedfm.wire import numpy_to_record

REFERENCE = {"a.lora_A.weight": np.zeros((2, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}


def _update(scale: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, scale, np.float32) for k, v in REFERENCE.items()}


def _reply(node: int, arrays: dict[str, np.ndarray], examples: int = 10):  # type: ignore[no-untyped-def]
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(arrays),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples, keys.HOSPITAL_INDEX: node - 100}),
    })
    return reply(content, node_id=node)


def _guard(min_replies: int = 1) -> GuardedStrategy:
    guard = GuardedStrategy(FedAvg(), min_replies=min_replies)
    guard._reference = REFERENCE  # what configure_train would have recorded
    return guard


def test_update_problems_names_each_problem() -> None:
    assert update_problems(_update(1.0), REFERENCE) == []
    nan = _update(1.0)
    nan["a.lora_B.weight"][0, 0] = np.nan
    assert update_problems(nan, REFERENCE) == ["`a.lora_B.weight` holds NaN or Inf"]
    shaped = {**_update(1.0), "a.lora_A.weight": np.zeros((4, 3), np.float32)}
    assert "has shape (4, 3), expected (2, 3)" in update_problems(shaped, REFERENCE)[0]
    assert "missing 1 tensor" in update_problems({"a.lora_A.weight": REFERENCE["a.lora_A.weight"]}, REFERENCE)[0]


def test_bad_replies_are_left_out_and_logged_with_hospital(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    guard = _guard()
    nan = _update(5.0)
    nan["a.lora_A.weight"][1, 1] = np.inf
    error_reply = reply(RecordDict(), node_id=104)
    error_reply = type(error_reply)(Error(code=0, reason="out of memory"), metadata=error_reply.metadata)
    replies = [
        _reply(100, _update(1.0), examples=10),
        _reply(101, _update(4.0), examples=30),
        _reply(102, nan),
        _reply(103, {"a.lora_A.weight": np.zeros((9, 9), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}),
        error_reply,
    ]
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedfm"):
        arrays, _ = guard.aggregate_train(1, replies)
    # Assert: weighted by examples over the two good hospitals only
    assert arrays is not None
    expected = (1.0 * 10 + 4.0 * 30) / 40
    for value in arrays.values():
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6)
    left = guard.rounds[1].left_out
    assert len(left) == 3
    assert any("hospital 2" in k and "NaN or Inf" in v for k, v in left.items())
    assert any("hospital 3" in k and "has shape" in v for k, v in left.items())
    assert any("node 104" in k and "out of memory" in v for k, v in left.items())
    assert "hospital 2 (node 102) left out of train" in caplog.text
    assert set(guard.rounds[1].train) == {0, 1}


def test_too_few_valid_replies_keep_the_previous_adapter() -> None:
    guard = _guard(min_replies=2)
    nan = _update(1.0)
    nan["a.lora_A.weight"][0, 0] = np.nan
    arrays, metrics = guard.aggregate_train(1, [_reply(100, _update(1.0)), _reply(101, nan)])
    assert arrays is None and metrics is None
    assert guard.rounds[1].train_aggregated is False


def test_identical_updates_aggregate_to_themselves() -> None:
    guard = _guard()
    arrays, _ = guard.aggregate_train(1, [_reply(100 + i, _update(0.25), examples=i + 1) for i in range(4)])
    assert arrays is not None
    for value in arrays.values():
        np.testing.assert_allclose(value.numpy(), 0.25, rtol=1e-6)


def test_each_check_is_a_pure_function_returning_a_reason_or_none() -> None:
    from fedfm.strategies import screening

    assert screening.error_reason("Traceback ...\nMessage: CUDA out of memory") == "error reply: CUDA out of memory"
    assert screening.refusal_reason({keys.NUM_EXAMPLES: 3}) is None
    refused = {keys.DP_REFUSED: 1.0, keys.DP_TARGET_EPSILON: 2.0, keys.DP_EPSILON: 1.9876}
    assert screening.refusal_reason(refused) == "refused to train: its DP budget ε 2.0 is spent (ε 1.988 so far)"
    assert screening.shape_reason(1, {keys.NUM_EXAMPLES: 3}) is None
    assert screening.shape_reason(2, {}) == "reply must hold exactly one ArrayRecord and one MetricRecord"
    assert screening.examples_reason({keys.NUM_EXAMPLES: 0}) == "`num-examples` must be a positive number, got 0"
    assert screening.update_reason(_update(1.0), REFERENCE) is None
    assert "NaN or Inf" in (screening.update_reason({**_update(1.0), "a.lora_B.weight": np.full((3, 2), np.nan)},
                                                   REFERENCE) or "")
    assert screening.evaluate_reason(None) == "reply must hold one MetricRecord with `num-examples`"
    # Norms: relative to the round's median, and only with three updates or more
    assert screening.update_norm(_update(3.0), _update(1.0)) == pytest.approx(np.sqrt(12 * 4.0))
    reasons = screening.norm_reasons([1.0, 1.2, 9.0], limit=5.0)
    assert reasons[:2] == [None, None] and "is 7.5x the round's median 1.2" in (reasons[2] or "")
    assert screening.norm_reasons([1.0, 9.0], limit=5.0) == [None, None]
