"""The aggregation maths of fedfm's strategies, as pure numpy functions (no Flower, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.strategies import ClientPlan, fedsa_lora, ffa_lora, flora, hetlora, weighted_mean
from fedfm.strategies.plan import lora_modules, mask_rank, pad_rank, truncate_rank

M = "base_model.model.enc.layer.0.query"
A, B, HEAD = M + ".lora_A.weight", M + ".lora_B.weight", "base_model.model.classifier.modules_to_save.weight"
D_IN, D_OUT, R = 6, 5, 4


def _adapter(rng: np.random.Generator, rank: int = R) -> dict[str, np.ndarray]:
    return {
        A: rng.normal(size=(rank, D_IN)).astype(np.float32),
        B: rng.normal(size=(D_OUT, rank)).astype(np.float32),
        HEAD: rng.normal(size=(3, D_OUT)).astype(np.float32),
    }


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hospitals=st.integers(1, 6))
def test_identical_adapters_aggregate_to_themselves(seed: int, hospitals: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    same = _adapter(rng)
    weights = rng.integers(1, 100, size=hospitals).tolist()
    # Execute
    results = [
        weighted_mean([same] * hospitals, weights),
        ffa_lora.aggregate([same] * hospitals, weights),
        fedsa_lora.aggregate([same] * hospitals, weights),
        hetlora.aggregate([same] * hospitals, weights, rank=R, weighting="sparsity"),
        hetlora.aggregate([same] * hospitals, weights, rank=R, weighting="examples"),
    ]
    # Assert
    for result in results:
        for name, value in same.items():
            np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6)


def test_weights_follow_example_counts() -> None:
    one = {A: np.zeros((2, 2), np.float32)}
    four = {A: np.full((2, 2), 4.0, np.float32)}
    np.testing.assert_allclose(weighted_mean([one, four], [30, 10])[A], 1.0)
    np.testing.assert_allclose(weighted_mean([one, four], [10, 30])[A], 3.0)
    with pytest.raises(ValueError):
        weighted_mean([one], [0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ffa_lora_averaging_is_exact_because_a_is_shared(seed: int) -> None:
    # Prepare: every hospital's A is the same fixed initialisation; only B (and the head) differ.
    rng = np.random.default_rng(seed)
    a_fixed = rng.normal(size=(R, D_IN))
    updates = [{B: rng.normal(size=(D_OUT, R)).astype(np.float32)} for _ in range(4)]
    weights = rng.integers(1, 50, size=4).tolist()
    # Execute
    merged = ffa_lora.aggregate(updates, weights)
    # Assert: mean(B) A == mean(B A)
    p = np.asarray(weights) / sum(weights)
    exact = sum(pk * u[B].astype(np.float64) @ a_fixed for pk, u in zip(p, updates, strict=True))
    np.testing.assert_allclose(merged[B] @ a_fixed, exact, rtol=1e-4, atol=1e-5)


def test_plain_averaging_of_a_and_b_is_not_averaging_products() -> None:
    # The reason FLoRA exists: mean(B) mean(A) differs from mean(B A) once both factors differ.
    rng = np.random.default_rng(0)
    updates = [_adapter(rng) for _ in range(3)]
    merged = weighted_mean(updates, [1, 1, 1])
    exact = sum(u[B] @ u[A] for u in updates) / 3
    assert np.abs(merged[B] @ merged[A] - exact).max() > 0.1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, R), min_size=1, max_size=5))
def test_flora_stacking_reproduces_the_weighted_sum_of_products(seed: int, ranks: list[int]) -> None:
    # Prepare: hospitals of different ranks, and a global that already holds earlier rounds.
    rng = np.random.default_rng(seed)
    previous = {**flora.empty_stack(_adapter(rng)), HEAD: np.zeros((3, D_OUT), np.float32)}
    earlier = [_adapter(rng, 2)]
    previous = flora.stack(previous, earlier, [1.0])
    updates = [_adapter(rng, r) for r in ranks]
    weights = rng.integers(1, 100, size=len(ranks)).tolist()
    # Execute
    merged = flora.stack(previous, updates, weights)
    # Assert
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    expected = earlier[0][B].astype(np.float64) @ earlier[0][A]
    expected += sum(pk * u[B].astype(np.float64) @ u[A] for pk, u in zip(p, updates, strict=True))
    product = merged[M + ".stacked_B"].astype(np.float64) @ merged[M + ".stacked_A"]
    np.testing.assert_allclose(product, expected, rtol=1e-4, atol=1e-4)
    assert merged[M + ".stacked_A"].shape == (2 + sum(ranks), D_IN)
    np.testing.assert_allclose(merged[HEAD], weighted_mean([{HEAD: u[HEAD]} for u in updates], weights)[HEAD], rtol=1e-5)


def test_hetlora_pads_truncated_updates_and_weights_by_product_norm() -> None:
    # Prepare: a rank-2 and a rank-4 hospital
    rng = np.random.default_rng(1)
    small, large = truncate_rank(_adapter(rng), 2), _adapter(rng)
    # Execute
    by_examples = hetlora.aggregate([small, large], [3, 1], rank=R, weighting="examples")
    by_norm = hetlora.aggregate([small, large], [3, 1], rank=R, weighting="sparsity")
    # Assert: zero-padded averaging by examples
    padded_small = pad_rank(small, R)
    np.testing.assert_allclose(by_examples[A], 0.75 * padded_small[A] + 0.25 * large[A], rtol=1e-5)
    np.testing.assert_allclose(by_examples[B][:, 2:], 0.25 * large[B][:, 2:], rtol=1e-5)
    # Sparsity weights are ||B_k A_k||_F; the head still follows example counts.
    n_small = np.linalg.norm(small[B] @ small[A])
    n_large = np.linalg.norm(large[B] @ large[A])
    assert hetlora.product_norm(small[A], small[B]) == pytest.approx(n_small, rel=1e-5)
    w = n_small / (n_small + n_large)
    np.testing.assert_allclose(by_norm[A], w * padded_small[A] + (1 - w) * large[A], rtol=1e-4)
    np.testing.assert_allclose(by_norm[HEAD], 0.75 * small[HEAD] + 0.25 * large[HEAD], rtol=1e-5)


def test_rank_truncation_padding_and_masking_round_trip() -> None:
    rng = np.random.default_rng(2)
    full = _adapter(rng)
    cut = truncate_rank(full, 2)
    assert cut[A].shape == (2, D_IN) and cut[B].shape == (D_OUT, 2) and cut[HEAD].shape == full[HEAD].shape
    back = pad_rank(cut, R)
    np.testing.assert_array_equal(back[A][:2], full[A][:2])
    assert not back[A][2:].any() and not back[B][:, 2:].any()
    np.testing.assert_array_equal(mask_rank(full, 2)[A], back[A])
    assert lora_modules(full) == [M]


def test_plans_say_what_is_trained_kept_and_sent() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    initial, received, mine = _adapter(rng), _adapter(rng), _adapter(rng)
    # Execute / Assert: FFA-LoRA never sends A and never takes one from the server.
    ffa = ClientPlan(fixed=("lora_A",))
    assert set(ffa.shared(received)) == {B, HEAD}
    state, fold = ffa.materialize(initial, received)  # an A that arrives anyway is ignored
    np.testing.assert_array_equal(state[A], initial[A])
    np.testing.assert_array_equal(state[B], received[B])
    assert fold == {}
    # FedSA-LoRA keeps B at home and overlays it on what arrives.
    fedsa = ClientPlan(private=("lora_B",))
    assert set(fedsa.shared(mine)) == {A, HEAD} and set(fedsa.kept(mine)) == {B}
    state, _ = fedsa.materialize(initial, fedsa.shared(received), fedsa.kept(mine))
    np.testing.assert_array_equal(state[B], mine[B])
    np.testing.assert_array_equal(state[A], received[A])
    # A rank-2 hospital loads the global with the components past its rank zeroed, and sends rank 2.
    ranked = ClientPlan(rank=2)
    state, _ = ranked.materialize(initial, received)
    assert not state[A][2:].any() and not state[B][:, 2:].any()
    assert ranked.shared(received)[A].shape == (2, D_IN)
    # FLoRA's stacked factors become fold factors, and the LoRA starts fresh from the initial one.
    stacked = flora.stack({**flora.empty_stack(initial), HEAD: received[HEAD]}, [received], [1.0])
    state, fold = ClientPlan(fold=True, rank=2).materialize(initial, stacked)
    np.testing.assert_array_equal(state[A][:2], initial[A][:2])
    assert set(fold) == {M}
    np.testing.assert_allclose(fold[M][1] @ fold[M][0], received[B] @ received[A], rtol=1e-5)


def test_hostile_hospitals_corrupt_their_update_relative_to_the_global() -> None:
    from fedfm.attacks import corrupt

    rng = np.random.default_rng(4)
    received, honest = _adapter(rng), _adapter(rng)
    flipped = corrupt(honest, received, kind="sign-flip", scale=3.0, seed=0)
    scaled = corrupt(honest, received, kind="scale", scale=3.0, seed=0)
    noisy = corrupt(honest, received, kind="noise", scale=0.5, seed=0)
    for name in honest:
        np.testing.assert_allclose(flipped[name] - received[name], -3.0 * (honest[name] - received[name]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scaled[name] - received[name], 3.0 * (honest[name] - received[name]), rtol=1e-4, atol=1e-5)
        assert noisy[name].shape == honest[name].shape and noisy[name].dtype == honest[name].dtype
    assert 0.3 < float(np.std(noisy[A] - received[A])) < 0.7
