"""Instruction tuning of a causal LM: the data, the chat template, the loss mask, and federations of every kind."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from fedfm.config import RunConfig
from fedfm.data import build_federation, load_source
from fedfm.data.instruction import MEDICAL_MEADOW, MEDICAL_MEADOW_TOPICS, alpaca_messages, question_kind
from fedfm.errors import ConfigError, DataError
from fedfm.tasks import get_task
from fedfm.tasks.causal_qa import IGNORE_INDEX, pad_right
from fedfm.tasks.instruction_tuning import InstructionTuning, render

TASK = InstructionTuning()
CHAT = [
    {"role": "system", "content": "You answer patients' questions."},
    {"role": "user", "content": "What causes asthma?"},
    {"role": "assistant", "content": "Inflamed airways."},
    {"role": "user", "content": "Is it contagious?"},
    {"role": "assistant", "content": "No."},
]


# -- data ---------------------------------------------------------------------------------------------------------


def test_medical_meadow_is_split_by_condition_with_topics() -> None:
    source = load_source(MEDICAL_MEADOW)
    assert len(source.train) + len(source.test) == 5942
    assert 0.08 < len(source.test) / 5942 < 0.13
    assert source.label_names == MEDICAL_MEADOW_TOPICS and source.group_column == "group"
    condition = lambda group: group.split(" ", 1)[1]  # "0001 allergy" -> "allergy"
    assert not {condition(g) for g in source.train["group"]} & {condition(g) for g in source.test["group"]}
    row = source.train[0]
    assert row["messages"] == [
        {"role": "user", "content": "Answer this question truthfully\n\nWhat are the symptoms of Allergy?"},
        {"role": "assistant", "content": row["messages"][1]["content"]},
    ]
    assert MEDICAL_MEADOW_TOPICS[row["label"]] == "symptoms"
    # The near-duplicate wording recurs for hundreds of conditions, never on both sides for one condition.
    urgent = [q for q in source.test["question"] if q.startswith("When to seek urgent medical care")]
    assert len(urgent) > 50


@pytest.mark.parametrize(("question", "expected"), [
    ("What are the symptoms of Allergy?", ("symptoms", "allergy")),
    ("What causes Buerger%27s disease?", ("causes", "buerger's disease")),
    ("When to seek urgent medical care when I have Asthma ?", ("urgent-care", "asthma")),
    ("What to expect if I have Allergy  (Outlook/Prognosis)?", ("outlook", "allergy")),
    ("Who is at highest risk for Dermatitis herpetiformis ?", ("risk", "dermatitis herpetiformis")),
    ("How is the Skin allergy testing done?", ("other", None)),
])
def test_question_kinds_and_conditions(question: str, expected: tuple[str, str | None]) -> None:
    assert question_kind(question) == expected


def test_hospitals_never_share_a_condition_and_their_splits_keep_conditions_whole() -> None:
    source = load_source(MEDICAL_MEADOW)
    federation = build_federation(source, partitioner="dirichlet", num_hospitals=4, alpha=0.5, seed=3,
                                  validation_fraction=0.1)
    seen: dict[str, str] = {}
    for hospital in federation.hospitals:
        sides = {side: set(getattr(hospital, side)["group"]) for side in ("train", "validation", "test")}
        assert not sides["train"] & sides["test"] and not sides["train"] & sides["validation"]
        assert not sides["validation"] & sides["test"]
        for group in set().union(*sides.values()):
            assert seen.setdefault(group, hospital.name) == hospital.name, f"{group} is in two hospitals"
    assert len(federation.global_test) == len(source.test)


def test_files_of_alpaca_and_chat_rows(tmp_path: Path) -> None:
    alpaca = tmp_path / "pairs.jsonl"
    alpaca.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Summarize the report.", "input": "CT: no bleed.", "output": "Normal CT.", "site": "a"},
        {"instruction": "Define sepsis.", "output": "A dysregulated response to infection.", "site": "b"},
    ]) + "\n")
    source = load_source("jsonl", path=alpaca, kind="instruction", label_column="site")
    assert source.train["messages"][0] == alpaca_messages("Summarize the report.", "CT: no bleed.", "Normal CT.")
    assert source.train["messages"][1][0] == {"role": "user", "content": "Define sepsis."}
    assert source.label_names == ["a", "b"] and source.train["label"] == [0, 1]
    # Other columns stay: hospitals by a site column of one's own.
    by_site = load_source("jsonl", path=alpaca, kind="instruction")
    assert by_site.label_names == ["all"] and by_site.train["site"] == ["a", "b"]
    federation = build_federation(by_site, partitioner="natural", num_hospitals=None, column="site", test_fraction=0.5)
    assert [h.name for h in federation.hospitals] == ["a", "b"]
    chats = tmp_path / "chats.csv"
    Dataset.from_dict({"messages": [json.dumps(CHAT)], "group": ["g1"]}).to_csv(chats)
    source = load_source("csv", path=chats, kind="instruction")
    assert source.train["messages"][0] == CHAT and source.group_column == "group"
    assert source.label_names == ["all"]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "x", "label": 1}], "neither a `messages` column"),
    ([{"instruction": "Define sepsis.", "output": " "}], "row 0: `output` must be non-empty text"),
    ([{"messages": [{"role": "doctor", "content": "hi"}]}], "turn 0 must have a `role`"),
    ([{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]}],
     "the last turn must be the assistant's"),
    ([{"messages": [{"role": "system", "content": "be kind"}, {"role": "assistant", "content": "ok"}]}],
     "needs a user turn"),
])
def test_bad_instruction_files_name_row_and_rule(rows: list[dict[str, Any]], message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=message):
        load_source("jsonl", path=path, kind="instruction")


def test_the_task_and_the_dataset_go_together() -> None:
    with pytest.raises(ConfigError, match="needs instruction/response rows"):
        RunConfig().replace(**{"model.task": "instruction-tuning", "data.dataset": "pubmedqa"})
    with pytest.raises(ConfigError, match="needs `model.task` 'instruction-tuning'"):
        RunConfig().replace(**{"data.dataset": MEDICAL_MEADOW})
    with pytest.raises(ConfigError, match="select-metric` must be 'loss'"):
        RunConfig().replace(**{"model.task": "instruction-tuning", "data.dataset": MEDICAL_MEADOW,
                               "data.validation-fraction": 0.1, "federation.select-best": "validation",
                               "federation.select-metric": "accuracy"})


# -- the chat template and the loss mask ----------------------------------------------------------------------------


def test_labels_are_exactly_the_assistant_turns(smol_tokenizer: Any) -> None:
    encoded = TASK.encode_rows([CHAT], smol_tokenizer, max_length=512)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    # The whole conversation is the template's rendering, token for token.
    assert smol_tokenizer.decode(ids) == render(smol_tokenizer, CHAT, generation_prompt=False)
    kept = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(kept) == "Inflamed airways.<|im_end|>\nNo.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # What the model is prompted with when it generates the first answer is the start of the training row.
    prompt = TASK.prompt_ids(smol_tokenizer, CHAT[:2])
    assert ids[: len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[: len(prompt)])


def test_a_long_prompt_is_cut_before_the_response(smol_tokenizer: Any) -> None:
    long = [{"role": "user", "content": "Background: " + "the patient reports fatigue. " * 200 + "Diagnosis?"},
            {"role": "assistant", "content": "Anaemia."}]
    encoded = TASK.encode_rows([long], smol_tokenizer, max_length=64)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    assert len(ids) == 64
    text = smol_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\nAnaemia.<|im_end|>\n")
    assert "Diagnosis?" in text
    assert smol_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Anaemia.<|im_end|>\n"
    # A response longer than the room is cut at its end, and the prompt keeps half of max_length.
    huge = [long[0], {"role": "assistant", "content": "iron deficiency " * 100}]
    encoded = TASK.encode_rows([huge], smol_tokenizer, max_length=64)
    labels = encoded["labels"][0]
    assert len(labels) == 64 and sum(t == IGNORE_INDEX for t in labels) == 32


def test_a_model_without_a_chat_template_gets_the_plain_one(smol_tokenizer: Any) -> None:
    plain = copy.deepcopy(smol_tokenizer)
    plain.chat_template = None
    encoded = TASK.encode_rows([CHAT[1:3]], plain, max_length=128)
    text = plain.decode(encoded["input_ids"][0])
    assert text == f"<|user|>\nWhat causes asthma?\n<|assistant|>\nInflamed airways.\n{plain.eos_token}"


def test_loss_is_each_rows_mean_then_the_mean_over_rows(smol_tokenizer: Any, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]
    long = [{"role": "user", "content": "Explain."}, {"role": "assistant", "content": "A long answer " * 20}]
    encoded = TASK.encode_rows([short, long], smol_tokenizer, max_length=256)
    batch = pad_right(encoded["input_ids"], encoded["labels"], smol_tokenizer.pad_token_id)
    ours = TASK.loss(model, batch)
    # transformers' own loss of each row alone (token mean) -> the mean of the two, not the token mean of both.
    alone = [model(input_ids=torch.tensor([i]), labels=torch.tensor([lab])).loss
             for i, lab in zip(encoded["input_ids"], encoded["labels"])]
    torch.testing.assert_close(ours, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-5)


def test_training_learns_the_responses_and_evaluate_is_batch_independent(
    smol_tokenizer: Any, tiny_llama_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from fedfm.config import TrainSpec
    from fedfm.train import train_local

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = Dataset.from_dict({"messages": [
        [{"role": "user", "content": f"Dose for patient {i}?"}, {"role": "assistant", "content": "Ten milligrams."}]
        for i in range(8)
    ]})
    data = get_task("instruction-tuning").tokenize(rows, smol_tokenizer, max_length=96)
    before = TASK.evaluate(model, data, smol_tokenizer, batch_size=8, device=torch.device("cpu"))
    assert before["perplexity"] == pytest.approx(math.exp(before["loss"]))
    assert TASK.evaluate(model, data, smol_tokenizer, batch_size=3, device=torch.device("cpu")) == pytest.approx(before)
    train_local(model, TASK, data, smol_tokenizer, spec=TrainSpec(learning_rate=3e-2, local_epochs=8, batch_size=4),
                device=torch.device("cpu"), dtype="float32", seed=0)
    after = TASK.evaluate(model, data, smol_tokenizer, batch_size=8, device=torch.device("cpu"))
    assert after["loss"] < 0.5 * before["loss"] and after["token-accuracy"] > before["token-accuracy"]
    losses = TASK.example_losses(model, data, smol_tokenizer, batch_size=5, device=torch.device("cpu"))
    assert losses.shape == (8,) and np.all(losses > 0)


# -- federations --------------------------------------------------------------------------------------------------


def _meadow(tiny_llama_dir: Path, **overrides: Any) -> RunConfig:
    settings = {
        "model.name": str(tiny_llama_dir),
        "model.task": "instruction-tuning",
        "model.max-length": 96,
        "data.dataset": MEDICAL_MEADOW,
        "data.partitioner": "iid",
        "data.num-hospitals": 3,
        "data.max-train-per-hospital": 6,
        "data.max-test": 4,
        "train.batch-size": 3,
        "train.learning-rate": 1e-2,
        "federation.num-rounds": 2,
    }
    return RunConfig().replace(**{**settings, **overrides})


def _changed(run: Any, config: RunConfig) -> bool:
    """Whether the run's global adapter moved away from the initial one."""
    from fedfm.rundir.checkpoint import read_checkpoint
    from fedfm.workspace import workspace_for

    initial = workspace_for(config).loaded.initial_state
    arrays = read_checkpoint(run.run_dir).arrays
    return any(not np.array_equal(arrays[k], initial[k].numpy()) for k in arrays if k in initial)


@pytest.mark.integration
@pytest.mark.parametrize("overrides", [
    {"federation.strategy": "ffa-lora"},
    {"federation.strategy": "fedsa-lora"},
    {"federation.strategy": "flora", "federation.client-ranks": (2, 4, 3)},
    {"federation.strategy": "hetlora", "federation.client-ranks": (2, 4, 3)},
    {"compression.method": "int8"},
    {"privacy.secure-aggregation": True, "federation.num-rounds": 1},
    {"attack.hospitals": [2], "attack.kinds": ["nan"], "federation.min-hospitals": 2},
], ids=["ffa-lora", "fedsa-lora", "flora", "hetlora", "int8", "secagg", "nan-hospital"])
def test_every_kind_of_federation_instruction_tunes(overrides: dict[str, Any], tiny_llama_dir: Path,
                                                    tmp_path: Path) -> None:
    import fedfm

    config = _meadow(tiny_llama_dir, **overrides)
    result = fedfm.run(config, out=tmp_path / "run")
    assert result.summary["rounds"] == config.federation.num_rounds
    for metrics in [result.final_global, *result.final_per_hospital.values()]:
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"])) and metrics["loss"] > 0
    for entry in result.history:
        assert entry["aggregated"] is True
        if "attack.hospitals" in overrides:
            assert [("hospital 2" in who, "NaN" in why) for who, why in entry["left_out"].items()] == [(True, True)]
    assert _changed(result, config) or overrides.get("federation.strategy") == "flora"  # FLoRA folds into the base


def test_dp_per_example_gradients_are_whole_conversations(smol_tokenizer: Any, tiny_llama_dir: Path) -> None:
    """Opacus's per-example gradient of a row is the gradient of that conversation's whole response loss."""
    from opacus.grad_sample import GradSampleModule
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), lora)
    conversations = [CHAT[1:3], [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "Ten mg daily."}]]
    encoded = TASK.encode_rows(conversations, smol_tokenizer, max_length=128)
    params = [p for p in model.parameters() if p.requires_grad]
    alone = []
    for row in range(2):
        model.zero_grad()
        TASK.loss(model, pad_right(encoded["input_ids"][row:row + 1], encoded["labels"][row:row + 1], 0)).backward()
        alone.append([p.grad.clone() for p in params])
    model.zero_grad()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        TASK.loss(wrapped, pad_right(encoded["input_ids"], encoded["labels"], 0)).backward()
        for i, p in enumerate(params):
            assert p.grad_sample.shape[0] == 2  # one gradient per conversation, not per token
            for row in range(2):
                torch.testing.assert_close(p.grad_sample[row], alone[row][i], rtol=1e-4, atol=1e-6)
    finally:
        wrapped._close()


@pytest.mark.integration
def test_dp_sgd_instruction_tunes_and_its_epsilon_is_recomputed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    import fedfm
    from fedfm.privacy.accounting import HospitalLedger
    from fedfm.privacy.hospital import LEDGER_FILE

    config = _meadow(tiny_llama_dir, **{
        "privacy.mode": "dp-sgd", "privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 1000.0,
        "train.local-steps": 2, "data.max-train-per-hospital": 12, "data.num-hospitals": 2,
    })
    result = fedfm.run(config, out=tmp_path / "dp")
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    spent = [line["privacy"]["sample_level_epsilon"]["hospital-0"] for line in lines]
    assert 0 < spent[0] < spent[1]
    row = result.summary["privacy"]["hospitals"]["hospital-0"]
    stored = HospitalLedger.load(result.run_dir / "hospitals" / "hospital-0" / LEDGER_FILE)
    assert stored is not None and stored.steps == row["steps"] == 4
    accountant = RDPAccountant()
    accountant.history = [(1.0, stored.sample_rate, 4)]
    assert accountant.get_epsilon(stored.delta) == pytest.approx(row["epsilon"], rel=1e-6) == pytest.approx(spent[1])


@pytest.mark.integration
def test_an_instruction_run_resumes_to_the_uninterrupted_adapter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import fedfm
    from fedfm.rundir.checkpoint import read_checkpoint

    whole = fedfm.run(_meadow(tiny_llama_dir, **{"data.num-hospitals": 2}), out=tmp_path / "whole")
    first = fedfm.run(_meadow(tiny_llama_dir, **{"data.num-hospitals": 2, "federation.num-rounds": 1}),
                      out=tmp_path / "part")
    assert first.summary["rounds"] == 1
    resumed = fedfm.run(_meadow(tiny_llama_dir, **{"data.num-hospitals": 2}), resume=tmp_path / "part")
    a, b = read_checkpoint(whole.run_dir).arrays, read_checkpoint(resumed.run_dir).arrays
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
