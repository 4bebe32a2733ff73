"""Files of one's own for token classification (CoNLL) and option scoring (multiple-choice tables).

The loaders on the real BC5CDR files and small tables, every user mistake as
one `DataError`/`ConfigError`, and one short federation per task through
`fedfm run`, then `fedfm evaluate`/`predict` on the exported folder.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedfm.cli import main
from fedfm.config import RunConfig
from fedfm.data import load_source
from fedfm.data.conll import parse_conll
from fedfm.errors import ConfigError, DataError
from fedfm.export import ExportSettings
from fedfm.tasks.metrics import bio_entities

BC5CDR_TAGS = ["O", "B-Chemical", "B-Disease", "I-Chemical", "I-Disease"]

QUESTIONS = [
    {"question": "Which drug lowers blood glucose?", "options": ["metformin", "aspirin", "heparin"], "answer": "A",
     "hospital": "north"},
    {"question": "Which organ makes insulin?", "options": ["liver", "pancreas"], "answer": 1, "hospital": "north",
     "context": "Insulin is made by beta cells."},
    {"question": "Which vitamin do citrus fruits hold?", "options": ["vitamin D", "vitamin C", "vitamin K"],
     "answer": "vitamin C", "hospital": "north"},
    {"question": "Which is an anticoagulant?", "options": ["heparin", "insulin", "ibuprofen", "statin"],
     "answer": "A", "hospital": "north"},
    {"question": "What does a stethoscope hear?", "options": ["sounds", "light"], "answer": "sounds",
     "hospital": "south"},
    {"question": "Which cell carries oxygen?", "options": ["neutrophil", "red cell", "platelet"], "answer": "B",
     "hospital": "south"},
    {"question": "Which bone is in the thigh?", "options": ["femur", "radius", "ulna"], "answer": 0,
     "hospital": "south"},
    {"question": "Which gland sits in the neck?", "options": ["adrenal", "thyroid"], "answer": "thyroid",
     "hospital": "south"},
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(argv: list[str]) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    return err.getvalue()


# ---------------------------------------------------------------- CoNLL files


def test_bc5cdr_train_file_reads_as_tagged_sentences() -> None:
    source = load_source("conll", path="bc5cdr/train.tsv", kind="token-classification")
    assert source.label_names == BC5CDR_TAGS and source.test is None
    assert len(source.train) == 4560  # the README's count
    assert source.train.features["tags"].feature.names == BC5CDR_TAGS
    first = source.train[0]
    assert first["tokens"][:2] == ["Selegiline", "-"]
    assert [BC5CDR_TAGS[t] for t in first["tags"][:5]] == ["B-Chemical", "O", "O", "B-Disease", "I-Disease"]
    entities = [e for tags in source.train["tags"] for e in bio_entities([BC5CDR_TAGS[t] for t in tags])]
    assert sum(e[0] == "Chemical" for e in entities) == 5203  # one per B- tag of the file
    assert sum(e[0] == "Disease" for e in entities) == 4182


def test_whitespace_columns_and_given_tag_names(tmp_path: Path) -> None:
    # CoNLL-2003 style: token, POS, chunk, tag; the tag is the last column.
    path = tmp_path / "notes.conll"
    path.write_text("Fever NN B-NP B-Sign\nat IN B-PP O\nnight NN B-NP O\n\nNo DT B-NP O\nrash NN I-NP B-Sign\n")
    source = load_source("conll", path=path, kind="token-classification", label_names=["O", "B-Sign", "I-Sign"])
    assert source.label_names == ["O", "B-Sign", "I-Sign"]
    assert source.train["tokens"] == [["Fever", "at", "night"], ["No", "rash"]]
    assert source.train["tags"] == [[1, 0, 0], [0, 1]] and source.train["label"] == [1, 1]
    with pytest.raises(DataError, match=r"`data.label-names` \['O', 'B-Drug'\]: .*notes.conll holds tag\(s\) \['B-Sign'\]"):
        load_source("conll", path=path, kind="token-classification", label_names=["O", "B-Drug"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Cancer\tB-Disease\n\nAspirin\n", r"bad.tsv:3: expected 'token<TAB>tag'.*'Aspirin': the line has no tag"),
        ("Cancer\tB-Disease\nof\tO\n\nbreast\tDisease\n",
         r"bad.tsv:4: .*the tag 'Disease' is not BIO \('O', 'B-<type>' or 'I-<type>'\)"),
        ("Cancer\t\n", r"bad.tsv:1: .*the line has no tag"),
        ("\n\n", r"bad.tsv holds no sentence"),
        ("Cancer\tO\n.\tO\n", r"bad.tsv: every word is tagged 'O'"),
    ],
)
def test_malformed_conll_files_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_source("conll", path=bad, kind="token-classification")


def test_a_conll_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("Cancer\tB-Disease\n\nSj\u00f6gren\tB-Disease\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.tsv is not UTF-8 text \(line 3"):
        parse_conll(bad)


def test_conll_pairs_with_token_classification_only(tmp_path: Path) -> None:
    conll = {"data.dataset": "conll", "data.path": "bc5cdr/train.tsv", "data.partitioner": "iid"}
    assert RunConfig().replace(**{**conll, "model.task": "token-classification"}).data.dataset == "conll"
    with pytest.raises(ConfigError, match="is tagged word by word and needs `model.task` 'token-classification'"):
        RunConfig().replace(**conll)
    with pytest.raises(ConfigError, match="`data.context` 'position' needs sentences grouped into abstracts"):
        RunConfig().replace(**{**conll, "model.task": "token-classification", "data.context": "position"})
    with pytest.raises(ConfigError, match="`data.path` must name a file when `data.dataset` is 'conll'"):
        RunConfig().replace(**{**conll, "model.task": "token-classification", "data.path": ""})
    with pytest.raises(ConfigError, match="read for `model.task` 'token-classification'"):
        load_source("conll", path="bc5cdr/train.tsv")


# ---------------------------------------------------------------- multiple-choice files


def test_answers_as_letter_index_or_text_in_jsonl(tmp_path: Path) -> None:
    source = load_source("jsonl", path=_jsonl(tmp_path / "qa.jsonl", QUESTIONS), kind="multiple-choice")
    assert source.kind == "multiple-choice" and source.label_names == ["A", "B", "C", "D"]
    assert source.train["label"] == [0, 1, 1, 0, 0, 1, 0, 1]
    assert source.train["context"][:2] == ["", "Insulin is made by beta cells."]
    assert source.train["options"][1] == ["liver", "pancreas"]
    assert source.train["hospital"][0] == "north"  # other columns stay, e.g. for a natural partition
    assert "answer" not in source.train.column_names


def test_csv_with_a_json_list_or_letter_columns_and_parquet(tmp_path: Path) -> None:
    listed = tmp_path / "listed.csv"
    pd.DataFrame({"question": ["Q1?", "Q2?"], "options": ['["yes", "no"]', '["a", "b", "c"]'],
                  "answer": ["B", "c"]}).to_csv(listed, index=False)
    assert load_source("csv", path=listed, kind="multiple-choice").train["label"] == [1, 2]
    lettered = tmp_path / "lettered.csv"
    lettered.write_text("question,A,B,C,answer\nDose?,5,10,,B\nSide?,left,right,both,C\n")
    rows = load_source("csv", path=lettered, kind="multiple-choice").train
    assert rows["options"] == [["5", "10"], ["left", "right", "both"]] and rows["label"] == [1, 2]
    parquet = tmp_path / "qa.parquet"
    pd.DataFrame([QUESTIONS[0], QUESTIONS[2]]).to_parquet(parquet)  # a Parquet column holds one type
    assert load_source("parquet", path=parquet, kind="multiple-choice").train["label"] == [0, 1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"options": ["a", "b"], "answer": "A"}, r"has no column 'question'"),
        ({"question": "Q?", "options": ["a", "b"]}, r"has no answer column 'answer' or 'label'"),
        ({"question": "Q?", "answer": "A"}, r"no 'options' column \(a list of the answers\) nor letter columns"),
        ({"question": "Q?", "options": ["a", "b"], "answer": "c"},
         r"row 0 column 'answer' .*: answer 'c' is not among the options \['a', 'b'\]"),
        ({"question": "Q?", "options": ["a", "b"], "answer": 2}, r"row 0 column 'answer' .*index 2 is outside 0..1"),
        ({"question": "Q?", "options": ["only"], "answer": 0},
         r"row 0 column 'options' .*: a question needs at least two options, got 1"),
        ({"question": "Q?", "options": ["B", "A"], "answer": "A"},
         r"answer 'A' is both the letter of option 0 and the text of option 1"),
        ({"question": "Q?", "options": ["a", "a"], "answer": 0}, r"option\(s\) \['a'\] appear twice"),
        ({"question": "Q?", "options": "a, b", "answer": 0}, r"column 'options' .* must hold a list of options"),
        ({"question": "Q?", "options": ["a", "b"], "A": "a", "B": "b", "answer": 0},
         r"both an 'options' column and letter columns \['A', 'B'\]"),
        ({"question": "Q?", "A": "a", "B": None, "C": "c", "answer": 0}, r"column\(s\) \['B'\] are empty before a filled one"),
    ],
)
def test_wrong_multiple_choice_rows_name_file_row_and_column(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=message) as raised:
        load_source("jsonl", path=path, kind="multiple-choice")
    assert "bad.jsonl" in str(raised.value)


def test_causal_qa_accepts_tables_of_ones_own() -> None:
    table = {"model.task": "causal-qa", "data.dataset": "jsonl", "data.path": "qa.jsonl", "data.partitioner": "iid"}
    assert RunConfig().replace(**table).data.dataset == "jsonl"
    with pytest.raises(ConfigError, match=r"'causal-qa' needs a multiple-choice dataset .* got 'conll'"):
        RunConfig().replace(**{**table, "data.dataset": "conll"})


# ---------------------------------------------------------------- end to end: fedfm run, the export, evaluate


def _toml(path: Path, settings: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.integration
def test_token_classification_run_on_a_conll_file(tiny_bert: Path, tmp_path: Path) -> None:
    # Prepare: the first 60 BC5CDR sentences, a hospital's own file
    from fedfm.data.paths import resolve_data_dir

    sentences = (resolve_data_dir() / "bc5cdr" / "train.tsv").read_text(encoding="utf-8").split("\n\n")
    own = tmp_path / "bc5cdr-north.tsv"
    own.write_text("\n\n".join(sentences[:60]) + "\n", encoding="utf-8")
    config = _toml(tmp_path / "ner.toml", {
        "model": {"name": str(tiny_bert), "task": "token-classification", "max-length": 48},
        "lora": {"r": 4},
        "data": {"dataset": "conll", "path": str(own), "partitioner": "iid", "num-hospitals": 2,
                 "max-test": 12},
        "train": {"batch-size": 8, "local-steps": 2},
        "federation": {"num-rounds": 1, "min-hospitals": 2},
    })
    # Execute
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    # Assert: entity scores recorded, the adapter exported with the file's tags
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"entity-f1", "entity-true"} <= set(line["global"]) and line["global"]["entity-true"] > 0
    settings = ExportSettings.read(tmp_path / "run" / "adapter")
    assert (settings.task, settings.label_names) == ("token-classification", BC5CDR_TAGS)
    # fedfm predict does not cover token classification: said before any model loads.
    assert "fedfm predict and evaluate cover the tasks" in _error(
        ["predict", "--adapter", str(tmp_path / "run" / "adapter"), "--input", str(tmp_path / "rows.jsonl")])


@pytest.mark.integration
def test_causal_qa_run_on_a_jsonl_file_then_evaluate_and_predict(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Prepare
    own = _jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    config = _toml(tmp_path / "qa.toml", {
        "model": {"name": str(tiny_llama_dir), "task": "causal-qa", "max-length": 96},
        "lora": {"r": 4},
        "data": {"dataset": "jsonl", "path": str(own), "partitioner": "natural", "partition-column": "hospital",
                 "test-fraction": 0.25},
        "train": {"batch-size": 3, "local-steps": 1},
        "federation": {"num-rounds": 1, "min-hospitals": 2},
    })
    # Execute
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "adapter"
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--adapter", str(adapter), "--input", str(own), "--label-column", "answer",
                 "--output", str(scores)]) == 0
    assert main(["predict", "--adapter", str(adapter), "--input", str(own), "--output", str(tmp_path / "p.jsonl")]) == 0
    # Assert
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["final"]["per_hospital"]) == ["north", "south"]
    settings = ExportSettings.read(adapter)
    assert (settings.task, settings.input_format) == ("causal-qa", "multiple-choice")
    assert json.loads(scores.read_text())["rows"] == len(QUESTIONS)
    predictions = pd.read_json(tmp_path / "p.jsonl", lines=True)
    assert len(predictions) == len(QUESTIONS) and "prediction" in predictions.columns
