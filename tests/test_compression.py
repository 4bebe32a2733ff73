"""Compressed adapter updates: exact where they promise, bounded where they round, nothing lost with error feedback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.compression import INDICES, SCALES, VALUES, CompressionError, decode, encode, encoded_bytes, topk_count


def _adapter(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    start = {"q.lora_A": rng.normal(0, 0.05, (8, 48)).astype(np.float32),
             "q.lora_B": np.zeros((48, 8), np.float32),
             "head.weight": rng.normal(0, 0.02, (3, 48)).astype(np.float32)}
    trained = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in start.items()}
    return start, trained


def test_none_is_the_identity() -> None:
    start, trained = _adapter()
    sent, kept = encode(trained, start, "none")
    assert kept == {}
    for name in trained:
        np.testing.assert_array_equal(decode(sent, start, "none")[name], trained[name])


@pytest.mark.parametrize(("method", "rtol"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_casts_halve_the_bytes_within_their_precision(method: str, rtol: float) -> None:
    start, trained = _adapter()
    sent, _ = encode(trained, None, method)
    assert encoded_bytes(sent) * 2 == encoded_bytes(trained)
    back = decode(sent, start, method)
    for name in trained:
        assert back[name].dtype == np.float32
        np.testing.assert_allclose(back[name], trained[name], rtol=rtol, atol=1e-7)


def test_bfloat16_rounds_to_nearest_and_keeps_special_values() -> None:
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-9, -2.5e38, np.inf, 0.0], dtype=np.float32)
    start = {"t": np.zeros_like(values)}
    back = decode(encode({"t": values}, None, "bfloat16")[0], start, "bfloat16")["t"]
    assert back[0] == 1.0
    assert back[1] == 1.0  # exactly halfway: rounds to the even neighbour
    assert back[2] == np.float32(1.0 + 2**-7)  # above the midpoint: rounds up
    assert np.isclose(back[3], -2.5e38, rtol=2**-8) and np.isinf(back[4]) and back[5] == 0.0


def test_int8_sends_a_quarter_and_errs_at_most_half_a_step_per_entry() -> None:
    start, trained = _adapter()
    sent, _ = encode(trained, start, "int8")
    back = decode(sent, start, "int8")
    assert encoded_bytes(sent) < 0.26 * encoded_bytes(trained)
    for name in trained:
        delta = trained[name] - start[name]
        step = np.abs(delta).max() / 127
        assert np.abs(back[name] - trained[name]).max() <= step / 2 + 1e-7


def test_topk_sends_the_largest_entries_of_each_tensors_update() -> None:
    start, trained = _adapter()
    sent, kept = encode(trained, start, "topk", fraction=0.1)
    back = decode(sent, start, "topk")
    assert sent[INDICES].size == sum(topk_count(v.size, 0.1) for v in start.values())
    assert encoded_bytes(sent) < 0.21 * encoded_bytes(trained)
    for name in trained:
        delta = (trained[name] - start[name]).ravel()
        sent_delta = (back[name] - start[name]).ravel()
        chosen = np.flatnonzero(sent_delta)
        assert chosen.size == topk_count(delta.size, 0.1)
        assert np.abs(kept[name]).max() <= np.abs(delta[chosen]).min()  # nothing left behind is larger than what went
        np.testing.assert_allclose(sent_delta + kept[name].ravel(), delta, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(rounds=st.integers(1, 6), fraction=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_error_feedback_loses_nothing_over_rounds(rounds: int, fraction: float, seed: int) -> None:
    # Every round's true update is either sent or still held by the hospital
    rng = np.random.default_rng(seed)
    shape = (6, 5)
    residual: dict[str, np.ndarray] = {}
    true_total = np.zeros(shape, np.float32)
    sent_total = np.zeros(shape, np.float32)
    for _ in range(rounds):
        start = {"w": rng.normal(size=shape).astype(np.float32)}
        update = rng.normal(size=shape).astype(np.float32)
        sent, residual = encode({"w": start["w"] + update}, start, "topk", fraction=fraction, residual=residual)
        sent_total += decode(sent, start, "topk")["w"] - start["w"]
        true_total += update
    np.testing.assert_allclose(sent_total + residual["w"], true_total, atol=1e-4)


def test_malformed_parts_are_refused_with_the_reason() -> None:
    start, trained = _adapter()
    sent, _ = encode(trained, start, "int8")
    with pytest.raises(CompressionError, match="missing parts"):
        decode({k: v for k, v in sent.items() if k != SCALES}, start, "int8")
    bad = dict(sent)
    bad[SCALES] = np.array([np.nan, 1.0, 1.0], np.float32)
    with pytest.raises(CompressionError, match="finite scales"):
        decode(bad, start, "int8")
    with pytest.raises(CompressionError, match="finite scales"):
        decode({**sent, SCALES: sent[SCALES][:2]}, start, "int8")
    topk, _ = encode(trained, start, "topk", fraction=0.2)
    topk[INDICES] = topk[INDICES] + 10_000
    with pytest.raises(CompressionError, match="top-k indices"):
        decode(topk, start, "topk")
    topk, _ = encode(trained, start, "topk", fraction=0.2)
    topk[INDICES][1] = topk[INDICES][0]
    with pytest.raises(CompressionError, match="top-k indices"):
        decode(topk, start, "topk")
    topk, _ = encode(trained, start, "topk", fraction=0.2)
    topk[VALUES] = topk[VALUES][:-1]
    with pytest.raises(CompressionError, match="top-k indices"):
        decode(topk, start, "topk")
    with pytest.raises(CompressionError, match="must be one of"):
        encode(trained, start, "zip")
    with pytest.raises(CompressionError, match="needs the round's start"):
        encode(trained, None, "topk")
