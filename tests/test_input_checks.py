"""Careless inputs get one clear error before any model loads (issue 23: nothing lost, nothing invented).

Each test builds tiny files in ``tmp_path`` and calls the loaders a run calls;
no model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedfm.config import SECTIONS, RunConfig, from_json, load_config, to_flat
from fedfm.data import check_federation, load_source, node_data, node_federation
from fedfm.errors import ConfigError, DataError
from fedfm.workspace import federation_for


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as a CSV, JSON-lines or Parquet file, by the suffix."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _notes(sites: list[str], labels: tuple[str, ...] = ("calm", "pain")) -> list[dict[str, Any]]:
    return [{"text": f"note {i}", "label": labels[i % len(labels)], "site": site} for i, site in enumerate(sites)]


def _file_config(path: Path, **settings: Any) -> RunConfig:
    return RunConfig().replace(**{"data.dataset": path.suffix[1:], "data.path": str(path), **settings})


# 1. Floats are finite, integers within ranges no real run reaches; every problem at once.
def test_non_finite_floats_and_absurd_integers_are_refused_at_once() -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora.alpha=inf", "lora.r=1e7", "model.max-length=1e12", "federation.num-rounds=1e18",
                           "train.learning-rate=nan", "data.num-hospitals=1" + "0" * 30, "privacy.delta=-inf"])
    # Assert: one message per field, naming it, its range and the value
    assert info.value.problems == [
        "`model.max-length` must be in [8, 1048576], got 1000000000000",
        "`lora.r` must be in [1, 4096], got 10000000",
        "`lora.alpha` must be a finite number, got inf",
        "`data.num-hospitals` must be in [1, 100000], got 1000000000000000000000000000000",
        "`train.learning-rate` must be a finite number, got nan",
        "`federation.num-rounds` must be in [1, 1000000], got 1000000000000000000",
        "`privacy.delta` must be a finite number, got -inf",
    ]
    # JSON (an instruction's config) may carry NaN too; an int too large for a float is no traceback.
    flat = {**to_flat(RunConfig()), "strategy.eta": float("nan"), "lora.dropout": 10**400}
    with pytest.raises(ConfigError) as info:
        from_json(json.dumps(flat))
    assert [p.split(" must")[0] for p in info.value.problems] == ["`lora.dropout`", "`strategy.eta`"]
    # A below-range value keeps its hint.
    with pytest.raises(ConfigError, match=r"`privacy.batch-size` must be >= 0 \(0 uses train.batch-size\), got -1"):
        RunConfig().replace(**{"privacy.batch-size": -1})


def test_every_integer_field_has_a_range_beside_it() -> None:
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.type in ("int", int):
                lo, hi = f.metadata["bounds"]
                assert lo <= f.default <= hi, f"{section}.{f.name}"


# 2. More min-hospitals than the natural partition makes: refused, never capped in silence.
def test_min_hospitals_above_a_natural_partition_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "notes.csv", _notes(["north", "south", "west"] * 4))
    config = _file_config(path, **{"data.partition-column": "site", "federation.min-hospitals": 5})
    federation = federation_for(config.data)
    # Execute
    with pytest.raises(ConfigError) as info:
        check_federation(config, federation)
    # Assert
    message = str(info.value)
    assert "`federation.min-hospitals` (5) must not exceed the 3 hospitals" in message
    assert "'site'" in message and str(path) in message and "north, south, west" in message
    check_federation(config.replace(**{"federation.min-hospitals": 3}), federation)


# 3. A partition column with one value is no federation, unless one hospital is asked for.
def test_partition_column_with_one_value_is_refused_unless_min_hospitals_is_one(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.jsonl", _notes(["north"] * 8))
    config = _file_config(path, **{"data.partition-column": "site"})
    federation = federation_for(config.data)
    with pytest.raises(ConfigError) as info:
        check_federation(config, federation)
    message = str(info.value)
    assert "`data.partition-column` 'site'" in message and "one value, 'north'" in message
    assert '`data.partitioner = "iid"`' in message and "`data.num-hospitals`" in message
    assert "`federation.min-hospitals = 1`" in message
    deliberate = config.replace(**{"federation.min-hospitals": 1})
    check_federation(deliberate, federation_for(deliberate.data))


# 4. A classifier needs two classes.
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("labels", [("yes",), (1,)], ids=["string", "integer"])
def test_a_file_with_one_class_is_refused(tmp_path: Path, suffix: str, labels: tuple[Any, ...]) -> None:
    path = _write(tmp_path / f"notes{suffix}", _notes(["a", "b"] * 3, labels=labels))
    with pytest.raises(DataError) as info:
        load_source(suffix[1:], path=path)
    assert str(path) in str(info.value) and "column 'label'" in str(info.value)
    assert f"every row has the label {str(labels[0])!r}" in str(info.value)


def test_one_class_with_label_names_is_refused_for_a_federation_but_not_for_one_hospitals_file(
    tmp_path: Path,
) -> None:
    # A simulation's whole file has one class: nothing to learn.
    path = _write(tmp_path / "notes.csv", _notes(["a", "b"] * 3, labels=("yes",)))
    config = _file_config(path, **{"data.label-names": "no,yes", "data.partition-column": "site"})
    with pytest.raises(DataError, match=r"every row of 'csv' has the label 'yes' \(of \['no', 'yes'\]\)"):
        federation_for(config.data)
    # A deployment's hospital may lack a class: the classes are the federation's (data.label-names).
    node = node_data({"data-path": str(path), "hospital": "north"})
    assert node is not None
    assert node_federation(node, label_names=["no", "yes"]).source.label_names == ["no", "yes"]


# 5. Labels that differ only by surrounding spaces are one class, also against data.label-names.
def test_labels_are_stripped_of_surrounding_spaces(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.csv", _notes(["a"] * 6, labels=("yes", " yes", "no ", "no")))
    assert load_source("csv", path=path).label_names == ["no", "yes"]
    named = load_source("csv", path=path, label_names=["yes", " no"])
    assert named.label_names == ["yes", " no"] and list(named.train["label"]) == [0, 0, 1, 1, 0, 0]
    blank = _write(tmp_path / "blank.csv", _notes(["a"] * 4, labels=("yes", "  ")))
    with pytest.raises(DataError, match=r"blank.csv column 'label': 2 row\(s\) have no label \(rows 1, 3"):
        load_source("csv", path=blank)
    with pytest.raises(ConfigError, match="`data.label-names` must not repeat a name"):
        RunConfig().replace(**{"data.label-names": ["yes", "yes "]})


# 6. Rows without text are refused, blank ones too.
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_empty_or_blank_text_is_refused_naming_file_column_and_rows(tmp_path: Path, suffix: str) -> None:
    rows = _notes(["a"] * 6)
    rows[2]["text"], rows[4]["text"] = "   ", "\t"
    path = _write(tmp_path / f"notes{suffix}", rows)
    with pytest.raises(DataError) as info:
        load_source(suffix[1:], path=path)
    message = str(info.value)
    assert f"{path} column 'text'" in message and "2 row(s) have empty text (rows 2, 4)" in message


def test_a_supernodes_own_file_gets_the_same_checks(tmp_path: Path) -> None:
    rows = _notes(["a"] * 6)
    rows[1]["text"] = ""
    path = _write(tmp_path / "records.jsonl", rows)
    node = node_data({"data-path": str(path)})
    assert node is not None
    with pytest.raises(DataError, match=r"records.jsonl column 'text': 1 row\(s\) have empty text \(row 1"):
        node_federation(node, label_names=["calm", "pain"])


# 7. Text cells are strings: a list is no sentence pair, a number no text.
@pytest.mark.parametrize(
    ("suffix", "text", "found"),
    [(".jsonl", ["first", "second"], "list"), (".parquet", ["first", "second"], "list"), (".csv", 17, "int"),
     (".jsonl", 2.5, "float")],
)
def test_text_cells_must_be_strings(tmp_path: Path, suffix: str, text: Any, found: str) -> None:
    rows = [{"text": text, "label": label} for label in ("calm", "pain", "calm")]
    path = _write(tmp_path / f"notes{suffix}", rows)
    with pytest.raises(DataError) as info:
        load_source(suffix[1:], path=path)
    message = str(info.value)
    assert f"{path} column 'text'" in message and f"3 row(s) hold {found} values, not strings (rows 0, 1, 2" in message


# 8. Files that are not UTF-8 name the file and the line.
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_data_files_that_are_not_utf8_are_named(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin{suffix}"
    lines = ["text,label", "calm,a", "caf\xe9 au lait,b"] if suffix == ".csv" else [
        json.dumps({"text": "calm", "label": "a"}), '{"text": "caf\xe9", "label": "b"}']
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError, match=rf"latin{suffix} is not UTF-8 text \(line {len(lines)}, .*0xe9\)"):
        load_source(suffix[1:], path=path)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes('[model]\nname = "minilm"\n[data]\npath = "caf\xe9.csv"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"run.toml` is not UTF-8 text \(line 4: byte 0xe9\)"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbf[lora]\nr = 4\n")  # a byte-order mark is not a problem
    assert load_config(path).lora.r == 4
