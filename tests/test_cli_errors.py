"""A user's mistake ends every ``fedfm`` command with one ``fedfm: error:`` line and exit status 2, no traceback.

The exported folder is fedfm's own (``adapters.load_model`` on the tiny random
BERT, ``adapters.export_adapter``, ``export.export_settings``), written once;
each test corrupts a copy. Where a check must come before the model loads, the
test gives a folder that would fail to load differently (a base model that
does not exist, or weights cut short), so the error that comes back shows
which check ran first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedfm.cli import main
from fedfm.config import RunConfig
from fedfm.errors import DataError, FedfmError, ModelError
from fedfm.export import ExportError, ExportSettings, export_settings
from fedfm.predict import PredictError, check_exported, check_output, evaluate_file, predict_file, read_table
from fedfm.privacy.report import ReportError
from fedfm.rundir import RunDirectory

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def exported(tiny_bert: Path, tiny_csv_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported ``adapter/`` and ``merged/`` pair of the tiny BERT, with a complete ``fedfm.json``."""
    from fedfm.adapters import export_adapter, get_adapter_state, load_model
    from fedfm.config import LoraSpec, ModelSpec
    from fedfm.tasks import get_task

    root = tmp_path_factory.mktemp("exported")
    loaded = load_model(ModelSpec(name=str(tiny_bert)), LoraSpec(r=4), get_task("sequence-classification"),
                        num_labels=len(LABELS))
    export_adapter(loaded, get_adapter_state(loaded.model), root / "adapter", merged_dir=root / "merged")
    settings = export_settings(RunConfig().replace(**tiny_csv_settings), LABELS,
                               pooling=loaded.model_settings.get("pooling", ""))
    for folder in ("adapter", "merged"):
        (root / folder / "fedfm.json").write_text(json.dumps(settings.to_json()))
    (root / "rows.csv").write_text("text,label\nacute pain,positive\ncalm and stable,negative\n")
    return root


def _copy(exported: Path, tmp_path: Path, folder: str = "adapter") -> Path:
    return Path(shutil.copytree(exported / folder, tmp_path / folder))


def _edit_settings(folder: Path, **changes: Any) -> None:
    path = folder / "fedfm.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; assert exit status 2 and one closing ``fedfm: error:`` line without traceback; return it."""
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("fedfm: error: ")
    assert sum(line.startswith("fedfm: error:") for line in err.splitlines()) == 1
    return last


# --------------------------------------------------------------------------------------------------- --batch-size


@pytest.mark.parametrize("value", ["-3", "0", "two"])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_batch_size_below_one_is_refused(
    command: str, value: str, exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails([command, "--adapter", str(exported / "adapter"), "--input", str(exported / "rows.csv"),
                   "--batch-size", value], capsys)
    assert line.startswith("fedfm: error: argument --batch-size: must be an integer >= 1, got ")
    assert value in line


@pytest.mark.parametrize("batch_size", [-3, 0])
def test_python_functions_refuse_a_batch_size_below_one_before_the_folder_is_read(
    batch_size: int, exported: Path, tmp_path: Path
) -> None:
    # Prepare: weights cut short, so any step past the batch-size check would fail with another error
    folder = _copy(exported, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Execute / Assert
    for function in (predict_file, evaluate_file):
        with pytest.raises(PredictError, match=f"--batch-size must be an integer >= 1.*got {batch_size}") as raised:
            function(folder, exported / "rows.csv", batch_size=batch_size)
        assert isinstance(raised.value, FedfmError) and isinstance(raised.value, ValueError)


# --------------------------------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("folder_name, weights_name", [
    ("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors"),
])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_weights_are_named_before_any_model_loads(
    folder_name: str, weights_name: str, damage: str, exported: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    folder = _copy(exported, tmp_path, folder_name)
    weights = folder / weights_name
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    expected = "is truncated or corrupt" if damage == "truncated" else "is missing"
    # Execute / Assert: the check reads file headers only, and the command ends with its message
    with pytest.raises(ExportError, match=expected):
        check_exported(folder, ExportSettings.read(folder))
    line = _fails(["predict", "--adapter", str(folder), "--input", str(exported / "rows.csv")], capsys)
    assert f"{weights} {expected}" in line and ("copy it again" in line or "copy the whole folder again" in line)


@pytest.mark.parametrize("label_names, expected", [
    (["negative", "positive", "unsure"], r"`label_names` lists 3 classes .* has 2 outputs"),
    (["negative"], r"`label_names` lists 1 classes .* has 2 outputs"),
    ("negative,positive", r"`label_names` must be a non-empty list of strings"),
    ([0, 1], r"`label_names` must be a non-empty list of strings"),
    ([], r"`label_names` must be a non-empty list of strings"),
    (["positive", "positive"], r"`label_names` must not repeat a name"),
])
def test_edited_label_names_are_refused_naming_the_file_and_field(
    label_names: Any, expected: str, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a texts-only file, so the rows cannot fail on their labels first
    folder = _copy(exported, tmp_path)
    _edit_settings(folder, label_names=label_names)
    rows = tmp_path / "texts.csv"
    rows.write_text("text\nacute pain\n")
    # Execute / Assert
    with pytest.raises(ExportError, match=expected):
        check_exported(folder, ExportSettings.read(folder))
    line = _fails(["predict", "--adapter", str(folder), "--input", str(rows)], capsys)
    assert str(folder / "fedfm.json") in line and "re-export" in line


@pytest.mark.parametrize("text, expected", [
    ("{", "is not readable JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    (json.dumps({"task": "sequence-classification", "base_model": "minilm", "label_names": LABELS,
                 "input_format": "pdf", "max_length": -1, "pooling": "max"}),
     r"`input_format` must be one of .* got 'pdf'; `max_length` must be a positive integer, got -1; `pooling`"),
])
def test_a_damaged_fedfm_json_names_every_bad_field(
    text: str, expected: str, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(exported, tmp_path)
    (folder / "fedfm.json").write_text(text)
    with pytest.raises(ExportError, match=expected):
        ExportSettings.read(folder)
    line = _fails(["evaluate", "--adapter", str(folder), "--input", str(exported / "rows.csv")], capsys)
    assert str(folder / "fedfm.json") in line


def test_a_base_model_folder_that_is_not_a_model_is_named(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(["predict", "--adapter", str(exported / "adapter"), "--input", str(exported / "rows.csv"),
                   "--base-model", str(tmp_path / "nowhere")], capsys)
    assert f"--base-model {tmp_path / 'nowhere'} is not a model folder" in line


# --------------------------------------------------------------------------------------------------- --output


def _unloadable(exported: Path, tmp_path: Path) -> Path:
    """A copy of the adapter whose base model does not exist: loading it would fail with a ModelError."""
    folder = _copy(exported, tmp_path)
    _edit_settings(folder, base_model=str(tmp_path / "no-base-model"))
    return folder


@pytest.mark.parametrize("command, name, expected", [
    ("predict", "rows.csv/predictions.csv", "rows.csv is a file, not a folder"),
    ("predict", "taken.csv", "taken.csv is a folder"),
    ("predict", "predictions.txt", "the suffix must be one of ['.csv', '.jsonl'], got '.txt'"),
    ("evaluate", "metrics.csv", "the suffix must be '.json'"),
    ("evaluate", "rows.csv/metrics.json", "rows.csv is a file, not a folder"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(
    command: str, name: str, expected: str, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: loading this folder would fail (no base model), so an --output error proves the model never loaded
    folder = _unloadable(exported, tmp_path)
    shutil.copy(exported / "rows.csv", tmp_path / "rows.csv")
    (tmp_path / "taken.csv").mkdir()
    output = tmp_path / name
    # Execute / Assert
    line = _fails([command, "--adapter", str(folder), "--input", str(exported / "rows.csv"), "--output",
                   str(output)], capsys)
    assert line.startswith(f"fedfm: error: --output {output}") and expected in line
    if command == "predict":
        with pytest.raises(DataError):
            check_output(output)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_in_a_read_only_folder_is_refused(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _fails(["predict", "--adapter", str(_unloadable(exported, tmp_path)), "--input",
                       str(exported / "rows.csv"), "--output", str(locked / "p.csv")], capsys)
    finally:
        locked.chmod(0o700)
    assert f"folder {locked} is not writable" in line


def test_missing_output_folders_are_created(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "new" / "folder" / "metrics.json"
    assert main(["evaluate", "--adapter", str(exported / "adapter"), "--input", str(exported / "rows.csv"),
                 "--output", str(output), "--batch-size", "1"]) == 0
    assert json.loads(output.read_text())["rows"] == 2.0
    assert capsys.readouterr().err.count("fedfm: error") == 0


# --------------------------------------------------------------------------------------------------- --input


@pytest.mark.parametrize("suffix, content", [
    (".csv", b"text,label\nacute p\xe9in,positive\n"),
    (".jsonl", b'{"text": "acute p\xe9in", "label": "positive"}\n'),
])
def test_an_input_file_that_is_not_utf8_is_named(
    suffix: str, content: bytes, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / f"latin1{suffix}"
    rows.write_bytes(content)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_table(rows)
    line = _fails(["evaluate", "--adapter", str(exported / "adapter"), "--input", str(rows)], capsys)
    assert f"--input {rows} is not UTF-8 text" in line and "save it with UTF-8 encoding" in line


def test_an_input_that_is_a_folder_is_named(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows.csv").mkdir()
    line = _fails(["predict", "--adapter", str(exported / "adapter"), "--input", str(tmp_path / "rows.csv")], capsys)
    assert f"--input {tmp_path / 'rows.csv'} is a folder" in line


def test_rows_are_read_as_training_reads_them(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedfm.predict import read_rows

    settings = ExportSettings.read(exported / "adapter")
    # Labels with surrounding spaces are the trained classes, not unknown ones
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text('{"text": "acute pain", "label": " positive"}\n{"text": "calm", "label": "negative  "}\n')
    assert read_rows(spaced, settings, need_labels=True).labels == [1, 0]
    # A number or a list is not text, and a blank cell has none
    for name, cell in (("number", "3"), ("list", '["a", "b"]'), ("blank", '"  "')):
        rows = tmp_path / f"{name}.jsonl"
        rows.write_text(f'{{"text": {cell}, "label": "positive"}}\n{{"text": "calm", "label": "negative"}}\n')
        line = _fails(["evaluate", "--adapter", str(exported / "adapter"), "--input", str(rows)], capsys)
        assert f"{rows} column 'text'" in line and "row" in line, line


# --------------------------------------------------------------------------------------------------- privacy-report


def _run_dir(path: Path) -> Path:
    """A two-round run directory written through fedfm's RunDirectory."""
    directory = RunDirectory(path)
    directory.write_config(RunConfig())
    for server_round in (1, 2):
        directory.append_round({"round": server_round, "global": {"accuracy": 0.5 + 0.1 * server_round}})
    directory.write_summary({"rounds": 2, "privacy": {"mode": "none", "client_dp": "none"}})
    return path


@pytest.mark.parametrize("damage, expected", [
    ("metrics-line", "metrics.jsonl line 2 is not a round record"),
    ("metrics-bytes", "metrics.jsonl cannot be read"),
    ("summary", "summary.json cannot be read"),
    ("summary-list", "summary.json does not hold a JSON object"),
])
def test_privacy_report_names_a_damaged_run_file_as_fedfm_report_does(
    damage: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run = _run_dir(tmp_path / "run")
    metrics = run / "metrics.jsonl"
    if damage == "metrics-line":
        metrics.write_text(metrics.read_text().splitlines()[0] + '\n{"round": 2, "glo\n')
    elif damage == "metrics-bytes":
        metrics.write_bytes(b'{"round": 1, "name": "\xe9"}\n')
    else:
        (run / "summary.json").write_text("{" if damage == "summary" else "[]")
    # Execute / Assert: both commands refuse the run with the same line
    privacy = _fails(["privacy-report", str(run)], capsys)
    report = _fails(["report", str(run)], capsys)
    assert expected in privacy and "restore it from a copy" in privacy
    assert privacy == report


@pytest.mark.parametrize("name, expected", [
    ("eps.txt", "the file name must end in '.png'"),
    ("summary.json/eps.png", "summary.json is a file, not a folder"),
    ("taken.png", "taken.png is a folder"),
])
def test_privacy_report_refuses_a_bad_plot_path_before_reading_the_run(
    name: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path / "run")
    (tmp_path / "taken.png").mkdir()
    plot = (run if name.startswith("summary") else tmp_path) / name
    line = _fails(["privacy-report", str(run), "--plot", str(plot)], capsys)
    assert line.startswith(f"fedfm: error: --plot {plot}") and expected in line
    assert capsys.readouterr().out == ""  # nothing of the ledger printed before the refusal


def test_privacy_report_plot_refuses_another_suffix_from_python(tmp_path: Path) -> None:
    from fedfm.privacy.report import plot_epsilon

    with pytest.raises(ReportError, match="must end in '.png'"):
        plot_epsilon([{"round": 1}], tmp_path / "eps.pdf")


def test_privacy_report_counts_a_round_written_twice_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A resumed run that wrote round 2 again: the later line holds, as in `fedfm report`
    run = _run_dir(tmp_path / "run")
    privacy = {"sample_level_epsilon": {"north": 1.0}}
    lines = [json.dumps({"round": 1, "privacy": privacy}), json.dumps({"round": 2, "privacy": privacy}),
             json.dumps({"round": 2, "privacy": {"sample_level_epsilon": {"north": 2.5}}})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["privacy-report", str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [row.split() for row in table[1:3]] == [["1", "1.000"], ["2", "2.500"]]


# --------------------------------------------------------------------------------------------------- the safety net


@pytest.mark.parametrize("argv, expected", [
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    (["predict", "--adapter", "x"], "the following arguments are required: --input"),
    (["report"], "the following arguments are required: run_dir"),
])
def test_usage_errors_end_with_the_fedfm_error_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(argv, capsys)
    assert line == f"fedfm: error: {expected}" or line.startswith(f"fedfm: error: {expected}")


@pytest.mark.parametrize("code, expected", [
    ('open("hospital-weights.csv")', "hospital-weights.csv: No such file or directory"),
    ('open("notes.txt", encoding="utf-8").read()', "a file is not UTF-8 text"),
])
def test_an_os_or_encoding_error_from_a_users_file_becomes_one_line(
    code: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A strategy module of the user's own (imported from the working directory) that reads a file of theirs
    (tmp_path / "notes.txt").write_bytes(b"caf\xe9")
    module = f"user_strategy_{abs(hash(code))}"
    (tmp_path / f"{module}.py").write_text(code + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() adds the working directory
    line = _fails(["check", "--set", f"federation.strategy={module}:Mine"], capsys)
    assert expected in line


def test_verbose_prints_the_traceback_before_the_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path / "run")
    (run / "summary.json").write_text("{")
    assert main(["--verbose", "privacy-report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ReportError" in err
    assert err.rstrip("\n").splitlines()[-1].startswith(f"fedfm: error: {run / 'summary.json'} cannot be read")


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("fedfm")
    if not script.is_file():
        pytest.skip("the fedfm console script is not installed beside this Python")
    run = _run_dir(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"round": 1, "glo\n')
    done = subprocess.run([str(script), "privacy-report", str(run)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    expected = (f"fedfm: error: {run / 'metrics.jsonl'} line 1 is not a round record "
                f"(Unterminated string starting at: line 1 column 14 (char 13)): it was changed or damaged after the "
                f"run wrote it; restore it from a copy of the run directory")
    assert done.stderr.splitlines() == [expected]


def test_model_errors_keep_their_type(exported: Path, tmp_path: Path) -> None:
    # The Python API raises fedfm's own errors, which the command turns into its line
    with pytest.raises(ModelError, match="is not a model folder"):
        predict_file(exported / "adapter", exported / "rows.csv", base_model=str(tmp_path))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "fedfm hospital needs exactly one of --insecure"),
        (["--insecure", "--root-certificates", "ca.pem"], "fedfm hospital needs exactly one of --insecure"),
        (["--insecure", "--runtime-api-address", "9094"], "--runtime-api-address '9094' must be host:port"),
        (["--root-certificates", "{tmp}/missing.pem"], "--root-certificates {tmp}/missing.pem: no such file"),
    ],
    ids=["neither", "both", "no-port", "missing-ca"],
)
def test_a_warm_hospital_with_bad_options_is_refused_before_it_asks_for_tasks(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(["hospital", *[a.replace("{tmp}", str(tmp_path)) for a in args]], capsys)
    assert expected.replace("{tmp}", str(tmp_path)) in line


# --------------------------------------------------------------------------------------------- report, several runs


@pytest.mark.parametrize("case, expected", [
    ("not-a-run", "{tmp}/notes is not a fedfm run directory"),
    ("missing", "run directory {tmp}/typo does not exist"),
    ("twice", "run directory {tmp}/./run is given twice ({tmp}/run and {tmp}/./run)"),
    ("out-is-a-file", "cannot write the comparison into {tmp}/taken: {tmp}/taken is a file, not a folder"),
    ("out-under-a-file", "cannot write the comparison into {tmp}/taken/cmp: {tmp}/taken is a file, not a folder"),
    ("no-out", "comparing 2 runs needs --out DIR"),
])
def test_report_of_several_runs_refuses_before_drawing_anything(
    case: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a good run, then a second run directory (or its mistake) and --out (or its mistake)
    run = _run_dir(tmp_path / "run")
    other = str(_run_dir(tmp_path / "other"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "taken").write_text("a file")
    second = {"not-a-run": str(tmp_path / "notes"), "missing": str(tmp_path / "typo"),
              "twice": f"{tmp_path}/./run"}.get(case, other)
    out = {"out-is-a-file": ["--out", str(tmp_path / "taken")], "out-under-a-file": ["--out", str(tmp_path / "taken" / "cmp")],
           "no-out": []}.get(case, ["--out", str(tmp_path / "out")])

    # Execute
    line = _fails(["report", str(run), second, *out], capsys)

    # Assert: the one line names the mistake; nothing was drawn anywhere
    assert line.startswith("fedfm: error: ") and expected.replace("{tmp}", str(tmp_path)) in line, line
    assert capsys.readouterr().out == ""
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("comparison.md"))
