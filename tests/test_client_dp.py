"""Client-level DP: Flower's wrappers, uniform weights, hospital-side clipping, ε over rounds from Opacus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from tests.conftest import instruction, reply

from fedfm import keys, strategies
from fedfm.client import app
from fedfm.config import RunConfig, to_json
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import ClientLevelLedger
from fedfm.privacy.accounting import sampled_hospitals as num_sampled
from fedfm.strategies.client_dp import ADAPTIVE_KEY, CLIPPING_NORM_KEY
from fedfm.wire import numpy_to_record, record_to_numpy
from fedfm.workspace import workspace_for


def _opacus_epsilon(noise_multiplier: float, releases: int, delta: float = 1e-5) -> float:
    """ε of ``releases`` full (unsampled) Gaussian releases, from a fresh Opacus accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(releases):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return float(accountant.get_epsilon(delta=delta))


def test_client_level_epsilon_claims_no_sampling_amplification_and_states_both_neighbourings() -> None:
    # The review's example: 4 hospitals, σ = 1, 10 rounds. Add/remove one hospital: sensitivity C/m, multiplier σ;
    # replace one hospital's data: 2C/m, so σ/2 (the "sound 48.8" of issue 26).
    ledger = ClientLevelLedger(noise_multiplier=1.0, delta=1e-5)
    spent = []
    for release in range(1, 11):
        ledger = ledger.after_round()
        if release in (1, 5, 10):
            spent.append(ledger.epsilon())
    assert ledger.releases == 10 and ledger.history == [(1.0, 1.0, 10)]
    assert spent[-1] == pytest.approx(_opacus_epsilon(1.0, 10), rel=1e-9)
    assert ledger.epsilon_replace_one() == pytest.approx(_opacus_epsilon(0.5, 10), rel=1e-9)
    assert spent[-1] == pytest.approx(19.05, abs=0.01) and ledger.epsilon_replace_one() == pytest.approx(48.80, abs=0.01)
    assert all(b > a for a, b in zip(spent, spent[1:], strict=False))


def test_client_level_mean_divides_by_the_hospitals_sampled_and_releases_without_replies(
    tiny_csv_settings: dict[str, Any],
) -> None:
    from fedfm.server.app import build_strategy

    # Prepare: two hospitals sampled, a clipping norm no update reaches, almost no noise.
    config = RunConfig().replace(**tiny_csv_settings, **{
        "privacy.client-dp": "server-fixed", "privacy.client-noise-multiplier": 1e-9,
        "privacy.client-clipping-norm": 100.0, "federation.update-norm-limit": 3.0,
    })
    guard = build_strategy(config, workspace_for(config))
    start = {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}
    guard.inner.current_arrays = numpy_to_record(start)  # what configure_train records
    guard.inner.strategy._start = start
    update = {k: np.full(v.shape, 0.01, v.dtype) for k, v in start.items()}
    content = RecordDict({keys.ARRAYS: numpy_to_record({k: start[k] + update[k] for k in start}),
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 30, keys.HOSPITAL_INDEX: 0})})
    # Execute: one of the two replies; then none.
    one, _ = guard.aggregate_train(1, [reply(content, node_id=11)])
    none, _ = guard.aggregate_train(2, [])
    # Assert: the missing hospital counts as a zero update (not a mean over the one reply), and a round with no
    # reply still releases; the median norm screen and the minimum number of replies are off.
    assert guard.update_norm_limit == 0 and guard.min_replies == 0
    assert one is not None and none is not None
    for name, value in record_to_numpy(one).items():
        np.testing.assert_allclose(value, start[name] + update[name] / 2, atol=1e-6)
    for name, value in record_to_numpy(none).items():
        np.testing.assert_allclose(value, start[name], atol=1e-6)
    assert guard.rounds[1].train_aggregated and guard.rounds[2].train_aggregated


def test_client_level_noise_does_not_come_from_numpys_global_generator(tiny_csv_settings: dict[str, Any]) -> None:
    # numpy's global state is in every checkpoint; the noise must not be replayable from it.
    config = RunConfig().replace(**{"privacy.client-dp": "server-fixed", "privacy.client-noise-multiplier": 1.0})
    wrapper = strategies.create(config, num_hospitals=2, fraction_train=1.0, min_train_nodes=2)
    zeros = numpy_to_record({"w": np.zeros(64, np.float32)})
    draws = []
    for _ in range(2):
        np.random.seed(0)
        draws.append(record_to_numpy(wrapper._add_noise_to_aggregated_arrays(zeros))["w"])
    assert np.std(draws[0]) == pytest.approx(0.1 / 2, rel=0.5)  # σ·C/m = 1 x 0.1 / 2
    assert not np.allclose(draws[0], draws[1])


def test_num_sampled_follows_flowers_fedavg() -> None:
    assert num_sampled(10, 0.3, 2) == 3
    assert num_sampled(10, 0.1, 2) == 2
    assert num_sampled(4, 1.0, 2) == 4


@pytest.mark.parametrize(("strategy", "fragment"), [
    ("fedadam", "aggregates differently"),
    ("fedmedian", "aggregates differently"),
    ("ffa-lora", "send only part of it"),
    ("fedsa-lora", "send only part of it"),
])
def test_client_dp_is_refused_where_the_guarantee_would_not_hold(strategy: str, fragment: str) -> None:
    config = RunConfig().replace(**{"federation.strategy": strategy, "privacy.client-dp": "server-fixed"})
    with pytest.raises(ConfigError, match=fragment):
        strategies.check(config)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_client_dp_wraps_fedavg_like_strategies(strategy: str) -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    config = RunConfig().replace(**{"federation.strategy": strategy, "privacy.client-dp": "server-adaptive",
                                    "privacy.client-clipping-norm": 0.5, "privacy.client-clipped-count-stddev": 1.0})
    wrapped = strategies.create(config, num_hospitals=4, fraction_train=1.0, min_train_nodes=4)
    assert isinstance(wrapped, DifferentialPrivacyServerSideAdaptiveClipping)
    assert wrapped.num_sampled_clients == 4 and wrapped.clipping_norm == 0.5


def test_adaptive_clipping_refuses_a_noise_its_count_noise_cannot_split(tiny_csv_settings: dict[str, Any]) -> None:
    from fedfm import privacy
    from fedfm.workspace import federation_for

    config = RunConfig().replace(**tiny_csv_settings, **{"privacy.client-dp": "client-adaptive",
                                                         "privacy.client-noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match=r"must be below twice `privacy.client-clipped-count-stddev` \(0.1 = hospitals"):
        privacy.check(config, federation_for(config.data))


def test_invalid_client_dp_settings_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{"privacy.client-dp": "central", "privacy.client-noise-multiplier": 0.0,
                               "privacy.client-target-quantile": 1.5})
    text = str(err.value)
    assert "`privacy.client-dp` must be one of ['none', 'server-fixed'" in text
    assert "`privacy.client-noise-multiplier` must be a finite number > 0" in text
    assert "`privacy.client-target-quantile` must be in [0, 1]" in text


# ---- hospital-side clipping through the ClientApp (Flower's mods) ---------------------------------


def _ask(config: RunConfig, extra: dict[str, Any]) -> tuple[dict[str, np.ndarray], Any]:
    initial = {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(initial),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: 1, **extra}),
    })
    context = Context(run_id=1, node_id=5, node_config={keys.PARTITION_ID: 0}, state=RecordDict(), run_config={})
    answer = app(instruction(content, message_type="train"), context)
    assert not answer.has_error(), answer.error
    update = {k: v - initial[k] for k, v in record_to_numpy(answer.content[keys.ARRAYS]).items()}
    return update, answer.content[keys.METRICS]


def _norm(update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values())))


def test_a_hospital_clips_its_update_when_the_wrapper_asks(tiny_csv_settings: dict[str, Any]) -> None:
    config = RunConfig().replace(**tiny_csv_settings, **{"train.local-steps": 3, "train.learning-rate": 5e-2})
    free, _ = _ask(config, {})
    clipped, _ = _ask(config, {CLIPPING_NORM_KEY: 0.01})
    adaptive, metrics = _ask(config, {CLIPPING_NORM_KEY: 0.01, ADAPTIVE_KEY: True})
    assert _norm(free) > 0.05
    assert _norm(clipped) == pytest.approx(0.01, rel=1e-3)
    assert _norm(adaptive) == pytest.approx(0.01, rel=1e-3)
    assert metrics["norm_bit"] == 1  # Flower reports 1 for an update that had to be clipped


# ---- in Flower's simulation engine -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["server-fixed", "client-adaptive"])
def test_client_level_dp_run_records_epsilon_each_round(mode: str, tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    import fedfm

    config = RunConfig().replace(**{
        **tiny_csv_settings,
        "data.partitioner": "iid", "data.num-hospitals": 3,
        "train.local-steps": 3, "train.learning-rate": 2e-2,
        "federation.num-rounds": 3, "federation.min-hospitals": 3,
        "privacy.client-dp": mode, "privacy.client-noise-multiplier": 0.8, "privacy.client-clipping-norm": 0.05,
        "privacy.client-clipped-count-stddev": 1.0,
    })
    result = fedfm.run(config, out=tmp_path / mode)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["aggregated"] for line in lines] == [True, True, True]
    levels = [line["privacy"]["client_level"] for line in lines]
    assert [level["releases"] for level in levels] == [1, 2, 3]
    eps = [level["epsilon"] for level in levels]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == pytest.approx(_opacus_epsilon(0.8, 3), rel=1e-9)
    assert levels[-1]["epsilon_replace_one"] == pytest.approx(_opacus_epsilon(0.4, 3), rel=1e-9)
    assert levels[-1]["neighbouring"] == "add-or-remove-one-hospital"
    assert result.summary["privacy"]["client_level"]["epsilon"] == pytest.approx(eps[-1])
    norms = [level["clipping_norm"] for level in levels]
    if mode == "server-fixed":
        assert norms == [0.05, 0.05, 0.05]
    else:
        assert norms[0] != norms[-1]  # the norm adapts to the hospitals' updates
