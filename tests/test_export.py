"""Export for colleagues: the model card, the self-describing folders, plain loading, predict and evaluate.

One short real federation (all-MiniLM-L6-v2, mean pooling, two hospitals, one
round, merged model on) provides the folders every test reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from fedfm.config import RunConfig
from fedfm.errors import DataError
from fedfm.export import ExportSettings, write_model_card
from fedfm.predict import evaluate_file, predict_file, read_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(two_hospital_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import fedfm

    config = RunConfig().replace(**{
        "model.name": "minilm", "model.max-length": 32, "lora.r": 4,
        "data.dataset": "csv", "data.path": str(two_hospital_csv), "data.partitioner": "natural",
        "data.partition-column": "hospital", "train.batch-size": 8, "train.local-steps": 2,
        "train.learning-rate": 5e-3, "federation.num-rounds": 1, "output.merged-model": True,
    })
    return fedfm.run(config, out=tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def global_test(run: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's global test rows with their class names, as a colleague's CSV would hold them."""
    from fedfm.config import load_config
    from fedfm.workspace import federation_for

    config = load_config(run.run_dir / "config.toml")
    rows = federation_for(config.data).global_test
    names = ExportSettings.read(run.adapter_dir).label_names
    path = tmp_path_factory.mktemp("rows") / "test.csv"
    pd.DataFrame({"text": rows["text"], "label": [names[i] for i in rows["label"]]}).to_csv(path, index=False)
    return path


def _snippet(card: str) -> str:
    match = re.search(r"```python\n(.*?)```", card, re.DOTALL)
    assert match, "the card has no Python snippet"
    return match.group(1)


def _plain_peft(adapter: Path) -> Any:
    """base + adapter exactly as the card tells a colleague (its snippet's pooling code, no fedfm)."""
    namespace: dict[str, Any] = {}
    code = _snippet((adapter / "README.md").read_text())
    # The card's own code is what is under test; a subprocess would cost another torch import (~6 s).
    exec(code.split("tokenizer = ")[0], namespace)  # noqa: S102 -- imports, base path, labels, pooling helpers
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(namespace["base_path"], num_labels=2)
    namespace["use_mean_pooling"](base)
    return PeftModel.from_pretrained(base, adapter).eval()


def test_folder_describes_its_task_and_the_card_states_the_runs_figures(run: Any) -> None:
    summary = run.summary
    settings = ExportSettings.read(run.adapter_dir)
    card = (run.adapter_dir / "README.md").read_text()
    assert (settings.task, settings.base_model, settings.pooling) == ("sequence-classification", "minilm", "mean")
    assert settings.label_names == ["negative", "positive"] and settings.max_length == 32
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model: sentence-transformers/all-MiniLM-L6-v2" in front
    for tag in ("federated-learning", "fedfm", "lora"):
        assert f"- {tag}" in front
    for name, sizes in summary["hospitals"].items():
        assert f"| {name} | {sizes['train_rows']} | {sizes['test_rows']} |" in card
    final = summary["final"]["global"]
    assert f"| global test set | {summary['global_test_rows']} | {final['accuracy']:.3f} | {final['macro-f1']:.3f} |" in card
    for name, m in summary["final"]["per_hospital"].items():
        assert f"| {name} | {int(m['num-examples'])} | {m['accuracy']:.3f} |" in card
    assert "`fedavg`, 1 of 1 rounds" in card and "r = 4" in card and "No differential privacy" in card
    merged_card = (run.run_dir / "merged" / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "trust_remote_code=True" in merged_card


def test_write_model_card_on_an_existing_run_dir_rewrites_the_same_card(run: Any) -> None:
    card = run.adapter_dir / "README.md"
    before = card.read_text()
    card.unlink()
    assert write_model_card(run.run_dir) == [card, run.run_dir / "merged" / "README.md"]
    assert card.read_text() == before


def test_card_snippets_run_as_written(run: Any) -> None:
    # Execute each folder's snippet from the run directory, where the card names its folder.
    labels = ExportSettings.read(run.adapter_dir).label_names
    printed = []
    here = Path.cwd()
    try:
        os.chdir(run.run_dir)
        for folder in ("adapter", "merged"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(_snippet((run.run_dir / folder / "README.md").read_text()), {})  # noqa: S102 -- the card's code
            printed.append(out.getvalue())
    finally:
        os.chdir(here)
    assert printed[0] == printed[1]
    assert printed[0].split(" [")[0] in labels


def test_evaluate_reproduces_the_runs_final_global_score(run: Any, global_test: Path) -> None:
    # Execute: the exported adapter on the run's own global test rows, loaded with plain peft
    metrics = evaluate_file(run.adapter_dir, global_test)
    # Assert: the same figures the server's evaluation wrote into summary.json
    final = run.summary["final"]["global"]
    assert metrics["rows"] == run.summary["global_test_rows"]
    assert metrics["accuracy"] == final["accuracy"] and metrics["macro-f1"] == final["macro-f1"]
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-4)


def test_predict_matches_plain_peft_and_the_merged_model(run: Any, global_test: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # Execute
    rows, predictions, _ = predict_file(run.adapter_dir, global_test, output=tmp_path / "p.jsonl")
    written = pd.read_json(tmp_path / "p.jsonl", lines=True)
    texts = list(rows.texts)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    batch = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(run.run_dir / "merged", trust_remote_code=True).eval()
    with torch.no_grad():
        plain = _plain_peft(run.adapter_dir)(**batch).logits
        folded = merged(**batch).logits
    # Assert
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(predictions.probabilities), plain.softmax(-1), rtol=1e-4, atol=1e-5)
    assert list(written["prediction"]) == [merged.config.id2label[int(i)] for i in folded.argmax(-1)]
    assert list(written.columns[-2:]) == ["probability:negative", "probability:positive"]


def test_bad_input_is_named_before_any_model_loads(run: Any, global_test: Path, tmp_path: Path) -> None:
    from fedfm.cli import main

    settings = ExportSettings.read(run.adapter_dir)
    with pytest.raises(DataError, match=r"no column \['note'\].*--text-column.*columns present: \['text', 'label'\]"):
        read_rows(global_test, settings, text_column="note")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "acute pain", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"label 'maybe'; allowed: one of \['negative', 'positive'\]"):
        read_rows(wrong, settings, need_labels=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["evaluate", "--adapter", str(run.adapter_dir), "--input", str(tmp_path / "rows.txt")])
    assert status == 2 and "must be one of ['.csv', '.jsonl', '.json', '.parquet']" in err.getvalue()


# --------------------------------------------------------------------------- input formats from the data sources


@pytest.mark.parametrize(("settings", "recorded"), [
    ({"data.dataset": "heart_disease_uci"},
     {"input_format": "heart-disease-record", "label_column": "num", "text_column": "text", "fixed_options": []}),
    ({"model.task": "causal-qa", "model.name": "smollm2-135m", "data.dataset": "pubmedqa"},
     {"input_format": "multiple-choice", "label_column": "label", "fixed_options": ["yes", "no", "maybe"]}),
    ({"model.task": "causal-qa", "model.name": "smollm2-135m", "data.dataset": "medmcqa"},
     {"input_format": "multiple-choice", "fixed_options": []}),
    ({"data.dataset": "csv", "data.path": "x.csv", "data.text-column": "sentence", "data.label-column": "y"},
     {"input_format": "text", "text_column": "sentence", "label_column": "y"}),
    ({"data.dataset": "heart_disease_uci", "data.hospitals": ["a", "b"], "data.label-names": ["no", "yes"],
      "federation.central-evaluation": False},
     {"input_format": "text", "label_column": "label"}),
])
def test_fedfm_json_records_the_input_format_its_source_declares(settings: dict[str, Any],
                                                                  recorded: dict[str, Any]) -> None:
    from fedfm.export import export_settings

    names = ["yes", "no", "maybe"] if settings.get("data.dataset") == "pubmedqa" else ["no", "yes"]
    written = export_settings(RunConfig().replace(**settings), names).to_json()
    assert {k: written[k] for k in recorded} == recorded


def test_a_heart_record_file_is_read_through_its_sources_format(tmp_path: Path) -> None:
    from fedfm.data.formats import input_format
    from fedfm.data.heart import FEATURES

    # Prepare
    record = {"age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145, "chol": 233, "fbs": True,
              "restecg": "lv hypertrophy", "thalch": 150, "exang": False, "oldpeak": 2.3}
    pd.DataFrame([{**record, "num": 3}, {**record, "num": 0}]).to_csv(tmp_path / "rows.csv", index=False)
    settings = ExportSettings(task="sequence-classification", base_model="minilm",
                              label_names=["no heart disease", "heart disease"], input_format="heart-disease-record",
                              label_column="num")
    # Execute
    rows = read_rows(tmp_path / "rows.csv", settings)
    # Assert: the record written as training wrote it, the UCI grade read as "any disease"
    fmt = input_format("heart-disease-record")
    assert list(fmt.record_columns) == FEATURES
    assert rows.texts == [fmt.record_text(record)] * 2 and rows.labels == [1, 0]


def test_an_input_format_name_is_never_taken_over_silently() -> None:
    from dataclasses import replace

    from fedfm.data.formats import TEXT_INPUT, register_input_format
    from fedfm.errors import ConfigError

    register_input_format(TEXT_INPUT)  # the same format again: nothing changes
    with pytest.raises(ConfigError, match="'text' is registered already"):
        register_input_format(replace(TEXT_INPUT, label_column="y"))
