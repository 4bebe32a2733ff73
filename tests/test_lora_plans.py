"""What a hospital trains, keeps and sends under each LoRA-aware strategy (real ClientApp, tiny BERT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from conftest import instruction
from fedfm import keys, strategies
from fedfm.adapters import export_adapter, set_adapter_state, set_base_delta
from fedfm.client import app
from fedfm.config import RunConfig, to_json
from fedfm.server import load_global
from fedfm.strategies.plan import ClientPlan, decode_plan, encode_plans
from fedfm.train import train_local
from fedfm.wire import numpy_to_record, record_to_numpy
from fedfm.workspace import workspace_for


def _config(settings: dict[str, Any], strategy: str, **extra: Any) -> RunConfig:
    return RunConfig().replace(**settings, **{"train.local-steps": 3, "train.learning-rate": 5e-2,
                                              "federation.strategy": strategy, **extra})


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={keys.PARTITION_ID: partition}, state=RecordDict(),
                   run_config={})


def _initial(config: RunConfig) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in workspace_for(config).loaded.initial_state.items()}


def _train(config: RunConfig, global_arrays: dict[str, np.ndarray], context: Context, server_round: int = 1):  # type: ignore[no-untyped-def]
    content = RecordDict({
        keys.ARRAYS: numpy_to_record(global_arrays),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(config), keys.SERVER_ROUND: server_round}),
    })
    answer = app(instruction(content, message_type="train"), context)
    assert not answer.has_error(), answer.error
    return record_to_numpy(answer.content[keys.ARRAYS])


def test_ffa_lora_hospital_never_sends_or_changes_a(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare
    config = _config(tiny_csv_settings, "ffa-lora")
    initial = _initial(config)
    global_arrays = strategies.initial_arrays(strategies.create(config, num_hospitals=2), config, initial)
    # Execute
    sent = _train(config, global_arrays, _context(0))
    # Assert
    assert sent and not any("lora_A" in k for k in sent)
    assert any(not np.allclose(sent[k], initial[k]) for k in sent if "lora_B" in k)
    model_state = workspace_for(config, side="hospital").loaded.model.state_dict()
    for name, value in model_state.items():
        if "lora_A" in name:
            key = name.replace(".default", "")
            np.testing.assert_array_equal(value.numpy(), initial[key])  # A stayed at the shared init
    # Frozen only for that call: A is trainable again for the next strategy in this process.
    hospital_model = workspace_for(config, side="hospital").loaded.model
    assert all(p.requires_grad for n, p in hospital_model.named_parameters() if "lora_A" in n)


def test_head_first_rounds_train_the_head_alone_then_the_lora_factors_too(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare: the first of three rounds trains the head alone
    config = _config(tiny_csv_settings, "fedavg", **{"federation.head-first-rounds": 1, "federation.num-rounds": 3})
    initial = _initial(config)
    global_arrays = strategies.initial_arrays(strategies.create(config, num_hospitals=2), config, initial)
    # Execute
    first = _train(config, global_arrays, _context(0), server_round=1)
    second = _train(config, first, _context(0), server_round=2)
    # Assert: round 1 sends every tensor, the LoRA factors exactly as received and the head trained
    assert set(first) == set(global_arrays)
    lora = [k for k in first if "lora_" in k]
    head = [k for k in first if "lora_" not in k]
    assert lora and head
    for name in lora:
        np.testing.assert_array_equal(first[name], global_arrays[name])
    assert all(not np.allclose(first[k], global_arrays[k]) for k in head)
    # Round 2 trains the LoRA factors too
    assert any(not np.allclose(second[k], first[k]) for k in lora if "lora_B" in k)
    hospital_model = workspace_for(config, side="hospital").loaded.model
    assert all(p.requires_grad for n, p in hospital_model.named_parameters() if "lora_" in n)


def test_fedsa_lora_hospital_keeps_its_b_across_rounds_and_never_sends_it(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare
    config = _config(tiny_csv_settings, "fedsa-lora")
    initial = _initial(config)
    global_arrays = strategies.initial_arrays(strategies.create(config, num_hospitals=2), config, initial)
    north, south = _context(0), _context(1)
    # Execute: two hospitals in one process, then north again
    sent = _train(config, global_arrays, north)
    _train(config, global_arrays, south)
    kept_after_1 = record_to_numpy(north.state[keys.KEPT_ARRAYS])  # type: ignore[arg-type]
    _train(config, {**global_arrays, **sent}, north, server_round=2)
    kept_after_2 = record_to_numpy(north.state[keys.KEPT_ARRAYS])  # type: ignore[arg-type]
    # Assert
    assert not any("lora_B" in k for k in sent) and any("lora_A" in k for k in sent)
    assert set(kept_after_1) == {k for k in initial if "lora_B" in k}
    assert any(np.abs(v).max() > 0 for v in kept_after_1.values())  # B trained, from zero
    south_kept = record_to_numpy(south.state[keys.KEPT_ARRAYS])  # type: ignore[arg-type]
    assert any(not np.allclose(kept_after_1[k], south_kept[k]) for k in kept_after_1)
    # Round 2 started from north's own B, not from south's or from zero: it moved on from round 1.
    assert any(not np.allclose(kept_after_1[k], kept_after_2[k]) for k in kept_after_1)


def test_rank_limited_hospital_trains_and_sends_only_its_components(tiny_csv_settings: dict[str, Any]) -> None:
    config = _config(tiny_csv_settings, "hetlora", **{"federation.client-ranks": (2, 4)})
    initial = _initial(config)
    sent = _train(config, initial, _context(0))
    for name, value in sent.items():
        if "lora_A" in name:
            assert value.shape == (2, initial[name].shape[1])
        if "lora_B" in name:
            assert value.shape == (initial[name].shape[0], 2)
            assert np.abs(value).max() > 0
    assert _train(config, initial, _context(1))[next(k for k in initial if "lora_A" in k)].shape[0] == 4


def test_train_local_rank_mask_and_proximal_term(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare
    config = _config(tiny_csv_settings, "fedavg", **{"train.local-steps": 5})
    workspace = workspace_for(config)
    model, initial = workspace.loaded.model, workspace.loaded.initial_state
    rows = workspace.hospital_rows("train", 0)

    def drift(**options: Any) -> dict[str, torch.Tensor]:
        masked = {k: (v.clone() if "lora_B" not in k else torch.full_like(v, 0.01)) for k, v in initial.items()}
        if options.get("rank"):
            masked = {k: torch.from_numpy(v) for k, v in strategies.ClientPlan(rank=options["rank"]).materialize(
                {k: v.numpy() for k, v in masked.items()}, {})[0].items()}
        set_adapter_state(model, masked)
        train_local(model, workspace.task, rows, workspace.loaded.tokenizer, spec=config.train,
                    device=workspace.loaded.device, plan=strategies.ClientPlan(**options))
        after = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k}
        set_adapter_state(model, initial)
        return {k: after[k] - masked[k.replace(".default", "")] for k in after}

    # Execute
    ranked = drift(rank=2)
    free = drift()
    held = drift(proximal_mu=1e4)
    # Assert: components past rank 2 did not move; the proximal term holds the adapter near its start.
    for name, delta in ranked.items():
        tail = delta[2:] if "lora_A" in name else delta[:, 2:]
        assert torch.count_nonzero(tail) == 0, name
    free_norm = sum(float(d.norm()) for d in free.values())
    held_norm = sum(float(d.norm()) for d in held.values())
    assert held_norm < 0.5 * free_norm


def test_folded_base_equals_the_exported_stacked_adapter(tiny_csv_settings: dict[str, Any], tmp_path: Path) -> None:
    # Prepare: a FLoRA global after one round of two hospitals of ranks 2 and 4
    from peft import PeftModel

    from fedfm.strategies import flora

    config = _config(tiny_csv_settings, "flora", **{"federation.client-ranks": (2, 4)})
    workspace = workspace_for(config)
    initial = _initial(config)
    strategy = strategies.create(config, num_hospitals=2)
    round0 = strategies.initial_arrays(strategy, config, initial)
    replies = [_train(config, round0, _context(0)), _train(config, round0, _context(1))]
    stacked = flora.stack(round0, replies, [3.0, 1.0])
    batch = workspace.loaded.tokenizer(["chest pain at rest", "no symptoms"], return_tensors="pt", padding=True)
    # Execute
    state, fold = load_global(workspace, config, stacked)
    folded_logits = workspace.loaded.model(**batch).logits.detach()
    export_adapter(workspace.loaded, state, tmp_path / "adapter", fold=fold)
    set_base_delta(workspace.loaded, {})
    plain_logits = workspace.loaded.model(**batch).logits.detach()
    # Assert: the exported rank-6 adapter, loaded with plain peft, is the folded model
    base = workspace.task.model_class().from_pretrained(config.model.name, **workspace.task.model_kwargs(num_labels=workspace.num_labels))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert reloaded.peft_config["default"].r == 6
    torch.testing.assert_close(reloaded(**batch).logits, folded_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain_logits, folded_logits)


def test_a_hospital_listed_as_hostile_sends_its_update_sign_flipped(tiny_csv_settings: dict[str, Any]) -> None:
    honest_config = _config(tiny_csv_settings, "fedavg")
    hostile_config = _config(tiny_csv_settings, "fedavg", **{"attack.hospitals": (1,), "attack.scale": 2.0})
    initial = _initial(honest_config)
    honest = _train(honest_config, initial, _context(1))
    hostile = _train(hostile_config, initial, _context(1))
    bystander = _train(hostile_config, initial, _context(0))
    for name in honest:
        np.testing.assert_allclose(hostile[name] - initial[name], -2.0 * (honest[name] - initial[name]), rtol=1e-3, atol=1e-6)
    assert any(not np.allclose(bystander[k], initial[k]) for k in bystander)
    np.testing.assert_allclose(bystander[next(iter(bystander))], _train(honest_config, initial, _context(0))[next(iter(bystander))])


def test_ffa_lora_learning_rate_scale_reaches_the_hospital_and_scales_its_step(tiny_csv_settings: dict[str, Any]) -> None:
    # Prepare: one plain SGD step, so a step is exactly -lr x gradient
    sgd = {"train.optimizer": "sgd", "train.momentum": 0.0, "train.local-steps": 1, "train.max-grad-norm": 0.0}
    steps = {}
    for scale in (1.0, 2.5):
        config = _config(tiny_csv_settings, "ffa-lora", **sgd, **{"strategy.ffa-learning-rate-scale": scale})
        initial = _initial(config)
        global_arrays = strategies.initial_arrays(strategies.create(config, num_hospitals=2), config, initial)
        # Execute
        sent = _train(config, global_arrays, _context(0))
        steps[scale] = {k: sent[k] - global_arrays[k] for k in sent}
    # Assert: the plan the server encodes carries the scale, and every trained tensor moved 2.5x as far
    plan = ClientPlan(fixed=("lora_A",), learning_rate_scale=2.5)
    assert decode_plan(encode_plans([plan]), 0) == plan
    assert any(np.abs(v).max() > 0 for v in steps[1.0].values())
    for name, step in steps[1.0].items():
        np.testing.assert_allclose(steps[2.5][name], 2.5 * step, rtol=1e-4, atol=1e-7)
