"""DP-SGD per hospital: ε from Opacus's accountants, one ledger across rounds and restarts, what leaves."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from conftest import instruction
from fedfm import keys, privacy
from fedfm.adapters import get_adapter_state, set_adapter_state
from fedfm.client import app
from fedfm.config import RunConfig, to_json
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import HospitalLedger, compose, default_delta, epsilon_of, open_ledger
from fedfm.privacy.dpsgd import DpSgd, micro_batches, private_training, sample_rate, steps_per_round
from fedfm.privacy.hospital import LEDGER_FILE, dp_batch_size, dp_train_spec
from fedfm.strategies import ClientPlan
from fedfm.train import train_local
from fedfm.wire import numpy_to_record
from fedfm.workspace import workspace_for

SIGMA, RATE, STEPS, DELTA = 1.1, 0.05, 40, 1e-5


# ---- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_composed_over_rounds_and_a_restart_equals_one_opacus_accountant(kind: str) -> None:
    from opacus.accountants import create_accountant

    # Prepare: 5 rounds of 40 steps; the ledger goes through JSON (a restart) after round 2
    ledger = HospitalLedger("north", 50.0, DELTA, SIGMA, RATE, STEPS, accountant=kind)
    single = create_accountant(mechanism=kind)
    spent = []
    # Execute
    for server_round in range(1, 6):
        ledger = ledger.after_training(server_round, STEPS)
        if server_round == 2:
            ledger = HospitalLedger.from_json(ledger.to_json())
        spent.append(ledger.epsilon())
        for _ in range(STEPS):
            single.step(noise_multiplier=SIGMA, sample_rate=RATE)
    # Assert: the same ε as one accountant that saw all 200 steps, growing every round
    assert ledger.steps == 5 * STEPS
    assert ledger.rounds == [1, 2, 3, 4, 5]
    assert spent[-1] == pytest.approx(single.get_epsilon(delta=DELTA), rel=1e-6)
    assert all(b > a for a, b in itertools.pairwise(spent))


def test_a_fresh_accountant_every_round_would_report_a_constant_epsilon() -> None:
    # The bug fedfm exists to avoid: round 2's ε equals round 1's if the history is lost.
    one_round = epsilon_of(compose([], SIGMA, RATE, STEPS), DELTA)
    two_rounds = epsilon_of(compose(compose([], SIGMA, RATE, STEPS), SIGMA, RATE, STEPS), DELTA)
    assert two_rounds > one_round > 0


def test_compose_merges_like_opacus_and_keeps_changes_of_noise_apart() -> None:
    history = compose(compose([], SIGMA, RATE, 10), SIGMA, RATE, 5)
    assert history == [(SIGMA, RATE, 15)]
    assert compose(history, 2.0, RATE, 3) == [(SIGMA, RATE, 15), (2.0, RATE, 3)]
    assert epsilon_of([], DELTA) == 0.0


def test_calibrated_noise_ends_the_planned_rounds_at_the_target_and_no_further() -> None:
    # Prepare
    ledger = open_ledger(hospital="south", target_epsilon=3.0, delta=DELTA, sample_rate=RATE,
                         steps_per_round=STEPS, planned_rounds=4)
    # Execute
    for server_round in range(1, 5):
        assert ledger.allows(STEPS), server_round
        ledger = ledger.after_training(server_round, STEPS)
    # Assert: the budget is spent (within Opacus's calibration tolerance) and a fifth round is refused
    assert 2.98 <= ledger.epsilon() <= 3.0
    assert not ledger.allows(STEPS)


def test_ledger_file_is_written_whole(tmp_path: Path) -> None:
    ledger = HospitalLedger("north", 8.0, DELTA, SIGMA, RATE, STEPS).after_training(1, STEPS).after_refusal(2)
    path = tmp_path / "north" / LEDGER_FILE
    ledger.save(path)
    assert HospitalLedger.load(path) == ledger
    assert not list(path.parent.glob("*.partial"))
    assert HospitalLedger.load(tmp_path / "missing.json") is None


def test_default_delta_is_below_one_over_n() -> None:
    assert default_delta(300) == 1e-5
    assert default_delta(10**6) < 1e-6
    assert all(default_delta(n) < 1 / n for n in (10, 1000, 50_000, 10**7))


# ---- configuration ------------------------------------------------------------------------------


def test_invalid_privacy_settings_are_named_together() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{
            "privacy.mode": "dp", "privacy.target-epsilon": 0.0, "privacy.delta": 1.5,
            "privacy.max-grad-norm": -1.0, "privacy.accountant": "moments", "privacy.hospital-epsilon": ("north",),
        })
    text = str(err.value)
    for fragment in ("`privacy.mode` must be one of ['none', 'dp-sgd']", "`privacy.target-epsilon`",
                     "`privacy.delta` must be in (0, 1)", "`privacy.max-grad-norm`",
                     "`privacy.accountant` must be one of ['rdp', 'prv']", "'north'"):
        assert fragment in text


def _dp_config(settings: dict[str, Any], **extra: Any) -> RunConfig:
    return RunConfig().replace(**settings, **{
        "train.local-steps": 3, "train.learning-rate": 5e-2, "federation.num-rounds": 3,
        "privacy.mode": "dp-sgd", "privacy.recipe": "lora", **extra,
    })


def test_check_refuses_what_cannot_work_for_these_hospitals(tiny_csv_settings: dict[str, Any]) -> None:
    from fedfm.workspace import federation_for

    federation = federation_for(_dp_config(tiny_csv_settings).data)
    with pytest.raises(ConfigError) as err:
        config = _dp_config(tiny_csv_settings, **{
            "privacy.delta": 0.1, "privacy.hospital-epsilon": ("west=2",),
        })
        privacy.check(config, federation)
    assert "not below 1/N" in str(err.value)
    assert "'west', which is no hospital" in str(err.value)
    with pytest.raises(ConfigError, match="cannot train one round within ε 0.5"):
        privacy.check(_dp_config(tiny_csv_settings, **{"privacy.noise-multiplier": 0.3, "privacy.target-epsilon": 0.5}),
                      federation)
    plans = privacy.check(_dp_config(tiny_csv_settings, **{"privacy.hospital-epsilon": ("south=2",)}), federation)
    assert {p.hospital: p.target_epsilon for p in plans} == {"north": 8.0, "south": 2.0}
    assert plans[1].noise_multiplier > plans[0].noise_multiplier  # a smaller budget needs more noise


# ---- DP-SGD training ----------------------------------------------------------------------------


def _workspace(settings: dict[str, Any]):  # type: ignore[no-untyped-def]
    config = _dp_config(settings)
    return config, workspace_for(config)


def _train_once(config: RunConfig, workspace: Any, dp: DpSgd | None, plan: ClientPlan | None = None) -> dict[str, torch.Tensor]:
    loaded = workspace.loaded
    set_adapter_state(loaded.model, loaded.initial_state)
    rows = workspace.hospital_rows("train", 0)
    train_local(loaded.model, workspace.task, rows, loaded.tokenizer, spec=config.train, device=loaded.device,
                seed=1, dp=dp, plan=plan)
    return get_adapter_state(loaded.model)


def test_dp_training_keeps_peft_names_and_leaves_no_opacus_state(tiny_csv_settings: dict[str, Any]) -> None:
    config, workspace = _workspace(tiny_csv_settings)
    model = workspace.loaded.model
    before = set(get_adapter_state(model))
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    state = _train_once(config, workspace, DpSgd(1.0, 1.0, 0.2, 4))
    assert set(state) == before
    assert type(model).__name__.startswith("PeftModel")
    assert not [n for n, p in model.named_parameters() if hasattr(p, "grad_sample") or hasattr(p, "summed_grad")]
    after = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == hooks


def test_dp_noise_is_not_reproducible_from_the_seed_the_server_knows(tiny_csv_settings: dict[str, Any]) -> None:
    config, workspace = _workspace(tiny_csv_settings)
    plain = [_train_once(config, workspace, None) for _ in range(2)]
    private = [_train_once(config, workspace, DpSgd(1.0, 1.0, 0.2, 4)) for _ in range(2)]
    name = next(k for k in plain[0] if "lora_B" in k)
    torch.testing.assert_close(plain[0][name], plain[1][name])
    assert not torch.allclose(private[0][name], private[1][name])


def test_an_empty_poisson_batch_still_adds_noise(tiny_csv_settings: dict[str, Any]) -> None:
    config, workspace = _workspace(tiny_csv_settings)
    loaded = workspace.loaded
    set_adapter_state(loaded.model, loaded.initial_state)
    result = train_local(loaded.model, workspace.task, workspace.hospital_rows("train", 0), loaded.tokenizer,
                         spec=config.train, device=loaded.device, dp=DpSgd(1.0, 1.0, 1e-9, 3))
    assert (result.steps, result.examples) == (3, 0)
    changed = get_adapter_state(loaded.model)
    assert any(not torch.equal(changed[k], v) for k, v in loaded.initial_state.items())


def _noised_gradient(workspace: Any, indices: list[int], chunk: int, clip: float) -> dict[str, torch.Tensor]:
    """The gradient one DP step hands the optimizer (σ = 0), with the batch run in chunks of ``chunk`` rows."""
    loaded, task = workspace.loaded, workspace.task
    rows = workspace.hospital_rows("train", 0)
    set_adapter_state(loaded.model, loaded.initial_state)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    captured: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    lengths = [len(ids) for ids in rows["input_ids"]]
    dp = DpSgd(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=len(indices) / len(rows), steps=1)
    optimizer = torch.optim.SGD(params, lr=0.0)
    dropouts = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    loaded.model.train()  # Opacus records activations in training mode only
    try:
        for m in dropouts:
            m.p = 0.0  # the runs must compute the same function
        with private_training(loaded.model, optimizer, dp, len(rows), after_noise=lambda: captured.update(
                {names[id(p)]: p.grad.clone() for p in params})) as (fwd, opt):
            opt.zero_grad(set_to_none=True)
            for part in micro_batches(indices, lengths, chunk):
                batch = task.collate(loaded.tokenizer)([rows[i] for i in part])
                task.loss(fwd, batch).backward()
            opt.step()
    finally:
        loaded.model.eval()
        for m, rate in zip(dropouts, rates, strict=True):
            m.p = rate
    return captured


def test_micro_batches_give_the_step_of_the_whole_poisson_batch(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare: one batch of 6 rows of different lengths
    _, workspace = _workspace(tiny_csv_settings)
    rows = workspace.hospital_rows("train", 0)
    lengths = [len(ids) for ids in rows["input_ids"]]
    indices = [0, 3, 1, 5, 4, 2]
    chunks = micro_batches(indices, lengths, 4)
    assert [len(c) for c in chunks] == [4, 2] and sorted(i for c in chunks for i in c) == sorted(indices)
    assert max(lengths[i] for i in chunks[0]) <= min(lengths[i] for i in chunks[1])
    # Act: the same step as one pass, as chunks of 4, and one row at a time; then with clipping on
    whole, fours, ones = (_noised_gradient(workspace, indices, size, clip=1e6) for size in (6, 4, 1))
    clipped_whole, clipped_ones = (_noised_gradient(workspace, indices, size, clip=1e-3) for size in (6, 1))
    # Assert: the mean of the per-example gradients, however the batch was cut
    assert whole and set(whole) == set(fours) == set(ones)
    for name in whole:
        torch.testing.assert_close(fours[name], whole[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ones[name], whole[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(clipped_ones[name], clipped_whole[name], rtol=1e-4, atol=1e-9)
    # clipped to 1e-3 per example, so the mean over 6 expected rows has norm at most 1e-3
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in clipped_whole.values()))
    assert 0 < float(norm) <= 1e-3 + 1e-9


def test_dp_training_keeps_frozen_factors_and_components_past_the_rank(tiny_csv_settings: dict[str, Any]) -> None:
    config, workspace = _workspace(tiny_csv_settings)
    initial = workspace.loaded.initial_state
    frozen = _train_once(config, workspace, DpSgd(1.0, 1.0, 0.2, 3), ClientPlan(fixed=("lora_A",)))
    for name in initial:
        if "lora_A" in name:
            torch.testing.assert_close(frozen[name], initial[name])
    ranked = _train_once(config, workspace, DpSgd(1.0, 1.0, 0.2, 3), ClientPlan(rank=2))
    for name in initial:
        if "lora_A" in name:
            torch.testing.assert_close(ranked[name][2:], initial[name][2:])
        if "lora_B" in name:
            torch.testing.assert_close(ranked[name][:, 2:], initial[name][:, 2:])
            assert not torch.equal(ranked[name][:, :2], initial[name][:, :2])


def test_steps_and_rate_follow_the_training_settings() -> None:
    spec = RunConfig().train
    assert sample_rate(16, 160) == pytest.approx(0.1)
    assert steps_per_round(spec, 16, 160) == 10  # one epoch = 1 / rate expected steps
    assert steps_per_round(spec, 64, 160) == 2  # a larger DP batch, fewer steps per epoch
    assert steps_per_round(dataclasses.replace(spec, local_steps=7), 16, 160) == 7
    assert sample_rate(16, 5) == 1.0


def test_dp_recipe_replaces_the_training_optimizer_only_under_dp() -> None:
    config = RunConfig()
    assert dp_batch_size(config) == config.privacy.batch_size
    assert dp_batch_size(config.replace(**{"privacy.batch-size": 0})) == config.train.batch_size
    spec = dp_train_spec(config)
    assert (spec.optimizer, spec.learning_rate) == (config.privacy.optimizer, config.privacy.learning_rate)
    assert (config.train.optimizer, config.train.learning_rate) != (spec.optimizer, spec.learning_rate)
    kept = dp_train_spec(config.replace(**{"privacy.learning-rate": 0.0}))
    assert kept.learning_rate == config.train.learning_rate
    assert dataclasses.replace(spec, optimizer=config.train.optimizer, learning_rate=config.train.learning_rate) == config.train


# ---- the hospital's ledger through the ClientApp ---------------------------------------------------


def _context(partition: int, state: RecordDict | None = None) -> Context:
    # Called outside a run, there is no run directory: the ledger lives in the context (as an operator may accept).
    return Context(run_id=1, node_id=100 + partition,
                   node_config={keys.PARTITION_ID: partition, keys.LEDGER_IN_MEMORY: True},
                   state=state if state is not None else RecordDict(), run_config={})


def _ask(config: RunConfig, context: Context, server_round: int) -> Any:
    initial = {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(initial),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: server_round}),
    })
    answer = app(instruction(content, message_type="train"), context)
    assert not answer.has_error(), answer.error
    return answer.content


def test_hospital_ledger_grows_persists_and_refuses_past_its_budget(
    tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: fixed noise and a budget that pays for two rounds but not three
    base = _dp_config(tiny_csv_settings)
    rows = len(workspace_for(base).hospital_rows("train", 0))
    probe = HospitalLedger("north", 1e9, default_delta(rows), 0.8, sample_rate(dp_batch_size(base), rows), 3)
    two_rounds = probe.after_training(1, 3).after_training(2, 3).epsilon()
    config = _dp_config(tiny_csv_settings, **{
        "privacy.noise-multiplier": 0.8, "privacy.target-epsilon": round(two_rounds * 1.01, 4),
        "output.dir": str(tmp_path),
    })
    context = _context(0)
    # Execute: rounds 1 and 2 in one context; round 3 after a "restart" with an empty context
    first = _ask(config, context, 1)
    second = _ask(config, context, 2)
    restarted = _context(0)
    third = _ask(config, restarted, 3)
    # Assert
    eps = [first[keys.METRICS][keys.DP_EPSILON], second[keys.METRICS][keys.DP_EPSILON]]
    assert 0 < eps[0] < eps[1] <= config.privacy.target_epsilon
    assert keys.ARRAYS in first and keys.ARRAYS in second
    assert keys.ARRAYS not in third  # nothing leaves a hospital that refuses
    assert third[keys.METRICS][keys.DP_REFUSED] == 1
    assert third[keys.METRICS][keys.DP_EPSILON] == pytest.approx(eps[1])
    stored = json.loads((tmp_path / "hospitals" / "north" / LEDGER_FILE).read_text())
    assert stored["rounds"] == [1, 2] and stored["refused"] == [3]
    assert stored["history"] == [[0.8, pytest.approx(stored["sample_rate"]), 6]]


def test_dp_reply_holds_only_adapter_tensors_and_scalars(tiny_csv_settings: dict[str, Any]) -> None:
    from flwr.app import ArrayRecord, MetricRecord

    config = _dp_config(tiny_csv_settings)
    content = _ask(config, _context(1), 1)
    assert set(content.keys()) == {keys.ARRAYS, keys.METRICS}
    assert isinstance(content[keys.ARRAYS], ArrayRecord) and isinstance(content[keys.METRICS], MetricRecord)
    sent = set(content[keys.ARRAYS].keys())
    assert sent == set(workspace_for(config).loaded.initial_state)
    assert all("_module" not in name and "grad_sample" not in name for name in sent)
    assert all(isinstance(v, (int, float)) for v in content[keys.METRICS].values())
    assert np.isfinite(content[keys.METRICS][keys.DP_EPSILON])


# ---- membership-inference audit -------------------------------------------------------------------


def test_roc_auc_matches_counting_every_pair() -> None:
    from fedfm.privacy.audit import loss_threshold_auc, roc_auc

    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 30).astype(float)  # many ties
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert roc_auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert loss_threshold_auc(np.array([0.1, 0.2]), np.array([0.9, 1.5])) == 1.0  # members have low loss
    assert np.isnan(roc_auc(np.array([]), np.array([1.0])))


def test_audit_instruction_returns_the_hospitals_auc(tiny_csv_settings: dict[str, Any]) -> None:
    config = _dp_config(tiny_csv_settings)
    initial = {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(initial),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: 3, keys.AUDIT: True}),
    })
    answer = app(instruction(content, message_type="evaluate"), _context(1))
    assert not answer.has_error(), answer.error
    metrics = answer.content[keys.METRICS]
    workspace = workspace_for(config)
    assert 0.0 <= metrics[keys.AUDIT_AUC] <= 1.0
    assert metrics[keys.AUDIT_MEMBERS] == len(workspace.hospital_rows("train", 1))
    assert metrics[keys.AUDIT_NONMEMBERS] == len(workspace.hospital_rows("test", 1))
    assert keys.ARRAYS not in answer.content


def test_a_stored_ledger_of_another_recipe_is_accounted_as_this_run_trains() -> None:
    from fedfm.privacy.accounting import HospitalLedger, compose, epsilon_of
    from fedfm.privacy.hospital import hospital_ledger

    # Prepare: an earlier run's DP-SGD on LoRA (Poisson rate 64/500, 8 steps a round) spent part of ε 8.
    stored = HospitalLedger(hospital="east", target_epsilon=8.0, delta=1e-5, noise_multiplier=1.2,
                            sample_rate=64 / 500, steps_per_round=8, history=[(1.2, 64 / 500, 24)], rounds=[1, 2, 3])
    config = RunConfig().replace(**{"privacy.mode": "dp-sgd", "privacy.recipe": "linear-probe",
                                    "privacy.probe-steps": 10, "federation.num-rounds": 4})
    # Execute: this run's hospital takes the stored ledger on.
    held = hospital_ledger(config, stored, index=0, name="east", num_rows=500)
    # Assert: this run's full-batch rounds are what gets accounted, and its σ spends what is left, no more.
    assert (held.sample_rate, held.steps_per_round) == (1.0, 10) and held.history == stored.history
    planned = compose(stored.history, held.noise_multiplier, 1.0, 40)
    assert epsilon_of(planned, 1e-5) == pytest.approx(8.0, rel=2e-3)
    assert epsilon_of(planned, 1e-5) <= 8.0
