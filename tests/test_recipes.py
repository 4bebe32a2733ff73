"""Training recipes: learning-rate schedules (local and across rounds), class weights, accumulation, all-linear LoRA."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from fedfm import keys
from fedfm.config import LoraSpec, ModelSpec, RunConfig, TrainSpec, round_learning_rate
from fedfm.errors import ConfigError
from fedfm.tasks import get_task
from fedfm.train import (
    balanced_class_weights,
    log_class_prior,
    logit_adjustment,
    lr_factor,
    planned_steps,
    train_local,
    warmup_steps,
)


def _factors(schedule: str, total: int, warmup: float) -> list[float]:
    return [lr_factor(s, total, schedule=schedule, warmup_ratio=warmup) for s in range(total)]


def test_local_schedule_warms_up_then_decays() -> None:
    # 10 steps, 20% warm-up: 2 warm-up steps at 1/3 and 2/3, then the full rate decays over 8 steps.
    assert warmup_steps(10, 0.2) == 2 and warmup_steps(10, 0.0) == 0 and warmup_steps(3, 0.1) == 1
    linear = _factors("linear", 10, 0.2)
    assert linear[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert linear[-1] == pytest.approx(1 / 8)  # never 0: the last step still moves
    cosine = _factors("cosine", 10, 0.2)
    assert cosine[2] == pytest.approx(1.0) and cosine[6] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(cosine[2:]))
    assert _factors("constant", 10, 0.2)[2:] == [1.0] * 8
    assert _factors("constant", 4, 0.0) == [1.0] * 4


def test_round_learning_rate_decays_over_the_rounds_and_uses_dp_rate() -> None:
    config = RunConfig().replace(**{"train.learning-rate": 1e-3, "federation.num-rounds": 5,
                                    "federation.lr-decay": "cosine", "federation.lr-min-ratio": 0.1})
    rates = [round_learning_rate(config, r) for r in range(1, 7)]
    assert rates[0] == pytest.approx(1e-3) and rates[4] == pytest.approx(1e-4)
    assert rates[2] == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert rates[5] == pytest.approx(1e-4)  # a run extended on resume keeps the floor
    linear = config.replace(**{"federation.lr-decay": "linear"})
    assert round_learning_rate(linear, 2) == pytest.approx(1e-4 + 0.9e-3 * 0.75)
    assert round_learning_rate(config.replace(**{"federation.lr-decay": "none"}), 5) == pytest.approx(1e-3)
    dp = config.replace(**{"privacy.mode": "dp-sgd", "privacy.learning-rate": 0.1})
    assert round_learning_rate(dp, 5) == pytest.approx(0.01)


class _Grid:
    """Just enough of Flower's Grid: one node, which answers every instruction with what it was sent."""

    def __init__(self) -> None:
        self.train_configs: list[dict[str, Any]] = []

    def get_node_ids(self) -> list[int]:
        return [7]

    def send_and_receive(self, messages: Any, timeout: float) -> list[Any]:
        from flwr.app import MetricRecord, RecordDict

        from conftest import reply

        replies = []
        for msg in messages:
            kind = msg.metadata.message_type
            metrics = MetricRecord({keys.NUM_EXAMPLES: 4, keys.HOSPITAL_INDEX: 0})
            content = RecordDict({keys.METRICS: metrics})
            if kind.startswith("train"):
                self.train_configs.append(dict(msg.content[keys.CONFIG]))
                content[keys.ARRAYS] = msg.content[keys.ARRAYS]
            replies.append(reply(content, node_id=7, message_type=kind))
        return replies


def test_server_sends_each_rounds_learning_rate_in_the_train_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedfm.server import round_instructions
    from fedfm.strategies import GuardedStrategy
    from fedfm.wire import numpy_to_record

    # Prepare: the identity a ServerApp process has, so that the strategy can build messages
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    config = RunConfig().replace(**{"federation.num-rounds": 3, "federation.lr-decay": "linear",
                                    "federation.lr-min-ratio": 0.0, "federation.min-hospitals": 1})
    guard = GuardedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1), min_replies=1)
    grid = _Grid()
    # Execute: rounds 2 and 3, as a run resumed after round 1 would
    guard.run(grid, numpy_to_record({"w": np.zeros(2, np.float32)}), first_round=2, num_rounds=3, timeout=5,  # type: ignore[arg-type]
              retries=0, train_config=ConfigRecord({keys.RUN_CONFIG: "{}"}), evaluate_config=ConfigRecord({}),
              round_config=round_instructions(config))
    # Assert
    sent = [(c[keys.SERVER_ROUND], c[keys.LEARNING_RATE]) for c in grid.train_configs]
    assert sent == [(2, pytest.approx(2.5e-4)), (3, pytest.approx(0.0))]


def test_balanced_weights_come_from_the_hospitals_own_counts() -> None:
    weights = balanced_class_weights([0, 0, 0, 0, 0, 0, 1, 1], num_classes=3)
    # N / (K x N_c) with K = the 2 classes present; the absent class keeps 1.
    assert weights.tolist() == pytest.approx([8 / 12, 8 / 4, 1.0])
    labels = np.array([0] * 6 + [1] * 2)
    assert weights[labels].mean() == pytest.approx(1.0)


def _tiny_classifier(tiny_bert: Path, *, num_labels: int = 2) -> Any:
    """The tiny BERT with every dropout off, LoRA on query/value and a trained head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.0, target_modules=["query", "value"]))
    with torch.no_grad():  # B starts at 0; give it values so that A's gradients are not zero either
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def rows(tiny_bert: Path) -> tuple[Any, Dataset]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["chest pain at rest", "normal exercise test", "severe angina", "no symptoms at all",
             "st depression", "healthy", "typical angina with high cholesterol", "asymptomatic"]
    raw = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0, 1, 0, 1, 1]})
    return tokenizer, get_task("sequence-classification").tokenize(raw, tokenizer, max_length=32)


def test_class_weights_change_the_loss_as_a_mean_of_weighted_rows(tiny_bert: Path, rows: tuple[Any, Dataset]) -> None:
    tokenizer, data = rows
    task = get_task("sequence-classification")
    model = _tiny_classifier(tiny_bert).eval()
    batch = task.collate(tokenizer)([data[i] for i in range(len(data))])
    weights = torch.from_numpy(balanced_class_weights(data["labels"], 2))
    with torch.no_grad():
        plain = task.loss(model, batch)
        weighted = task.loss(model, {**batch, task.class_weights_key: weights})  # type: ignore[attr-defined]
        per_row = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]).logits,
                                                    batch["labels"], reduction="none")
    assert not torch.isclose(plain, weighted)
    assert weighted == pytest.approx(float((per_row * weights[batch["labels"]]).mean()), rel=1e-5)


def test_logit_adjustment_offsets_the_training_logits_by_the_hospitals_smoothed_log_prior() -> None:
    prior = log_class_prior([0, 0, 0, 0, 0, 0, 1, 1], num_classes=3)
    # log((N_c + 1) / (N + K)): a class the hospital lacks gets a finite, large negative offset
    assert prior.tolist() == pytest.approx(np.log([7 / 11, 3 / 11, 1 / 11]).tolist(), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_logit_adjustment_adds_tau_times_the_log_prior_inside_the_block_only(
    tiny_bert: Path, rows: tuple[Any, Dataset], tau: float
) -> None:
    tokenizer, data = rows
    model = _tiny_classifier(tiny_bert).eval()
    batch = get_task("sequence-classification").collate(tokenizer)([data[i] for i in range(len(data))])
    spec = TrainSpec(class_weights="logit-adjusted", logit_adjustment_tau=tau)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    plain = logits()
    with logit_adjustment(model, data, spec):
        adjusted = logits()
    prior = torch.from_numpy(log_class_prior(data["labels"], num_classes=2))
    torch.testing.assert_close(adjusted - plain, (tau * prior).expand_as(plain), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(), plain)


def test_a_hospital_with_one_class_barely_moves_the_head_under_logit_adjustment(
    tiny_bert: Path, rows: tuple[Any, Dataset]
) -> None:
    # A hospital holding only class 1 (label skew's worst case): plain training pushes the head towards class 1;
    # logit-adjusted training sees those rows as explained in part by its prior (five rows: an offset of
    # log(6/7) - log(1/7) = 1.8; a real hospital of 800 such rows gets 6.7), so the plain head moves much less.
    # The hook is gone after training.
    tokenizer, data = rows
    task = get_task("sequence-classification")
    only_ones = data.select([i for i, label in enumerate(data["labels"]) if label == 1])
    spec = TrainSpec(local_steps=20, batch_size=5, optimizer="sgd", momentum=0.0, learning_rate=0.5)
    shift = {}
    for mode in ("none", "logit-adjusted"):
        model = _tiny_classifier(tiny_bert).eval()
        batch = task.collate(tokenizer)([only_ones[i] for i in range(len(only_ones))])
        with torch.no_grad():
            before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        train_local(model, task, only_ones, tokenizer, spec=dataclasses.replace(spec, class_weights=mode),
                    device=torch.device("cpu"), seed=0)
        assert not any(m._forward_hooks for m in model.modules())
        with torch.no_grad():
            after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # How much more the model now favours class 1 over class 0, on average
        shift[mode] = float(((after[:, 1] - after[:, 0]) - (before[:, 1] - before[:, 0])).mean())
    assert shift["none"] > 1.0
    assert 0 < shift["logit-adjusted"] < 0.6 * shift["none"]


def test_accumulated_batches_make_the_same_step_as_one_big_batch(tiny_bert: Path, rows: tuple[Any, Dataset]) -> None:
    tokenizer, data = rows
    task = get_task("sequence-classification")
    base = TrainSpec(local_steps=1, optimizer="sgd", momentum=0.0, learning_rate=0.5, max_grad_norm=0.0,
                     class_weights="balanced")
    results = {}
    for name, spec in {"one batch of 8": dataclasses.replace(base, batch_size=8),
                       "2 x 4 accumulated": dataclasses.replace(base, batch_size=4, gradient_accumulation=2)}.items():
        model = _tiny_classifier(tiny_bert)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = train_local(model, task, data, tokenizer, spec=spec, device=torch.device("cpu"), seed=3)
        assert result.steps == 1 and result.examples == 8
        results[name] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    one, accumulated = results.values()
    assert max(float(v.abs().max()) for v in one.values()) > 1e-4  # the step did move the adapter
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-4, atol=1e-6)


def test_accumulation_counts_optimizer_steps() -> None:
    assert planned_steps(100, TrainSpec(batch_size=16)) == 7
    assert planned_steps(100, TrainSpec(batch_size=16, gradient_accumulation=4)) == 2
    assert planned_steps(100, TrainSpec(batch_size=16, gradient_accumulation=4, local_epochs=2)) == 4
    assert planned_steps(100, TrainSpec(batch_size=16, gradient_accumulation=4, local_steps=5)) == 5


def test_the_loop_applies_warmup_and_decay_at_each_optimizer_step(
    tiny_bert: Path, rows: tuple[Any, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedfm.train

    tokenizer, data = rows
    seen: list[float] = []
    make = fedfm.train.make_optimizer

    def recording(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
        optimizer = make(params, spec)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (seen.append(optimizer.param_groups[0]["lr"]), step(*a, **k))[1]  # type: ignore[method-assign]
        return optimizer

    monkeypatch.setattr(fedfm.train, "make_optimizer", recording)
    spec = TrainSpec(batch_size=2, gradient_accumulation=1, local_epochs=1, learning_rate=0.1,
                     lr_schedule="linear", warmup_ratio=0.25)
    result = train_local(_tiny_classifier(tiny_bert), get_task("sequence-classification"), data, tokenizer,
                         spec=spec, device=torch.device("cpu"))
    # 4 steps: 1 warm-up step at half the rate, then 1, 2/3, 1/3 of it.
    assert result.steps == 4
    assert seen == pytest.approx([0.05, 0.1, 0.1 * 2 / 3, 0.1 / 3])


def test_config_refuses_accumulation_and_class_weights_under_dp_sgd() -> None:
    # The configuration is the one place that refuses them; train_local does not check again.
    with pytest.raises(ConfigError) as refused:
        RunConfig().replace(**{"privacy.mode": "dp-sgd", "train.gradient-accumulation": 4,
                               "train.class-weights": "balanced"})
    message = str(refused.value)
    assert "`train.gradient-accumulation` must be 1 with `privacy.mode` 'dp-sgd', got 4" in message
    assert "raise `privacy.batch-size` instead" in message
    assert "`train.class-weights` must be 'none' with `privacy.mode` 'dp-sgd'" in message


def test_config_refuses_row_copying_under_dp_sgd() -> None:
    # DP-SGD's ε is per training row: anything that puts one record into several rows would multiply it.
    with pytest.raises(ConfigError) as refused:
        RunConfig().replace(**{"privacy.mode": "dp-sgd", "data.dataset": "pubmedqa", "model.task": "causal-qa",
                               "data.augment": "conclusion"})
    assert "`data.augment` must be 'none' with `privacy.mode` 'dp-sgd', got 'conclusion'" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        RunConfig().replace(**{"privacy.mode": "dp-sgd", "data.dataset": "nicta_piboso", "data.context": "neighbours"})
    assert "`data.context` must be 'none' with `privacy.mode` 'dp-sgd', got 'neighbours'" in str(refused.value)


def test_config_names_each_recipe_field_and_its_allowed_values() -> None:
    with pytest.raises(ConfigError) as bad:
        RunConfig().replace(**{"train.lr-schedule": "step", "train.warmup-ratio": 1.0,
                               "train.gradient-accumulation": 0, "train.class-weights": "inverse",
                               "federation.lr-decay": "exponential", "federation.lr-min-ratio": 2.0,
                               "lora.target-modules": "all-linear,query"})
    message = str(bad.value)
    for expected in (
        "`train.lr-schedule` must be one of ['constant', 'linear', 'cosine'], got 'step'",
        "`train.warmup-ratio` must be in [0, 1), got 1.0",
        "`train.gradient-accumulation` must be >= 1, got 0",
        "`train.class-weights` must be one of ['none', 'balanced', 'logit-adjusted'], got 'inverse'",
        "`federation.lr-decay` must be one of ['none', 'linear', 'cosine'], got 'exponential'",
        "`federation.lr-min-ratio` must be in [0, 1], got 2.0",
        "`lora.target-modules` 'all-linear' must be the only entry, got ['all-linear', 'query']",
    ):
        assert expected in message
    with pytest.raises(ConfigError, match="needs `model.task` 'sequence-classification'"):
        RunConfig().replace(**{"train.class-weights": "balanced", "model.task": "token-classification",
                               "data.dataset": "ncbi_disease"})


@pytest.mark.parametrize("task_name", ["sequence-classification", "token-classification"])
def test_all_linear_adapts_every_linear_layer_but_the_head(tiny_bert: Path, task_name: str) -> None:
    from peft.tuners.lora import LoraLayer

    from fedfm.adapters import get_adapter_state, load_model, set_adapter_state

    task = get_task(task_name)
    loaded = load_model(ModelSpec(name=str(tiny_bert), task=task_name, pooling="cls"),
                        LoraSpec(r=2, target_modules=("all-linear",)),
                        task, num_labels=3)
    fresh = task.model_class().from_pretrained(tiny_bert, num_labels=3)
    linear = {n for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)}
    adapted = {n for n, m in loaded.model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert "classifier" in linear and len(adapted) >= 12
    assert adapted == linear - {"classifier"}  # the head trains in full, never also as a LoRA
    state = loaded.initial_state
    assert sum(".classifier." in k for k in state) == 2  # weight and bias, once
    assert not any("classifier" in k and "lora_" in k for k in state)
    # The exchanged state goes through an aggregate (the mean of two hospitals' adapters) and back.
    mean = {k: (v + (v + 1.0)) / 2 for k, v in state.items()}
    set_adapter_state(loaded.model, mean)
    for name, value in get_adapter_state(loaded.model).items():
        torch.testing.assert_close(value, mean[name])
    set_adapter_state(loaded.model, state)
