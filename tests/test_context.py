"""Sentence context for sentence-role tasks (`data.context`): strings, pair encoding, abstracts kept whole."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets import Dataset

from conftest import minilm_path
from fedfm.config import RunConfig
from fedfm.data import SourceData, build_federation, partition, split_hospital
from fedfm.data.partitioners import keep_groups_together
from fedfm.data.piboso import add_context, context_text, group_split
from fedfm.errors import ConfigError, DataError
from fedfm.tasks.sequence_classification import SequenceClassification, encode_pairs


def abstracts(num: int, *, seed: int = 0) -> dict[str, list[Any]]:
    """Columns of ``num`` abstracts of 2-9 sentences, in the layout of :func:`parse_piboso`."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {"text": [], "label": [], "abstract_id": [], "position": [], "num_sentences": []}
    for a in range(num):
        size = int(rng.integers(2, 10))
        for p in range(size):
            cols["text"].append(f"abstract {a} sentence {p} .")
            cols["label"].append(int(rng.integers(0, 3)) if p else 0)
            cols["abstract_id"].append(f"A{a}")
            cols["position"].append(p)
            cols["num_sentences"].append(size)
    return cols


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def test_context_of_first_middle_and_last_sentence() -> None:
    # Prepare: one abstract of three sentences, rows out of order.
    rows = Dataset.from_dict({
        "text": ["Last one .", "First one .", "Middle one ."],
        "label": [0, 1, 2],
        "abstract_id": ["7", "7", "7"],
        "position": [2, 0, 1],
        "num_sentences": [3, 3, 3],
    })

    # Execute
    both = add_context(rows, "both")["context"]
    position = add_context(rows, "position")["context"]
    neighbours = add_context(rows, "neighbours")["context"]

    # Assert
    assert both[1] == "sentence 1 of 3. before: start of abstract after: Middle one ."
    assert both[2] == "sentence 2 of 3. before: First one . after: Last one ."
    assert both[0] == "sentence 3 of 3. before: Middle one . after: end of abstract"
    assert position == ["sentence 3 of 3.", "sentence 1 of 3.", "sentence 2 of 3."]
    assert neighbours[2] == "before: First one . after: Last one ."
    assert add_context(rows, "none") is rows
    assert context_text(0, 1, None, None, mode="none") == ""


def test_context_uses_only_the_rows_given() -> None:
    # A neighbour outside the rows (another hospital's, or the other split's) is never looked up.
    rows = Dataset.from_dict({
        "text": ["one", "three"], "label": [0, 0], "abstract_id": ["a", "a"], "position": [0, 2], "num_sentences": [3, 3],
    })
    contexts = add_context(rows, "neighbours")["context"]
    assert "three" not in contexts[0] and "one" not in contexts[1]


def test_context_needs_abstracts() -> None:
    rows = Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(DataError, match="abstract"):
        add_context(rows, "both")
    with pytest.raises(DataError, match="data.context"):
        add_context(rows, "sideways")


@pytest.mark.parametrize("max_length", [12, 24, 64])
def test_sentence_is_never_truncated_before_its_context(tokenizer: Any, max_length: int) -> None:
    # Prepare: a short, a medium and an over-long sentence, each with a long context.
    texts = ["Patients were randomized .", "Outcomes were measured at six and twelve months after surgery .",
             " ".join(["placebo"] * 80)]
    contexts = ["sentence 2 of 9. before: " + "word " * 60 + "after: end of abstract"] * 3

    # Execute
    enc = encode_pairs(tokenizer, texts, contexts, max_length=max_length)

    # Assert
    for text, ids in zip(texts, enc["input_ids"], strict=True):
        assert len(ids) <= max_length
        sentence = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = ids[1 : ids.index(tokenizer.sep_token_id)]
        # Either the whole sentence comes first, or (only when it alone overflows) as much of it as fits, alone.
        if len(sentence) + 3 < max_length:
            assert first == sentence
            assert len(ids) == max_length  # the context filled the rest
        else:
            assert first == sentence[: max_length - 2]
            assert ids.count(tokenizer.sep_token_id) == 1


def test_task_encodes_pairs_only_with_a_context_column(tokenizer: Any) -> None:
    rows = add_context(Dataset.from_dict(abstracts(2)), "both")
    task = SequenceClassification()

    paired = task.tokenize(rows, tokenizer, max_length=64)
    plain = task.tokenize(rows.remove_columns("context"), tokenizer, max_length=64)

    assert all(ids.count(tokenizer.sep_token_id) == 2 for ids in paired["input_ids"])
    assert all(ids.count(tokenizer.sep_token_id) == 1 for ids in plain["input_ids"])
    assert paired["labels"] == plain["labels"] == rows["label"]


def test_group_split_keeps_abstracts_whole() -> None:
    groups = abstracts(40)["abstract_id"]

    train, test = group_split(groups, 0.3, np.random.default_rng(0))

    assert sorted(train + test) == list(range(len(groups)))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert 0.2 < len(test) / len(groups) < 0.4
    assert group_split(["only"] * 5, 0.3, np.random.default_rng(0)) == ([0, 1, 2, 3, 4], [])


@pytest.mark.parametrize(("partitioner", "alpha"), [("dirichlet", 0.3), ("iid", 0.5)])
def test_federation_keeps_each_abstract_in_one_hospital_and_one_split(partitioner: str, alpha: float) -> None:
    # Prepare
    source = SourceData(
        name="abstracts", kind="classification", train=Dataset.from_dict(abstracts(120)),
        test=Dataset.from_dict(abstracts(10, seed=1)), label_names=["a", "b", "c"],
    )

    # Execute
    fed = build_federation(source, partitioner=partitioner, num_hospitals=5, alpha=alpha, seed=3, context="both")

    # Assert: every row once, no abstract in two hospitals or in a hospital's train and test.
    seen: set[str] = set()
    rows = 0
    for h in fed.hospitals:
        train, test = set(h.train["abstract_id"]), set(h.test["abstract_id"])
        assert train and test and not train & test
        assert not (train | test) & seen
        seen |= train | test
        rows += len(h.train) + len(h.test)
        # Neighbours come from the same split and abstract: the sentence one position before and after.
        for split in (h.train, h.test):
            for row in split:
                a, p = row["abstract_id"][1:], row["position"]
                before = f"abstract {a} sentence {p - 1} ." if p else "start of abstract"
                after = f"abstract {a} sentence {p + 1} ." if p + 1 < row["num_sentences"] else "end of abstract"
                assert row["context"] == f"sentence {p + 1} of {row['num_sentences']}. before: {before} after: {after}"
    assert rows == len(source.train)
    assert "context" in fed.global_test.column_names


def test_keep_groups_together_covers_every_row_once() -> None:
    data = Dataset.from_dict(abstracts(60))
    parts = partition(data, "dirichlet", num_partitions=8, seed=0, alpha=0.1)

    grouped = keep_groups_together(data, parts, column="abstract_id", seed=0)

    assert [p.name for p in grouped] == [p.name for p in parts]
    assert all(len(p.rows) for p in grouped)
    texts = [t for p in grouped for t in p.rows["text"]]
    assert sorted(texts) == sorted(data["text"])
    owners = {a: k for k, p in enumerate(grouped) for a in p.rows["abstract_id"]}
    assert len(owners) == 60


def test_split_hospital_without_abstracts_is_unchanged() -> None:
    rows = Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    hospital = split_hospital("h", rows, index=0, test_fraction=0.3, seed=0)
    assert len(hospital.test) == 6 and "context" not in hospital.train.column_names


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"data.dataset": "heart_disease_uci", "data.context": "both"}, "`data.context` 'both' needs sentences grouped into abstracts"),
        ({"data.dataset": "pubmedqa", "data.context": "position"}, "or a file (csv, jsonl, parquet)"),
        ({"data.dataset": "nicta_piboso", "data.context": "sideways"}, "must be one of ['none', 'position'"),
    ],
)
def test_config_refuses_context_without_abstracts(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig().replace(**settings)


def test_config_accepts_context_for_nicta_files_and_deployments() -> None:
    config = RunConfig().replace(**{"data.dataset": "nicta_piboso", "data.partitioner": "dirichlet",
                                    "data.context": "both"})
    assert config.data.context == "both"
    assert RunConfig().data.context == "none"
    own = RunConfig().replace(**{"data.dataset": "jsonl", "data.path": "x.jsonl", "data.partitioner": "iid",
                                 "data.context": "position"})
    deployment = RunConfig().replace(**{"data.hospitals": "north,south", "data.label-names": "a,b",
                                        "federation.central-evaluation": False, "data.context": "neighbours"})
    assert (own.data.context, deployment.data.context) == ("position", "neighbours")


def test_federation_refuses_context_for_rows_without_abstracts() -> None:
    source = SourceData(name="notes", kind="classification",
                        train=Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}),
                        test=None, label_names=["x", "y"])
    with pytest.raises(ConfigError, match="data.context"):
        build_federation(source, partitioner="iid", num_hospitals=2, context="neighbours")


def _sentence_file(path: Any, cols: dict[str, list[Any]], *, keep: tuple[str, ...]) -> Any:
    import pandas as pd

    pd.DataFrame({k: cols[k] for k in keep}).to_csv(path, index=False)
    return path


def test_predict_builds_each_sentences_context_from_the_file(tmp_path: Any) -> None:
    from fedfm.export import TEXT, ExportSettings
    from fedfm.predict import read_rows

    cols = abstracts(4, seed=3)
    expected = add_context(Dataset.from_dict(cols), "both")["context"]
    settings = ExportSettings(task="sequence-classification", base_model="minilm", label_names=["a", "b", "c"],
                              input_format=TEXT, context="both")
    # Execute: once with the position columns, once with only the abstracts' ids and the file's order
    given = read_rows(_sentence_file(tmp_path / "given.csv", cols,
                                     keep=("text", "abstract_id", "position", "num_sentences")), settings)
    ordered = read_rows(_sentence_file(tmp_path / "ordered.csv", cols, keep=("text", "abstract_id")), settings)
    # Assert: the contexts training built, either way
    assert given.contexts == expected and ordered.contexts == expected
    assert read_rows(tmp_path / "ordered.csv", ExportSettings(
        task="sequence-classification", base_model="minilm", label_names=["a"], input_format=TEXT)).contexts == []


@pytest.mark.parametrize(("change", "message"), [
    ({"drop": "abstract_id"}, r"no column \['abstract_id'\].*one row per sentence"),
    ({"position": 9}, r"row 0 \(abstract 'A0'\) has position 9 but num_sentences"),
    ({"position": -1}, r"column 'position': row 0 is -1; expected a whole number >= 0"),
    ({"position": 1}, r"rows 0 and 1 are both sentence 1 of abstract 'A0'"),
])
def test_predict_names_a_bad_sentence_file(tmp_path: Any, change: dict[str, Any], message: str) -> None:
    from fedfm.export import TEXT, ExportSettings
    from fedfm.predict import read_rows

    cols = abstracts(2, seed=3)
    if "position" in change:
        cols["position"][0] = change["position"]
    keep = tuple(k for k in ("text", "abstract_id", "position", "num_sentences") if k != change.get("drop"))
    settings = ExportSettings(task="sequence-classification", base_model="minilm", label_names=["a"],
                              input_format=TEXT, context="position")
    with pytest.raises(DataError, match=message):
        read_rows(_sentence_file(tmp_path / "rows.csv", cols, keep=keep), settings)


@pytest.mark.integration
def test_exported_context_model_scores_as_the_run_did(tiny_bert: Any, tmp_path: Any) -> None:
    import fedfm
    from fedfm.export import ExportSettings
    from fedfm.predict import evaluate_file, predict_file
    from fedfm.workspace import federation_for

    config = RunConfig().replace(**{
        "model.name": str(tiny_bert), "model.max-length": 48, "lora.r": 4, "data.dataset": "nicta_piboso",
        "data.partitioner": "iid", "data.num-hospitals": 2, "data.context": "position",
        "data.max-train-per-hospital": 16, "data.max-test": 60, "train.batch-size": 8, "train.local-steps": 2,
        "train.learning-rate": 5e-2, "federation.num-rounds": 1, "federation.fraction-evaluate": 0.0,
    })
    result = fedfm.run(config, out=tmp_path / "run")
    settings = ExportSettings.read(result.adapter_dir)
    assert settings.context == "position"
    card = (result.adapter_dir / "README.md").read_text()
    assert "paired with its context `position`" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "contexts = ['sentence 3 of 9.']" in snippet
    here = Path.cwd()
    try:  # the card's code, as a colleague runs it from the run directory
        os.chdir(result.run_dir)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(snippet, {})  # noqa: S102
    finally:
        os.chdir(here)
    assert printed.getvalue().split(" [")[0] in settings.label_names
    # The snippet's sentence as a file row (its context says "sentence 3 of 9"): fedfm predicts the same
    namespace: dict[str, Any] = {}
    try:
        os.chdir(result.run_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(snippet, namespace)  # noqa: S102
    finally:
        os.chdir(here)
    one = _sentence_file(tmp_path / "one.csv", {"text": namespace["texts"], "abstract_id": ["a"], "position": [2],
                                                 "num_sentences": [9]}, keep=("text", "abstract_id", "position",
                                                                              "num_sentences"))
    _, predicted, _ = predict_file(result.adapter_dir, one)
    np.testing.assert_allclose(predicted.probabilities, namespace["probabilities"].numpy(), rtol=1e-5, atol=1e-6)
    rows = federation_for(config.data).global_test
    cols = {k: list(rows[k]) for k in ("text", "abstract_id", "position", "num_sentences")}
    cols["label"] = [settings.label_names[i] for i in rows["label"]]
    path = _sentence_file(tmp_path / "test.csv", cols, keep=(*cols,))
    # Execute: the exported adapter on the run's own global test sentences
    metrics = evaluate_file(result.adapter_dir, path)
    # Assert: the figures the server's evaluation of (sentence, context) pairs wrote
    final = result.summary["final"]["global"]
    assert metrics["rows"] == result.summary["global_test_rows"] == 60
    assert metrics["accuracy"] == final["accuracy"] and metrics["macro-f1"] == final["macro-f1"]
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-4)


# ---- sentences in a file of one's own, and on a SuperNode -----------------------------------------------------------


def _own_sentences(path: Path, num: int, *, seed: int, keep: tuple[str, ...] = ("text", "label", "abstract_id")) -> Any:
    """A CSV of ``num`` abstracts, one row per sentence in reading order; the contexts training should build."""
    cols = abstracts(num, seed=seed)
    cols["label"] = [["background", "method", "result"][v] for v in cols["label"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    _sentence_file(path, cols, keep=keep)
    expected = dict(zip(cols["text"], add_context(Dataset.from_dict(cols), "both")["context"], strict=True))
    return path, expected


def _whole_abstracts(*splits: Dataset) -> bool:
    """No abstract has sentences in two of ``splits``, and each split holds every sentence of its abstracts."""
    seen: set[str] = set()
    for rows in splits:
        ids = set(rows["abstract_id"])
        if ids & seen or any(rows["abstract_id"].count(a) != n for a, n in
                             zip(rows["abstract_id"], rows["num_sentences"], strict=True)):
            return False
        seen |= ids
    return True


def test_a_file_of_ones_own_is_read_with_context_from_its_abstract_ids(tmp_path: Path) -> None:
    from fedfm.workspace import federation_for

    # Prepare: only text, label and abstract_id; position and size come from the file's order.
    path, expected = _own_sentences(tmp_path / "notes.csv", 30, seed=5)
    config = RunConfig().replace(**{"data.dataset": "csv", "data.path": str(path), "data.partitioner": "iid",
                                    "data.num-hospitals": 3, "data.context": "both"})
    # Execute
    federation = federation_for(config.data)
    # Assert: every sentence has the context built from its whole abstract; abstracts stay whole.
    splits = [rows for h in federation.hospitals for rows in (h.train, h.test)]
    assert sum(len(rows) for rows in splits) == len(expected)
    assert all(c == expected[t] for rows in splits for t, c in zip(rows["text"], rows["context"], strict=True))
    assert _whole_abstracts(*splits)
    assert federation.global_test["context"][0] == expected[federation.global_test["text"][0]]


def test_a_supernode_reads_its_own_sentences_with_context(tmp_path: Path) -> None:
    from fedfm.data import node_data, node_federation

    # Prepare: the file lists positions and sizes itself, rows shuffled.
    path, expected = _own_sentences(tmp_path / "north" / "sentences.csv", 20, seed=6,
                                    keep=("text", "label", "abstract_id", "position", "num_sentences"))
    import pandas as pd

    pd.read_csv(path).sample(frac=1.0, random_state=0).to_csv(path, index=False)
    node = node_data({"data-path": str(path)})
    assert node is not None
    # Execute
    federation = node_federation(node, test_fraction=0.3, seed=0, context="both")
    # Assert
    [hospital] = federation.hospitals
    assert len(hospital.train) + len(hospital.test) == len(expected) and len(hospital.test) > 0
    assert all(c == expected[t] for rows in (hospital.train, hospital.test)
               for t, c in zip(rows["text"], rows["context"], strict=True))
    assert _whole_abstracts(hospital.train, hospital.test)
    assert "context" not in node_federation(node, test_fraction=0.3, seed=0).hospitals[0].train.column_names


def test_a_deployments_test_file_is_read_with_context(tmp_path: Path) -> None:
    from fedfm.data import deployment_federation

    path, expected = _own_sentences(tmp_path / "test.csv", 6, seed=7)
    federation = deployment_federation(["north", "south"], label_names=["background", "method", "result"],
                                       test_path=path, context="neighbours")
    texts, contexts = federation.global_test["text"], federation.global_test["context"]
    assert len(texts) == len(expected)
    assert all(c == expected[t].split(". ", 1)[1] for t, c in zip(texts, contexts, strict=True))


@pytest.mark.parametrize(("columns", "error", "message"), [
    (("text", "label"), DataError, r"sentences\.csv has no 'abstract_id' column.*columns present"),
    (("text", "label", "abstract_id", "num_sentences"), None, None),
])
def test_a_supernode_file_without_abstracts_is_named(
    tmp_path: Path, columns: tuple[str, ...], error: Any, message: Any
) -> None:
    from fedfm.data import node_data, node_federation

    path, _ = _own_sentences(tmp_path / "sentences.csv", 4, seed=8, keep=columns)
    node = node_data({"data-path": str(path)})
    assert node is not None
    if error is None:
        assert len(node_federation(node, context="position").hospitals[0].train) > 0
        return
    with pytest.raises(error, match=message):
        node_federation(node, context="position")


def test_a_supernode_trains_on_its_sentences_with_context(tmp_path: Path, tiny_bert: Path) -> None:
    from flwr.app import ConfigRecord, Context, RecordDict

    from conftest import instruction
    from fedfm import keys
    from fedfm.client import _workspace, app
    from fedfm.config import to_json
    from fedfm.wire import state_to_record
    from fedfm.workspace import workspace_for

    # Prepare: a deployment whose hospitals read their sentences with their position.
    coordinator = RunConfig().replace(**{
        "model.name": str(tiny_bert), "model.max-length": 48, "lora.r": 4, "train.batch-size": 8,
        "train.local-steps": 2, "data.hospitals": "north,south", "data.label-names": "background,method,result",
        "federation.central-evaluation": False, "data.context": "position",
    })
    sent = RecordDict({
        keys.ARRAYS: state_to_record(workspace_for(coordinator).loaded.initial_state),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(coordinator), keys.SERVER_ROUND: 1}),
    })
    path, expected = _own_sentences(tmp_path / "south" / "sentences.csv", 12, seed=9)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"hospital": "south", "data-path": str(path)})
    # Execute
    trained = app(instruction(sent, message_type="train"), context)
    # Assert: the hospital trained on (sentence, position) pairs of its own file.
    assert not trained.has_error(), trained.error
    workspace = _workspace(coordinator, context)
    rows = workspace.federation.hospitals[0].train
    assert trained.content[keys.METRICS][keys.NUM_EXAMPLES] == len(rows)
    assert all(c == expected[t].split(" before:")[0] for t, c in zip(rows["text"], rows["context"], strict=True))
    sep = workspace.loaded.tokenizer.sep_token_id
    assert all(ids.count(sep) == 2 for ids in workspace.hospital_rows("train", 0)["input_ids"])  # pairs
