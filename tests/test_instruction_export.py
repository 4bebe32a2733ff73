"""Export, predict, evaluate and report for an instruction-tuned model (issue 25).

One short real federation (a tiny random Llama with SmolLM2's tokenizer and
chat template, Medical Meadow, two hospitals, one round, merged model on)
provides the folders every test reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from fedfm.config import RunConfig
from fedfm.errors import DataError
from fedfm.export import ExportSettings, write_model_card
from fedfm.predict import GenerationError, evaluate_file, predict_file

pytestmark = pytest.mark.integration

QUESTION = "What are the symptoms of asthma?"  # the card's example prompt
NEW_TOKENS = 64  # the card's snippet generates this many


@pytest.fixture(scope="module")
def run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import fedfm

    config = RunConfig().replace(**{
        "model.name": str(tiny_llama_dir), "model.task": "instruction-tuning", "model.max-length": 96,
        "data.dataset": "medical_meadow_wikidoc_patient", "data.partitioner": "iid", "data.num-hospitals": 2,
        "data.max-train-per-hospital": 8, "data.max-test": 6, "train.batch-size": 4, "train.learning-rate": 5e-3,
        "federation.num-rounds": 1, "output.merged-model": True,
    })
    return fedfm.run(config, out=tmp_path_factory.mktemp("instruction-export") / "run", progress=False)


@pytest.fixture(scope="module")
def global_test(run: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's global test conversations as a colleague's JSON-lines file of chat rows."""
    from fedfm.config import load_config
    from fedfm.workspace import federation_for

    rows = federation_for(load_config(run.run_dir / "config.toml").data).global_test
    path = tmp_path_factory.mktemp("rows") / "held_out.jsonl"
    pd.DataFrame({"messages": rows["messages"]}).to_json(path, orient="records", lines=True)
    return path


def _snippet(card: str) -> str:
    match = re.search(r"```python\n(.*?)```", card, re.DOTALL)
    assert match, "the card has no Python snippet"
    return match.group(1)


def test_folder_records_generation_and_the_card_reports_loss_and_perplexity(run: Any) -> None:
    summary = run.summary
    settings = ExportSettings.read(run.adapter_dir)
    card = (run.adapter_dir / "README.md").read_text()
    assert (settings.task, settings.input_format, settings.chat_template) == ("instruction-tuning", "chat", True)
    assert settings.label_names == [] and settings.max_length == 96 and settings.pooling == ""
    assert "pipeline_tag: text-generation" in card and "split by condition" in card
    assert "| evaluated on | rows | loss | perplexity | token accuracy |" in card
    assert "accuracy | macro-F1" not in card and "Labels (id order)" not in card
    final, before = summary["final"]["global"], summary["initial"]["global"]
    rows = summary["global_test_rows"]
    assert f"| global test set | {rows} | {final['loss']:.3f} | {final['perplexity']:.3f} |" in card
    assert f"| global test set, before training | {rows} | {before['loss']:.3f} | {before['perplexity']:.3f} |" in card
    for name, m in summary["final"]["per_hospital"].items():
        assert f"| {name} | {int(m['num-examples'])} | {m['loss']:.3f} | {m['perplexity']:.3f} |" in card
    snippet = _snippet(card)
    assert "apply_chat_template(messages, add_generation_prompt=True" in snippet and "import fedfm" not in snippet
    assert "--input prompts.jsonl --output answers.jsonl" in card


def test_card_snippets_generate_what_fedfm_predict_generates(run: Any, tmp_path: Path) -> None:
    # Prepare: the card's question among longer prompts of the three row kinds, in one left-padded batch
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Answer this question truthfully", "input": "Who is at risk for gout and why, in detail?"},
        {"prompt": QUESTION},
        {"messages": [{"role": "system", "content": "Answer in one sentence."},
                      {"role": "user", "content": "What causes a migraine?"}]},
    ]) + "\n")
    # Execute: each folder's snippet from the run directory, where the card names its folder; then fedfm predict
    printed = []
    here = Path.cwd()
    try:
        os.chdir(run.run_dir)
        for folder in ("adapter", "merged"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(_snippet((run.run_dir / folder / "README.md").read_text()), {})  # noqa: S102 -- the card's code
            printed.append(out.getvalue().strip())
    finally:
        os.chdir(here)
    rows, predictions, _ = predict_file(run.adapter_dir, prompts, output=tmp_path / "answers.jsonl",
                                        max_new_tokens=NEW_TOKENS, batch_size=3)
    written = pd.read_json(tmp_path / "answers.jsonl", lines=True)
    # Assert: plain transformers + peft, the merged model and fedfm's batched greedy decoding agree
    assert printed[0] == printed[1] and printed[0]
    assert predictions.answers[1] == printed[0]
    assert list(written["response"]) == predictions.answers and len(rows.prompts) == 3
    assert rows.prompts[0][0]["content"] == "Answer this question truthfully\n\nWho is at risk for gout and why, in detail?"


def test_evaluate_reproduces_the_runs_final_global_loss(run: Any, global_test: Path, tmp_path: Path) -> None:
    metrics = evaluate_file(run.adapter_dir, global_test, output=tmp_path / "m.json")
    final = run.summary["final"]["global"]
    assert metrics["rows"] == run.summary["global_test_rows"]
    for key in ("loss", "perplexity", "token-accuracy"):
        assert metrics[key] == pytest.approx(final[key], rel=1e-4, abs=1e-6)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_merged_model_computes_the_logits_of_base_plus_adapter(run: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(ExportSettings.read(run.adapter_dir).base_model)
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base, run.adapter_dir).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run.run_dir / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=1e-4)


def test_a_tokenizer_without_a_template_is_exported_with_the_plain_one(run: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fedfm.tasks.instruction_tuning import PLAIN_TEMPLATE, render

    # Prepare: the run as if its base model had no chat template (training then used PLAIN_TEMPLATE)
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    tokenizer = AutoTokenizer.from_pretrained(copy / "adapter")
    tokenizer.chat_template = None
    (copy / "adapter" / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(copy / "adapter")
    assert not AutoTokenizer.from_pretrained(copy / "adapter").chat_template
    # Execute
    write_model_card(copy)
    # Assert: a colleague's apply_chat_template writes what training wrote
    exported = AutoTokenizer.from_pretrained(copy / "adapter")
    turns = [{"role": "user", "content": QUESTION}]
    assert exported.chat_template == PLAIN_TEMPLATE
    assert exported.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == \
        render(tokenizer, turns, generation_prompt=True) == f"<|user|>\n{QUESTION}\n<|assistant|>\n"


def test_bad_rows_are_named_in_one_line_before_any_model_loads(run: Any, global_test: Path, tmp_path: Path) -> None:
    from fedfm.cli import main

    cases = {
        "columns.jsonl": ('{"question": "x"}', r"has none of the columns \['messages', 'prompt', 'instruction'\]"),
        "role.jsonl": ('{"messages": [{"role": "doctor", "content": "x"}]}', r"row 0: turn 0 must have a `role`"),
        "json.csv": ('messages\n"[{not json"\n', r"row 0: `messages` is text that is not JSON"),
        "empty.jsonl": ('{"prompt": "  "}', r"row 0 fills none of the columns"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content + "\n")
        # a base model that does not exist: only an error raised before loading gets past it to the rows' message
        with pytest.raises(DataError, match=message):
            predict_file(run.adapter_dir, path, base_model=str(tmp_path / "no-model"))
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    with pytest.raises(DataError, match=r"row 0 has no reference answer to score"):
        evaluate_file(run.adapter_dir, unanswered, base_model=str(tmp_path / "no-model"))
    with pytest.raises(GenerationError, match=r"--max-new-tokens must be an integer >= 1"):
        predict_file(run.adapter_dir, global_test, max_new_tokens=0)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["predict", "--adapter", str(run.adapter_dir), "--input", str(tmp_path / "role.jsonl")])
    lines = err.getvalue().strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("fedfm: error: ") and "`role`" in lines[0]


def test_report_plots_loss_and_perplexity_per_round(run: Any, tmp_path: Path) -> None:
    from matplotlib.image import imread

    from fedfm.report import write_report

    written = write_report(run.run_dir, tmp_path / "report")
    text = written.read_text()
    assert "|  | perplexity | token-accuracy | loss | examples |" in text and "macro-f1" not in text
    assert (tmp_path / "report" / "hospitals.png").is_file()
    # three panels side by side (token accuracy, perplexity on its log axis, loss): 3 x 4.2 in wide, 3.4 in high
    height, width = imread(tmp_path / "report" / "global.png").shape[:2]
    assert width / height == pytest.approx(3 * 4.2 / 3.4, rel=0.05)
