"""The medical benchmark: answer extraction, FlowerTune's prompts, the end-to-end command and its refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fedfm.benchmark import (
    BENCHMARKS,
    BenchmarkError,
    Question,
    build_prompt,
    chat_texts,
    extract_decision,
    extract_letter,
    generate_answers,
    load_questions,
)
from fedfm.cli import main

# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(("text", "n_options", "expected"), [
    ("B", 4, "B"),
    ("B. Venturi mask", 4, "B"),
    ("c) Overstimulation of respiratory centre", 4, "C"),
    ("(D) Distal esophagus", 4, "D"),
    ("**C**", 4, "C"),
    ("A\n\nThe answer is A because beta blockers ...", 4, "A"),
    ("The answer is (B)", 4, "B"),
    ("The answer is: D.", 4, "D"),
    ("The correct answer is (c).", 4, "C"),
    ("Answer: C", 4, "C"),
    ("The correct option is option A", 4, "A"),
    ("I would choose (D) here", 4, "D"),
    ("Answer:\n## B", 4, "B"),
    ("E. Refuse to dictate the operative report", 5, "E"),
    # Not an answer: an article, a letter past the options, no letter at all, two bracketed letters
    ("A patient with these findings needs surgery", 4, None),
    ("the answer is a drug of choice", 4, None),
    ("E. None of the above", 4, None),
    ("Either (A) or (B)", 4, None),
    ("It's a beta blocker", 4, None),
    ("", 4, None),
])
def test_letters_are_read_from_real_looking_answers(text: str, n_options: int, expected: str | None) -> None:
    assert extract_letter(text, n_options) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("No", "no"),
    ("Yes.", "yes"),
    ("maybe", "maybe"),
    ("YES!", "yes"),
    ("yesyes", "yes"),
    ("No, mitochondria play a role in remodelling lace plant leaves", "no"),
    ("The answer is: no", "no"),
    ("The answer is maybe.", "maybe"),
    ('Answer: "yes"', "yes"),
    ("Answer:\n## Yes", "yes"),
    ("The long-term results of the transanal pull-through are not equal", None),
    ("The answer is:\nThe model to teach retroperitoneoscopic", None),
    ("Nothing suggests it", None),
    ("Not sure", None),
    ("", None),
])
def test_decisions_are_read_from_real_looking_answers(text: str, expected: str | None) -> None:
    assert extract_decision(text) == expected


# ------------------------------------------------------------------------------------------------ prompts


def test_a_multiple_choice_prompt_is_flowertunes_instruction_question_options_and_answer_cue() -> None:
    question = Question(question="Drug of choice in absence seizures", context="", options=("Valproate", "Phenytoin"),
                        label=0)
    prompt = build_prompt(BENCHMARKS["medmcqa"], question)
    assert prompt == (
        f"{BENCHMARKS['medmcqa'].instruction}\n"
        "Question: Drug of choice in absence seizures?\n\nOptions:\nA. Valproate\nB. Phenytoin\n"
        "The answer is:\n"
    )
    assert BENCHMARKS["medmcqa"].instruction.endswith(
        "Select one correct answer from A to D. Base your answer on the current and standard practices referenced "
        "in medical guidelines.")
    assert "from A to E" in BENCHMARKS["medqa"].instruction


def test_a_pubmedqa_prompt_puts_the_abstract_before_the_question() -> None:
    question = Question(question="Do statins help?", context="Background. Methods.", options=("yes", "no", "maybe"),
                        label=1)
    prompt = build_prompt(BENCHMARKS["pubmedqa"], question)
    assert prompt == f"{BENCHMARKS['pubmedqa'].instruction}\nBackground. Methods.\nDo statins help?\nThe answer is:\n"
    assert "Answer yes, no, or maybe." in prompt


def test_the_chat_template_wraps_the_prompt_as_the_users_turn(smol_tokenizer: Any) -> None:
    (text,) = chat_texts(smol_tokenizer, ["Q?\nThe answer is:\n"])
    assert "<|im_start|>user\nQ?\nThe answer is:\n<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_tokenizer_without_a_chat_template_gets_flowertunes_wrapper(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    assert chat_texts(tokenizer, ["Q?"]) == ["<|im_start|>question\nQ?<|im_end|>\n<|im_start|>answer\n"]


def test_questions_are_the_official_sets_and_limit_takes_the_first() -> None:
    assert [len(load_questions(BENCHMARKS[n])) for n in ("pubmedqa", "medmcqa", "medqa")] == [500, 4183, 1273]
    first = load_questions(BENCHMARKS["medmcqa"], limit=2)
    assert first == load_questions(BENCHMARKS["medmcqa"])[:2]
    assert len(first[0].options) == 4 and first[0].context == ""
    with pytest.raises(BenchmarkError, match="--limit must be an integer >= 1"):
        load_questions(BENCHMARKS["medqa"], limit=0)


def test_left_padded_batches_answer_as_each_prompt_alone(tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    texts = chat_texts(tokenizer, ["Short?", "A much longer question about the heart and the lungs?", "Mid one?"])
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "device": torch.device("cpu")}
    together = generate_answers(model, tokenizer, texts, batch_size=3, **kwargs)
    alone = generate_answers(model, tokenizer, texts, batch_size=1, **kwargs)
    assert together == alone


# ------------------------------------------------------------------------------------------------ the command


def test_evaluate_benchmark_writes_a_table_and_json_that_agree(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores" / "results.json"
    # Execute
    status = main(["evaluate", "--benchmark", "medical", "--model", str(tiny_llama_dir), "--limit", "3",
                   "--batch-size", "2", "--out", str(out)])
    # Assert
    printed, err = capsys.readouterr()
    assert status == 0
    assert "progress: medmcqa generate 3/3 (100%)" in err and "progress: medqa likelihood 3/3 (100%)" in err
    data = json.loads(out.read_text())
    assert data["limit"] == 3 and data["model_kind"] == "base" and list(data["benchmarks"]) == [
        "pubmedqa", "medmcqa", "medqa"]
    available = {"pubmedqa": 500, "medmcqa": 4183, "medqa": 1273}
    for name, score in data["benchmarks"].items():
        answers = score["answers"]
        assert score["questions"] == len(answers) == 3 and score["available"] == available[name]
        assert score["subset"] is True
        assert score["generative_correct"] == sum(a["correct"] for a in answers)
        assert score["unparsed"] == sum(a["extracted"] is None for a in answers)
        assert score["generative_accuracy"] == pytest.approx(score["generative_correct"] / 3)
        assert 0 <= score["likelihood_correct"] <= 3
        assert all(a["correct"] == (a["extracted"] == a["gold"]) for a in answers)
        row = next(line for line in printed.splitlines() if line.startswith(name))
        assert row.split() == [name, "3", "of", str(available[name]), f"{100 * score['generative_accuracy']:.1f}%",
                               str(score["unparsed"]), f"{100 * score['likelihood_accuracy']:.1f}%"]
    assert "subset: the first 3 questions of each benchmark" in printed
    assert f"scores: {out}" in printed


def _error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("fedfm: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--benchmark", "dental"], "--benchmark must be one of ['medical'], got 'dental'"),
    (["--benchmark", "medical", "--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
    (["--benchmark", "medical", "--input", "rows.csv"], "--input cannot go with it"),
    (["--benchmark", "medical", "--model", "smollm2-135m", "--adapter", "run/adapter"], "not both"),
    (["--benchmark", "medical", "--out", "scores.csv"], "the suffix must be one of ['.json']"),
    (["--benchmark", "medical", "--model", "/no/such/model"], "neither a known alias"),
    (["--benchmark", "medical", "--base-model", "/some/base"], "--base-model goes with an exported adapter folder"),
    (["--model", "smollm2-135m"], "--model and --limit go with --benchmark"),
    (["--adapter", "run/adapter"], "the following arguments are required: --input"),
    ([], "the following arguments are required: --adapter, --input"),
])
def test_mistakes_are_one_error_line_and_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _error_line(["evaluate", *extra], capsys)


def test_a_model_that_cannot_generate_is_refused_before_it_loads(
    tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error_line(["evaluate", "--benchmark", "medical", "--model", str(tiny_bert)], capsys)
    assert re.search(r"\['BertModel'\] is not a causal language model", line)


def _export_folder(folder: Path, base: Path, task: str) -> Path:
    """An exported adapter folder of ``task`` over ``base``, as a fedfm run writes one (LoRA at its initial state)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedfm.export import ExportSettings

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    settings = ExportSettings(task=task, base_model=str(base), label_names=["A", "B", "C", "D"],
                              input_format="multiple-choice", max_length=256)
    (folder / "fedfm.json").write_text(json.dumps(settings.to_json()))
    return folder


def test_an_exported_adapter_folder_is_scored_through_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from fedfm.benchmark import evaluate_suite

    adapter = _export_folder(tmp_path / "adapter", tiny_llama_dir, "causal-qa")
    # Execute: the untrained adapter leaves the base model's answers as they were
    through_adapter = evaluate_suite(model=str(adapter), limit=2, batch_size=2, progress=False)
    base = evaluate_suite(model=str(tiny_llama_dir), limit=2, batch_size=2, progress=False)
    # Assert
    assert through_adapter.model_kind == "exported" and base.model_kind == "base"
    assert [s.answers for s in through_adapter.scores] == [s.answers for s in base.scores]
    assert [s.likelihood_correct for s in through_adapter.scores] == [s.likelihood_correct for s in base.scores]


def test_an_exported_classifier_is_refused_before_it_loads(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _export_folder(tmp_path / "adapter", tiny_llama_dir, "sequence-classification")
    (folder / "adapter_model.safetensors").write_bytes(b"cut")  # would fail loudly if anything tried to load it
    line = _error_line(["evaluate", "--benchmark", "medical", "--adapter", str(folder)], capsys)
    assert "the exported folder's task is 'sequence-classification', not a causal LM" in line
