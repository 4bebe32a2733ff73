"""The strategy registry, Flower's strategies as fedfm wires them, and replies of mixed ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from conftest import reply
from fedfm import keys, strategies
from fedfm.config import RunConfig
from fedfm.errors import ConfigError
from fedfm.strategies import GuardedStrategy
from fedfm.strategies.secure import LEGACY
from fedfm.wire import numpy_to_record, record_to_numpy

M = "base_model.model.enc.layer.0.query"
A, B, HEAD = M + ".lora_A.weight", M + ".lora_B.weight", "base_model.model.classifier.modules_to_save.weight"
INITIAL = {
    A: np.ones((4, 6), np.float32),
    B: np.zeros((5, 4), np.float32),
    HEAD: np.zeros((3, 5), np.float32),
}
SAMPLING = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0,
            "min_available_nodes": 1}


def _config(strategy: str, **extra: Any) -> RunConfig:
    return RunConfig().replace(**{"federation.strategy": strategy, **extra})


def _reply(hospital: int, arrays: dict[str, np.ndarray], examples: int = 10):  # type: ignore[no-untyped-def]
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(arrays),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples, keys.HOSPITAL_INDEX: hospital}),
    })
    return reply(content, node_id=100 + hospital)


def _guarded(config: RunConfig, num_hospitals: int = 5) -> GuardedStrategy:
    inner = strategies.create(config, num_hospitals=num_hospitals, **SAMPLING)
    guard = GuardedStrategy(
        inner, initial=INITIAL, plan_of=lambda hospital: strategies.client_plan(config, hospital)
    )
    global_arrays = strategies.initial_arrays(inner, config, INITIAL)
    # What configure_train records before a round (no grid needed for it).
    guard._reference = global_arrays
    if hasattr(inner, "current"):
        inner.current = global_arrays
    if hasattr(inner, "current_arrays"):
        inner.current_arrays = numpy_to_record(global_arrays) if strategy_is(inner, "FedAvgM") else global_arrays
    return guard


def strategy_is(inner: Any, name: str) -> bool:
    return type(inner).__name__ == name


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        strategies.create(_config("fedsgd"), num_hospitals=2, **SAMPLING)
    message = str(err.value)
    assert "fedsgd" in message
    for name in ("fedavg", "fedadam", "krum", "flora", "hetlora", "ffa-lora", "fedsa-lora"):
        assert repr(name) in message


def test_every_named_strategy_is_registered_and_builds() -> None:
    expected = {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                "fedtrimmedavg", "krum", "multikrum", "ffa-lora", "fedsa-lora", "hetlora", "flora"}
    assert expected <= set(strategies.available())
    for name in sorted(expected):
        assert strategies.create(_config(name), num_hospitals=4, **SAMPLING) is not None


def test_module_class_names_import_a_users_strategy() -> None:
    config = _config("flwr.serverapp.strategy:FedMedian")
    assert type(strategies.create(config, num_hospitals=3, **SAMPLING)).__name__ == "FedMedian"
    assert not strategies.is_linear("flwr.serverapp.strategy:FedMedian")  # undeclared: the safe side
    with pytest.raises(ConfigError, match="cannot be imported"):
        strategies.create(_config("no_such_module:Thing"), num_hospitals=3, **SAMPLING)


def test_non_linear_strategies_are_refused_where_only_a_sum_is_visible() -> None:
    assert strategies.require_linear("fedavg", "secure aggregation") is None
    assert strategies.require_linear("ffa-lora", "secure aggregation") is None
    for name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "flora", "hetlora"):
        why = strategies.require_linear(name, "secure aggregation")
        assert why is not None and name in why and "weighted sum" in why and "fedavg" in why


def test_client_ranks_need_a_heterogeneous_rank_strategy() -> None:
    problems = strategies.config_problems(_config("fedavg", **{"federation.client-ranks": (2, 4)}))
    assert len(problems) == 1 and "client-ranks" in problems[0] and "flora" in problems[0]
    assert strategies.config_problems(_config("hetlora", **{"federation.client-ranks": (2, 4)})) == []
    with pytest.raises(ConfigError, match=r"client-ranks` must each be in \[1, lora.r = 8\]"):
        _config("flora", **{"federation.client-ranks": (2, 16)})


def _honest(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (1.0 + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in INITIAL.items()}


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_resist_one_hostile_hospital(name: str, attack: str) -> None:
    # Prepare: four honest hospitals near 1.0, one sending a scaled or sign-flipped update.
    rng = np.random.default_rng(0)
    honest = [_honest(rng) for _ in range(4)]
    factor = 50.0 if attack == "scaled" else -10.0
    hostile = {k: v * factor for k, v in _honest(rng).items()}
    replies = [_reply(i, u) for i, u in enumerate(honest)] + [_reply(4, hostile)]
    # Execute
    robust, _ = _guarded(_config(name)).aggregate_train(1, replies)
    naive, _ = _guarded(_config("fedavg")).aggregate_train(1, [_reply(i, u) for i, u in enumerate(honest)]
                                                           + [_reply(4, hostile)])
    # Assert
    assert robust is not None and naive is not None
    for k, v in record_to_numpy(robust).items():
        assert np.abs(v - 1.0).max() < 0.25, (name, k)
    assert max(np.abs(v - 1.0).max() for v in record_to_numpy(naive).values()) > 1.0


def test_server_optimizer_state_is_kept_across_rounds() -> None:
    # Prepare: FedAdam, the same update twice
    config = _config("fedadam")
    guard = _guarded(config)
    update = {k: v + 0.1 for k, v in INITIAL.items()}
    # Execute
    first, _ = guard.aggregate_train(1, [_reply(0, update)])
    assert first is not None
    guard.inner.current_arrays = record_to_numpy(first)  # type: ignore[attr-defined]
    second, _ = guard.aggregate_train(2, [_reply(0, {k: v + 0.1 for k, v in record_to_numpy(first).items()})])
    # Assert: moments exist and the second step is not a repeat of the first (momentum builds up)
    assert second is not None
    assert guard.inner.m_t is not None and guard.inner.v_t is not None  # type: ignore[attr-defined]
    step1 = record_to_numpy(first)[A] - INITIAL[A]
    step2 = record_to_numpy(second)[A] - record_to_numpy(first)[A]
    assert np.all(step1 > 0) and not np.allclose(step1, step2)
    # Flower's Adam step computes in float64; the global goes back out in the dtype it came in.
    assert all(v.dtype == np.float32 for v in record_to_numpy(second).values())


@pytest.mark.parametrize(("name", "fields"), [
    ("fedavgm", {"server_learning_rate": "server_learning_rate", "server_momentum": "server_momentum"}),
    ("fedadam", {"eta": "eta", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    ("fedyogi", {"eta": "eta", "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    ("fedadagrad", {"eta": "eta", "tau": "tau"}),
])
def test_the_documented_defaults_reach_flowers_server_optimizers(name: str, fields: dict[str, str]) -> None:
    # Flower's own defaults differ (FedAvgM lr 1.0 and momentum 0.0, FedOpt eta 0.1): ours must replace them.
    config = _config(name)
    inner = strategies.create(config, num_hospitals=4, **SAMPLING)
    for attribute, field in fields.items():
        expected = strategies.server_eta(config, name) if field == "eta" else getattr(config.strategy, field)
        assert getattr(inner, attribute) == expected, (name, attribute)
    if "eta" in fields:
        # strategy.eta = 0 (the default) is each optimizer's own rate; a positive one overrides it.
        assert config.strategy.eta == 0 and inner.eta == strategies.SERVER_ETA[name]  # type: ignore[attr-defined]
        assert strategies.create(_config(name, **{"strategy.eta": 0.2}), num_hospitals=4, **SAMPLING).eta == 0.2  # type: ignore[attr-defined]
    if name in LEGACY:
        # The SecAgg+ path builds Flower's legacy class: it must get the same values.
        options = LEGACY[name][1](config)
        assert all(options[attribute] == getattr(inner, attribute) for attribute in fields), name


def test_fedprox_hands_its_mu_to_the_hospitals() -> None:
    config = _config("fedprox", **{"strategy.proximal-mu": 0.3})
    assert strategies.client_plan(config, 0).proximal_mu == 0.3
    assert strategies.create(config, num_hospitals=2, **SAMPLING).proximal_mu == 0.3  # type: ignore[attr-defined]
    assert strategies.client_plan(_config("fedavg"), 0).proximal_mu == 0.0


def test_mixed_rank_replies_are_checked_against_each_hospitals_rank() -> None:
    # Prepare: hospital 0 trains rank 2, hospital 1 rank 4
    config = _config("hetlora", **{"federation.client-ranks": (2, 4), "lora.r": 4})
    guard = _guarded(config, num_hospitals=2)
    rng = np.random.default_rng(5)
    rank2 = {A: rng.normal(size=(2, 6)).astype(np.float32), B: rng.normal(size=(5, 2)).astype(np.float32),
             HEAD: np.ones((3, 5), np.float32)}
    rank4 = {A: rng.normal(size=(4, 6)).astype(np.float32), B: rng.normal(size=(5, 4)).astype(np.float32),
             HEAD: np.ones((3, 5), np.float32)}
    # Execute: hospital 0 wrongly sends rank 4 the first time
    arrays, _ = guard.aggregate_train(1, [_reply(0, rank4), _reply(1, rank4)])
    left_out = guard.rounds[1].left_out
    arrays2, _ = guard.aggregate_train(2, [_reply(0, rank2), _reply(1, rank4)])
    # Assert
    assert list(left_out) == ["train:hospital 0 (node 100)"] and "expected (2, 6)" in left_out["train:hospital 0 (node 100)"]
    assert arrays is not None and arrays2 is not None
    merged = record_to_numpy(arrays2)
    assert merged[A].shape == (4, 6)
    assert guard.rounds[2].left_out == {}


def test_ffa_and_fedsa_send_and_aggregate_only_their_shared_half() -> None:
    ffa, fedsa = _config("ffa-lora"), _config("fedsa-lora")
    assert set(strategies.initial_arrays(strategies.create(ffa, num_hospitals=2, **SAMPLING), ffa, INITIAL)) == {B, HEAD}
    assert set(strategies.initial_arrays(strategies.create(fedsa, num_hospitals=2, **SAMPLING), fedsa, INITIAL)) == {A, HEAD}
    # A reply carrying the tensor a plan keeps at home is refused.
    guard = _guarded(fedsa, num_hospitals=2)
    arrays, _ = guard.aggregate_train(1, [_reply(0, dict(INITIAL)), _reply(1, {A: INITIAL[A], HEAD: INITIAL[HEAD]})])
    assert arrays is not None and set(record_to_numpy(arrays)) == {A, HEAD}
    assert "unexpected 1 tensor" in next(iter(guard.rounds[1].left_out.values()))


def test_a_name_is_never_replaced_silently() -> None:
    # Prepare: a name of this test's own
    class Mine(strategies.AdapterStrategy):
        linear = False

    name = "test-registry-mine"
    strategies.register(name, Mine)
    try:
        # Execute / Assert: a second registration is refused, naming the name and what holds it
        with pytest.raises(ConfigError, match=r"strategy 'test-registry-mine' is registered already .*Mine.*force=True"):
            strategies.register(name, strategies.FfaLora)
        assert strategies.entry(name).cls is Mine
        with pytest.raises(ValueError, match="registered already"):  # ConfigError is a ValueError
            strategies.register("fedavg", Mine)
        # force=True replaces it, with the capabilities the new registration states
        strategies.register(name, strategies.FfaLora, linear=True, force=True)
        assert strategies.entry(name).cls is strategies.FfaLora and strategies.is_linear(name)
    finally:
        strategies.registry._REGISTRY.pop(name, None)


def test_every_registration_holds_its_capabilities() -> None:
    # What each built-in strategy can do is stated by its registration and kept in its entry.
    linear = {n for n in strategies.available() if strategies.entry(n).linear}
    assert {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "ffa-lora", "fedsa-lora"} <= linear
    assert not linear & {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "hetlora", "flora"}
    ranked = {n for n in strategies.available() if strategies.entry(n).heterogeneous_ranks}
    assert {"hetlora", "flora"} <= ranked and "fedavg" not in ranked
    config = _config("ffa-lora")
    assert strategies.entry("ffa-lora").plan(config, 0).fixed == ("lora_A",)
    assert strategies.entry("krum").options is not None and strategies.entry("fedavg").options is None
