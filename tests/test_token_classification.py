"""Token classification (NER) on NCBI-disease: label alignment, windows, entity F1, loader, a federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import minilm_path
from fedfm.config import RunConfig
from fedfm.data import load_source
from fedfm.data.ncbi import parse_conll, sentences_to_dataset
from fedfm.errors import ConfigError, DataError
from fedfm.tasks import get_task
from fedfm.tasks.metrics import bio_entities, entity_scores
from fedfm.tasks.token_classification import IGNORE, word_windows

TAGS = ["O", "B-Disease", "I-Disease"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def ncbi():  # type: ignore[no-untyped-def]
    return load_source("ncbi_disease")


# ---------------------------------------------------------------- entity spans and scores


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["O", "B-D", "I-D", "O"], {("D", 1, 3)}),
        (["B-D", "B-D", "I-D"], {("D", 0, 1), ("D", 1, 3)}),
        (["O", "I-D", "I-D", "O"], {("D", 1, 3)}),  # I- without B- starts an entity (conlleval)
        (["B-D", "I-C", "O"], {("D", 0, 1), ("C", 1, 2)}),  # I- of another type starts a new one
        (["B-D", "I-D"], {("D", 0, 2)}),  # an entity running to the end of the sentence
        (["O", "O"], set()),
        ([], set()),
    ],
)
def test_bio_entities(tags: list[str], spans: set[tuple[str, int, int]]) -> None:
    assert bio_entities(tags) == spans


def test_entity_scores_count_exact_spans_only() -> None:
    gold = [
        ["B-D", "I-D", "I-D", "O", "B-D"],  # two entities
        ["O", "B-D", "I-D", "O"],  # one
        ["O", "O", "O"],  # none
    ]
    predicted = [
        ["B-D", "I-D", "O", "O", "B-D"],  # partial overlap (fp + fn), exact second (tp)
        ["O", "I-D", "I-D", "O"],  # I- without B- on the exact span: counted as that span (tp)
        ["O", "B-D", "O"],  # spurious (fp)
    ]
    scores = entity_scores(gold, predicted)
    assert (scores["entity-true"], scores["entity-predicted"], scores["entity-correct"]) == (3, 4, 2)
    assert scores["entity-precision"] == pytest.approx(2 / 4)
    assert scores["entity-recall"] == pytest.approx(2 / 3)
    assert scores["entity-f1"] == pytest.approx(2 * 2 / (3 + 4))


def test_entity_scores_edge_cases() -> None:
    assert entity_scores([["O"]], [["O"]])["entity-f1"] == 0.0  # nothing to find, nothing found
    perfect = entity_scores([["B-D", "I-D"]], [["B-D", "I-D"]])
    assert perfect["entity-f1"] == perfect["entity-precision"] == perfect["entity-recall"] == 1.0
    with pytest.raises(ValueError, match="gold tags"):
        entity_scores([["O", "O"]], [["O"]])


# ---------------------------------------------------------------- label alignment and windows


def test_labels_sit_on_the_first_sub_token_of_each_word(tokenizer) -> None:  # type: ignore[no-untyped-def]
    words = ["Familial", "adenomatous", "polyposis", "(", "FAP", ")", "is", "rare", "."]
    tags = ["B-Disease", "I-Disease", "I-Disease", "O", "B-Disease", "O", "O", "O", "O"]
    rows = sentences_to_dataset([(words, tags)], TAGS)
    out = get_task("token-classification").tokenize(rows, tokenizer, max_length=64)
    assert len(out) == 1
    row = out[0]
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert row["labels"][0] == IGNORE and row["labels"][-1] == IGNORE
    # Some words split into several pieces; only each word's first piece is labelled.
    assert len(pieces) > len(words) + 2
    labelled = [(p, label) for p, label in zip(pieces, row["labels"], strict=True) if label != IGNORE]
    assert [TAGS[label] for _, label in labelled] == tags
    assert all(not p.startswith("##") for p, _ in labelled)
    continuation = [label for p, label in zip(pieces, row["labels"], strict=True) if p.startswith("##")]
    assert continuation and set(continuation) == {IGNORE}
    assert [row["labels"][i] for i in row["first_token"]] == [TAGS.index(t) for t in tags]
    # Batches pad dynamically, with -100 under the padding.
    batch = get_task("token-classification").collate(tokenizer)([row, {**row, "input_ids": row["input_ids"][:4],
                                                                       "attention_mask": row["attention_mask"][:4],
                                                                       "labels": row["labels"][:4]}])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(pieces))
    assert (batch["labels"][1, 4:] == IGNORE).all()


def test_word_windows_cover_every_word_within_the_budget() -> None:
    assert word_windows([1, 1, 1], 5) == [(0, 3)]
    assert word_windows([2, 2, 2, 1], 4) == [(0, 2), (2, 4)]
    assert word_windows([1, 9, 1], 4) == [(0, 1), (1, 2), (2, 3)]  # a word longer than the budget alone
    assert word_windows([0, 0, 3, 1], 3) == [(0, 3), (3, 4)]  # words without pieces cost nothing
    assert word_windows([], 4) == [(0, 0)]


def test_long_sentences_become_windows_that_lose_no_word(tokenizer) -> None:  # type: ignore[no-untyped-def]
    words = ["Mutations", "in", "the", "adenomatous", "polyposis", "coli", "gene", "cause", "familial",
             "adenomatous", "polyposis", "and", "colorectal", "carcinoma", "in", "many", "kindreds", "."] * 3
    base = ["O", "O", "O", "B-Disease", "I-Disease", "I-Disease", "O", "O", "B-Disease", "I-Disease",
            "I-Disease", "O", "B-Disease", "I-Disease", "O", "O", "O", "O"]
    rows = sentences_to_dataset([(words, base * 3), (["Cancer", "."], ["B-Disease", "O"])], TAGS)
    out = get_task("token-classification").tokenize(rows, tokenizer, max_length=16)
    assert all(len(ids) <= 16 for ids in out["input_ids"])
    first = [r for r in out if r["sentence"] == 0]
    assert len(first) > 3
    assert [t for r in sorted(first, key=lambda r: r["word_start"]) for t in r["word_tags"]] == rows[0]["tags"]
    assert all(p >= 0 for r in out for p in r["first_token"])
    assert out.features["word_tags"].feature.names == TAGS


# ---------------------------------------------------------------- the loader


def test_ncbi_disease_loader_shapes_and_entity_counts(ncbi) -> None:  # type: ignore[no-untyped-def]
    assert ncbi.kind == "token-classification"
    assert ncbi.label_names == TAGS
    assert (len(ncbi.train), len(ncbi.test)) == (5424, 940)  # devel.tsv is not part of either split
    row = ncbi.train[0]
    assert row["tokens"][:3] == ["Identification", "of", "APC2"] and len(row["tokens"]) == len(row["tags"])
    assert row["label"] == 1
    # The dataset's README counts 5,134 train and 960 test entities.
    for split, expected in ((ncbi.train, 5134), (ncbi.test, 960)):
        assert sum(len(bio_entities([TAGS[t] for t in tags])) for tags in split["tags"]) == expected
        assert split["label"] == [int(any(tags)) for tags in split["tags"]]


def test_malformed_lines_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("Cancer\tB-Disease\n.\tO\n\nno tag here\n")
    with pytest.raises(DataError, match=r"bad.tsv:4: expected 'token<TAB>tag'"):
        parse_conll(bad)


def test_task_and_dataset_must_match() -> None:
    with pytest.raises(ConfigError, match="needs a word-tagged dataset"):
        RunConfig().replace(**{"model.task": "token-classification", "data.dataset": "nicta_piboso",
                               "data.partitioner": "iid"})
    with pytest.raises(ConfigError, match="needs `model.task` 'token-classification'"):
        RunConfig().replace(**{"data.dataset": "ncbi_disease", "data.partitioner": "iid"})


# ---------------------------------------------------------------- real MiniLM


def test_evaluation_joins_windows_and_scores_every_gold_entity(ncbi) -> None:  # type: ignore[no-untyped-def]
    import torch

    from fedfm.adapters import load_model

    config = RunConfig().replace(**{"model.task": "token-classification", "data.dataset": "ncbi_disease",
                                    "data.partitioner": "iid", "model.max-length": 24})
    task = get_task("token-classification")
    loaded = load_model(config.model, config.lora, task, num_labels=3)
    rows = ncbi.test.select(range(48))
    tokenized = task.tokenize(rows, loaded.tokenizer, max_length=24)
    assert len(tokenized) > len(rows)  # 24 tokens force windows
    scores = task.evaluate(loaded.model, tokenized, loaded.tokenizer, batch_size=32, device=torch.device("cpu"))
    gold = sum(len(bio_entities([TAGS[t] for t in tags])) for tags in rows["tags"])
    assert scores["entity-true"] == gold
    assert {"loss", "accuracy", "macro-f1", "entity-precision", "entity-recall", "entity-f1"} <= set(scores)
    # The adapter that travels holds the new per-token head beside LoRA's A and B.
    from fedfm.adapters import get_adapter_state

    names = list(get_adapter_state(loaded.model))
    assert any(n.endswith("classifier.weight") for n in names)
    batch = task.collate(loaded.tokenizer)([tokenized[i] for i in range(4)])
    assert task.loss(loaded.model, batch).item() > 0


@pytest.mark.integration
def test_federation_reports_entity_f1(tmp_path: Path) -> None:
    """Two hospitals, one short round, real MiniLM on NCBI-disease: entity F1 lands in metrics.jsonl."""
    import fedfm

    config = RunConfig().replace(
        **{
            "model.task": "token-classification",
            "model.max-length": 64,
            "data.dataset": "ncbi_disease",
            "data.partitioner": "iid",
            "data.num-hospitals": 2,
            "data.max-train-per-hospital": 32,
            "data.max-test": 24,
            "train.local-steps": 2,
            "train.batch-size": 8,
            "federation.num-rounds": 1,
            "federation.min-hospitals": 2,
        }
    )
    result = fedfm.run(config, out=tmp_path / "ner")
    line = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"entity-f1", "entity-precision", "entity-recall", "accuracy"} <= set(line["global"])
    assert line["global"]["entity-true"] > 0
    assert set(line["per_hospital"]) == {"hospital-0", "hospital-1"}
    for hospital in line["per_hospital"].values():
        assert 0.0 <= hospital["evaluate"]["entity-f1"] <= 1.0
    assert "entity-f1" in result.final_global
