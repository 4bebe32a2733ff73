"""``fedfm report`` on run directories written through the real RunDirectory, and the progress display."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import tomllib

from fedfm import keys
from fedfm.cli import _parser, main
from fedfm.config import RunConfig
from fedfm.errors import ConfigError, FedfmError
from fedfm.progress import LineProgress, LiveProgress, Progress, RoundStatus, format_status, progress_display
from fedfm.report import ReportError, read_run, write_report
from fedfm.report_compare import COMPARISON, compare_runs, plot_comparison, read_comparison
from fedfm.rundir import (
    ClientLevel,
    FinalScores,
    HospitalEntry,
    HospitalRows,
    RoundEntry,
    RoundPrivacy,
    RunDirectory,
    RunSummary,
    round_line,
)

HOSPITALS = {"north": (44, 12), "south": (36, 10)}  # train rows, test rows


def _round(server_round: int, *, dp: bool = False, client_level: bool = False, refused: str = "") -> RoundEntry:
    """One round as the server's recorder records it (the values move with the round)."""
    per_hospital: dict[str, HospitalEntry] = {}
    for index, (name, (train_rows, test_rows)) in enumerate(HOSPITALS.items()):
        score = 0.5 + 0.1 * server_round + 0.01 * index
        train: dict[str, float] = {
            keys.HOSPITAL_INDEX: index, keys.NUM_EXAMPLES: train_rows, keys.TRAIN_LOSS: 0.7 - 0.05 * server_round,
        }
        if dp:
            train.update({
                keys.DP_EPSILON: 1.5 * server_round + index if name != refused else 1.5, keys.DP_DELTA: 1e-5,
                keys.DP_TARGET_EPSILON: 8.0, keys.DP_NOISE_MULTIPLIER: 0.9, keys.DP_SAMPLE_RATE: 0.25,
                keys.DP_STEPS: 3 * server_round, keys.DP_REFUSED: float(name == refused and server_round > 1),
            })
        per_hospital[name] = HospitalEntry(
            train=train,
            evaluate={keys.HOSPITAL_INDEX: index, keys.NUM_EXAMPLES: test_rows, "accuracy": score,
                      "macro-f1": score - 0.05, "loss": 1.0 - score},
            bytes_up=30_000 + 1000 * index,
            bytes_down=60_000,
        )
    return RoundEntry(
        round=server_round,
        global_={"accuracy": 0.55 + 0.1 * server_round, "macro-f1": 0.5 + 0.1 * server_round,
                 "loss": 0.6 - 0.05 * server_round},
        federated={"accuracy": 0.54 + 0.1 * server_round, "macro-f1": 0.49 + 0.1 * server_round,
                   "loss": 0.61 - 0.05 * server_round},
        per_hospital=per_hospital,
        bytes_up=sum(h.bytes_up for h in per_hospital.values()),
        bytes_down=sum(h.bytes_down for h in per_hospital.values()),
        aggregated=True,
        left_out={f"train:{refused}": "refused to train: budget spent"} if refused and server_round > 1 else {},
        retries=0,
        seconds=3.0,
        privacy=RoundPrivacy(
            sample_level_epsilon={n: v.train[keys.DP_EPSILON] for n, v in per_hospital.items()} if dp else {},
            client_level=ClientLevel(epsilon=0.8 * server_round, delta=1e-3, releases=server_round,
                                     noise_multiplier=1.0, sample_rate=1.0, clipping_norm=0.1) if client_level else None,
        ),
    )


def _run_dir(path: Path, *, rounds: int = 3, planned: int = 3, summary: bool = True,
             settings: dict[str, Any] | None = None, **kinds: Any) -> Path:
    """A run directory written through fedfm's own RunDirectory (config, metrics lines, summary)."""
    directory = RunDirectory(path)
    directory.write_config(RunConfig().replace(**{
        "federation.num-rounds": planned,
        "privacy.mode": "dp-sgd" if kinds.get("dp") else "none",
        "privacy.client-dp": "server-fixed" if kinds.get("client_level") else "none",
        **(settings or {}),
    }))
    history = []
    for server_round in range(1, rounds + 1):
        history.append(_round(server_round, **kinds))
        directory.append_round(history[-1])
    if summary:
        last = history[-1]
        directory.write_summary(RunSummary(
            rounds=rounds,
            initial_global={"accuracy": 0.5, "macro-f1": 0.4, "loss": 0.69},
            final=FinalScores(global_=last.global_,
                              per_hospital={n: v.evaluate for n, v in last.per_hospital.items()}),
            hospitals={n: HospitalRows(train_rows=tr, test_rows=te) for n, (tr, te) in HOSPITALS.items()},
            global_test_rows=22,
            bytes_up=sum(e.bytes_up for e in history),
            bytes_down=sum(e.bytes_down for e in history),
            model="minilm", dataset="csv", strategy="fedavg", compression="none",
            adapter_parameters=1234, base_parameters=22_000_000, wall_seconds=7.5,
        ))
    return path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"


def test_report_of_a_finished_run_plots_and_tabulates_what_the_files_hold(tmp_path: Path) -> None:
    # Prepare
    run_dir = _run_dir(tmp_path / "run")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())

    # Execute
    report = write_report(run_dir)

    # Assert: the default folder, the plots, and no ε plot without DP
    assert report == run_dir / "report" / "report.md"
    for name in ("global.png", "hospitals.png", "bytes.png"):
        _assert_png(report.parent / name)
        assert f"]({name})" in report.read_text()
    assert not (report.parent / "epsilon.png").exists()
    text = report.read_text()
    assert "finished: 3 of 3 rounds" in text
    assert "## Privacy" not in text
    final = lines[-1]
    for name in ("accuracy", "macro-f1", "loss"):
        assert f"{summary['final']['global'][name]:.4f}" in text
        for hospital in HOSPITALS:
            assert f"{final['per_hospital'][hospital]['evaluate'][name]:.4f}" in text
    for hospital, (train_rows, test_rows) in HOSPITALS.items():
        assert f"| {hospital} | {train_rows} | {test_rows} |" in text
    assert f"**{summary['bytes']['up']:,}**" in text and f"**{summary['bytes']['down']:,}**" in text
    assert "before training (round 0) | 0.5000" in text


def test_report_of_a_dp_run_draws_and_tabulates_epsilon(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", dp=True, client_level=True, refused="north")

    report = write_report(run_dir, tmp_path / "elsewhere")

    assert report == tmp_path / "elsewhere" / "report.md"
    _assert_png(report.parent / "epsilon.png")
    text = report.read_text()
    section = text[text.index("## Privacy"):text.index("## Communication")]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for hospital, spent in last["privacy"]["sample_level_epsilon"].items():
        assert f"| {hospital} | {spent:.3f} | 8.00 |" in section
    assert "| 2, 3 |" in section  # north refused rounds 2 and 3
    assert f"ε {last['privacy']['client_level']['epsilon']:.3f}" in section
    assert "refused to train" in text  # the rounds table names what was left out


def test_a_stopped_run_without_summary_still_reports(tmp_path: Path) -> None:
    # Prepare: 2 of 5 rounds recorded, no summary.json (killed), and round 2 written twice (resumed)
    run_dir = _run_dir(tmp_path / "run", rounds=2, planned=5, summary=False)
    later = _round(2)
    later = dataclasses.replace(later, global_={**later.global_, "accuracy": 0.987654})
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(round_line(later) + "\n")

    run = read_run(run_dir)
    report = write_report(run_dir)

    assert [entry.round for entry in run.rounds] == [1, 2] and not run.finished
    text = report.read_text()
    assert "incomplete: 2 of 5 rounds recorded" in text and f"fedfm run --resume {run_dir}" in text
    assert "0.9877" in text  # the later line of round 2 holds
    for hospital, (train_rows, test_rows) in HOSPITALS.items():  # sizes from the hospitals' replies
        assert f"| {hospital} | {train_rows} | {test_rows} |" in text
    _assert_png(report.parent / "global.png")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not-a-run", "is not a fedfm run directory"),
    ("no-rounds", "has no completed round yet"),
    ("empty-metrics", "metrics.jsonl is empty"),
    ("corrupt-line", "metrics.jsonl line 2 is not a round record"),
    ("corrupt-summary", "summary.json cannot be read"),
])
def test_unusable_run_directories_are_refused_naming_the_file(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    if case == "not-a-run":
        run_dir.mkdir()
    elif case == "no-rounds":
        RunDirectory(run_dir).write_config(RunConfig())
    elif case == "empty-metrics":
        RunDirectory(run_dir).write_config(RunConfig())
        (run_dir / "metrics.jsonl").write_text("\n")
    elif case in ("corrupt-line", "corrupt-summary"):
        _run_dir(run_dir, rounds=2)
        if case == "corrupt-line":
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            (run_dir / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
        else:
            (run_dir / "summary.json").write_text("{")

    # Execute / Assert: the Python API raises fedfm's error, the command exits 2 with one line, no traceback
    with pytest.raises(ReportError, match=message) as raised:
        write_report(run_dir)
    assert isinstance(raised.value, FedfmError)
    assert main(["report", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedfm: error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_report_writes_where_told_and_lists_the_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path / "run", dp=True)

    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"report: {tmp_path / 'out' / 'report.md'}"
    assert [line.split("/")[-1] for line in out[1:]] == ["global.png", "hospitals.png", "epsilon.png", "bytes.png"]


# -------------------------------------------------------------------------------------------------- comparing runs


def _runs_table(text: str) -> dict[str, dict[str, str]]:
    """The comparison's table of runs, as run name to column to cell."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    head = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    rows = [dict(zip(head, (cell.strip() for cell in line.strip("|").split(" | ")), strict=True)) for line in lines[2:]]
    return {row["run"]: row for row in rows}


def _global(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(round, value) of a global metric as metrics.jsonl holds it (the later line of a round written twice)."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if metric in entry["global"]:
            values[entry["round"]] = entry["global"][metric]
    return sorted(values.items())


def _generative_run(path: Path, rounds: int = 2) -> Path:
    """An instruction-tuning run: perplexity and loss, no accuracy."""
    directory = RunDirectory(path)
    directory.write_config(RunConfig().replace(**{"model.task": "instruction-tuning", "federation.num-rounds": rounds,
                                                 "data.dataset": "medical_meadow_wikidoc_patient"}))
    for server_round in range(1, rounds + 1):
        directory.append_round(RoundEntry(round=server_round, global_={"perplexity": 40.0 / server_round,
                                                                       "loss": 3.7 - 0.7 * server_round}))
    return path


def test_comparison_tabulates_the_settings_that_differ_and_each_runs_final_and_best(tmp_path: Path) -> None:
    # Prepare: two runs of a sweep over the learning rate; the second's best accuracy is in round 2, not the last
    fast = _run_dir(tmp_path / "lr-0.002", settings={"train.learning-rate": 0.002})
    slow = _run_dir(tmp_path / "lr-0.0005", rounds=2, planned=3, summary=False, dp=True,
                    settings={"train.learning-rate": 0.0005})
    better = _round(2, dp=True)
    with (slow / "metrics.jsonl").open("a") as f:
        f.write(round_line(dataclasses.replace(better, global_={**better.global_, "accuracy": 0.9876})) + "\n")

    # Execute
    comparison = compare_runs([fast, slow], tmp_path / "out")

    # Assert: only the settings whose stored values differ are columns, with each run's stored value
    assert comparison == tmp_path / "out" / COMPARISON
    table = _runs_table(comparison.read_text())
    assert list(table) == ["lr-0.002", "lr-0.0005"]
    configs = {name: tomllib.loads((tmp_path / name / "config.toml").read_text()) for name in table}
    differing = [column for column in table["lr-0.002"] if "." in column]
    assert differing == ["train.learning-rate", "privacy.mode"]
    for name, row in table.items():
        assert row["train.learning-rate"] == str(configs[name]["train"]["learning-rate"])
        assert row["privacy.mode"] == configs[name]["privacy"]["mode"]
    # the final and best global metrics are those metrics.jsonl holds, with their rounds
    for name, run_dir in (("lr-0.002", fast), ("lr-0.0005", slow)):
        for metric in ("accuracy", "macro-f1", "loss"):
            values = _global(run_dir, metric)
            best = (min if metric == "loss" else max)(values, key=lambda item: item[1])
            assert table[name][f"final {metric}"] == f"{values[-1][1]:.4f} (round {values[-1][0]})"
            assert table[name][f"best {metric}"] == f"{best[1]:.4f} (round {best[0]})"
    assert table["lr-0.0005"]["best accuracy"] == "0.9876 (round 2)"
    assert table["lr-0.002"]["rounds"] == "3 of 3" and table["lr-0.0005"]["rounds"] == "2 of 3, incomplete"
    assert table["lr-0.002"]["wall time"] == "7.5 s" and table["lr-0.0005"]["wall time"] == "-"
    last = json.loads((slow / "metrics.jsonl").read_text().splitlines()[-1])
    assert table["lr-0.0005"]["max ε"] == f"{max(last['privacy']['sample_level_epsilon'].values()):.3f} (sample-level)"
    assert table["lr-0.002"]["max ε"] == "-"


def test_each_comparison_plot_has_one_line_per_run_with_its_recorded_values(tmp_path: Path) -> None:
    # Prepare: three runs, two with the same directory name, one with client-level DP
    runs = [_run_dir(tmp_path / "a" / "run"), _run_dir(tmp_path / "b" / "run", rounds=2),
            _run_dir(tmp_path / "dp", client_level=True)]

    # Execute
    comparison = read_comparison(runs)
    report = compare_runs(runs, tmp_path / "out")

    # Assert: the names told apart, a plot per metric and for ε and bytes, each written
    assert comparison.names == ["a/run", "b/run", "dp"]
    assert [plot.file for plot in comparison.plots] == [
        "compare-accuracy.png", "compare-macro-f1.png", "compare-loss.png", "compare-epsilon.png", "compare-bytes.png"]
    for plot in comparison.plots:
        _assert_png(report.parent / plot.file)
        assert f"]({plot.file})" in report.read_text()
    plots = {plot.file: plot for plot in comparison.plots}
    for metric in ("accuracy", "loss"):
        figure = plot_comparison(plots[f"compare-{metric}.png"], tmp_path / f"{metric}.png", comparison.names)
        lines = figure.axes[0].get_lines()
        assert [line.get_label() for line in lines] == comparison.names
        for line, run_dir in zip(lines, runs, strict=True):
            initial = json.loads((run_dir / "summary.json").read_text())["initial"]["global"][metric]
            assert list(line.get_xdata()) == [0, *(r for r, _ in _global(run_dir, metric))]
            assert list(line.get_ydata()) == [initial, *(v for _, v in _global(run_dir, metric))]
    epsilon = plot_comparison(plots["compare-epsilon.png"], tmp_path / "eps.png", comparison.names)
    assert [[line.get_label() for line in axes.get_lines()] for axes in epsilon.axes] == [["dp"]]
    client = [json.loads(line)["privacy"]["client_level"]["epsilon"]
              for line in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert list(epsilon.axes[0].get_lines()[0].get_ydata()) == client
    sent = plot_comparison(plots["compare-bytes.png"], tmp_path / "bytes.png", comparison.names)
    for axes, key in zip(sent.axes, ("bytes_up", "bytes_down"), strict=True):
        assert [line.get_label() for line in axes.get_lines()] == comparison.names
        assert [list(line.get_ydata()) for line in axes.get_lines()] == [
            [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]


def test_runs_of_different_tasks_plot_only_what_each_has_and_say_what_is_missing(tmp_path: Path) -> None:
    classifier = _run_dir(tmp_path / "classifier")
    generative = _generative_run(tmp_path / "generative")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "compare-old-metric.png").write_bytes(b"left from an earlier comparison")

    comparison = read_comparison([classifier, generative])
    report = compare_runs([classifier, generative], tmp_path / "out")

    lines = {plot.file: list(plot.panels[0].lines) for plot in comparison.plots}
    assert lines == {"compare-accuracy.png": ["classifier"], "compare-macro-f1.png": ["classifier"],
                     "compare-perplexity.png": ["generative"], "compare-loss.png": ["classifier", "generative"],
                     "compare-bytes.png": ["classifier", "generative"]}
    figure = plot_comparison(comparison.plots[2], tmp_path / "p.png", comparison.names)
    assert figure.axes[0].get_yscale() == "log"
    text = report.read_text()
    assert "- classifier has no perplexity" in text and "- generative has no accuracy, macro-f1" in text
    table = _runs_table(text)
    assert table["generative"]["final accuracy"] == "-" and table["generative"]["final perplexity"] == "20.0000 (round 2)"
    assert table["classifier"]["model.task"] == "sequence-classification"
    assert sorted(p.name for p in report.parent.glob("*.png")) == sorted(lines)  # the stale plot is gone


def test_one_run_directory_still_writes_the_single_runs_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(tmp_path / "run")

    assert main(["report", str(run_dir), "--out", str(tmp_path / "cli")]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"report: {tmp_path / 'cli' / 'report.md'}"
    expected = write_report(run_dir, tmp_path / "api").read_text()
    assert (tmp_path / "cli" / "report.md").read_text() == expected
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["bytes.png", "global.png", "hospitals.png",
                                                                     "report.md"]


def test_cli_compares_several_runs_and_lists_the_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(_run_dir(tmp_path / "a")), str(_generative_run(tmp_path / "b"))]

    assert main(["report", *runs, "--out", str(tmp_path / "out")]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"comparison: {tmp_path / 'out' / COMPARISON}"
    assert sorted(line.removeprefix("plot:   ") for line in out[1:]) == sorted(
        str(p) for p in (tmp_path / "out").glob("*.png"))
    assert len(out) == 1 + 5  # accuracy, macro-f1, perplexity, loss, bytes


def test_compare_runs_refuses_a_single_run_and_a_run_given_twice(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run")

    with pytest.raises(ReportError, match="two or more run directories, got 1"):
        compare_runs([run_dir], tmp_path / "out")
    with pytest.raises(ReportError, match="is given twice: name each run once"):
        compare_runs([run_dir, run_dir], tmp_path / "out")
    with pytest.raises(ReportError, match=r"is given twice \(.*run and .*run/\)"):
        compare_runs([str(run_dir), f"{run_dir}/"], tmp_path / "out")
    assert not (tmp_path / "out").exists()



# -------------------------------------------------------------------------------------------------------- progress


@pytest.fixture(autouse=True)
def _fedfm_logs_at_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``fedfm run`` sets it (runner.setup_logging); the display stays off when the logger is quieter."""
    monkeypatch.setattr(logging.getLogger("fedfm"), "level", logging.INFO)
    monkeypatch.delenv("FEDFM_PROGRESS", raising=False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_writes_one_line_per_round() -> None:
    stream = io.StringIO()
    progress = progress_display("auto", stream=stream)  # not a terminal: plain lines
    assert isinstance(progress, LineProgress)

    with progress:
        progress.begin(done=0, total_rounds=3, hospitals=2)
        for server_round in (1, 2):
            progress.round_done(_round(server_round, refused="south"), total_rounds=3, hospitals=2,
                                replied=2 if server_round == 1 else 1)

    assert stream.getvalue().splitlines() == [
        "progress: round 1/3 (33%) | replied 2/2 | global accuracy 0.650 macro-f1 0.600 loss 0.550 | 3.0 s | ~6s left",
        ("progress: round 2/3 (67%) | replied 1/2, 1 left out | global accuracy 0.750 macro-f1 0.700 loss 0.500 "
         "| 3.0 s | ~3s left"),
    ]
    last = RoundStatus.from_entry(_round(3), total_rounds=3, hospitals=2, replied=2)
    assert format_status(last, eta=0.0).endswith("| 3.0 s")  # the last round: nothing left to estimate


@pytest.mark.parametrize("mode, env", [(False, None), ("off", None), ("auto", "off"), (True, "off")])
def test_progress_turns_off(mode: str | bool, env: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("FEDFM_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("FEDFM_PROGRESS", env)
    stream = _Terminal()

    with progress_display(mode, stream=stream) as progress:
        progress.begin(done=0, total_rounds=2, hospitals=2)
        progress.round_done(_round(1), total_rounds=2, hospitals=2, replied=2)

    assert type(progress) is Progress
    assert stream.getvalue() == ""


def test_progress_follows_the_fedfm_loggers_level_and_refuses_unknown_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDFM_PROGRESS", raising=False)
    fedfm_logger = logging.getLogger("fedfm")
    level = fedfm_logger.level
    fedfm_logger.setLevel(logging.WARNING)
    try:
        assert type(progress_display("lines", stream=io.StringIO())) is Progress  # quiet: nothing shown
    finally:
        fedfm_logger.setLevel(level)
    with pytest.raises(ConfigError, match="`progress` must be one of"):
        progress_display("fancy")
    monkeypatch.setenv("FEDFM_PROGRESS", "loud")
    with pytest.raises(ConfigError, match="FEDFM_PROGRESS"):
        progress_display()
    assert _parser().parse_args(["run", "--no-progress"]).no_progress is True


def test_live_progress_redraws_in_place_and_keeps_log_lines_above(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a terminal for the display and a log handler writing to the same terminal
    monkeypatch.delenv("FEDFM_PROGRESS", raising=False)
    terminal = _Terminal()
    handler = logging.StreamHandler(terminal)
    fedfm_logger = logging.getLogger("fedfm")
    fedfm_logger.addHandler(handler)
    level = fedfm_logger.level
    fedfm_logger.setLevel(logging.INFO)
    try:
        chosen = progress_display("auto", stream=terminal)
        chosen.close()
        assert isinstance(chosen, LiveProgress) and terminal.getvalue() == ""

        # Execute (no clock ticking in a test: redraws on events only)
        with LiveProgress(terminal, refresh=None) as progress:
            progress.begin(done=0, total_rounds=4, hospitals=2)
            progress.round_done(_round(1), total_rounds=4, hospitals=2, replied=2)
            fedfm_logger.info("a log line")
        # Assert
        text = terminal.getvalue()
        assert handler.stream is terminal  # given back
    finally:
        fedfm_logger.removeHandler(handler)
        fedfm_logger.setLevel(level)
    frames = text.split("\r\x1b[2K")
    assert frames[1].startswith("fedfm ▕") and "0/4" in frames[1]
    after_round = next(f for f in frames if "1/4" in f)
    assert "replied 2/2" in after_round and "global accuracy 0.650" in after_round
    # the log line is written on a cleared line, then the status comes back under it, and is erased at the end
    assert "\r\x1b[2Ka log line\n\r\x1b[2Kfedfm ▕" in text
    assert text.endswith("\r\x1b[2K")


def test_the_servers_recorder_feeds_the_progress_display_and_the_report(
    tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    """The server's recorder, as the round loop calls it: a metrics line, a checkpoint, a progress line; then a report."""
    from fedfm.server import Recorder, build_strategy, initial_arrays
    from fedfm.strategies import RoundRecord
    from fedfm.wire import numpy_to_record
    from fedfm.workspace import workspace_for

    # Prepare: the tiny federation of two hospitals, and what the guard recorded of round 1
    config = RunConfig().replace(**{**tiny_csv_settings, "federation.num-rounds": 2, "federation.min-hospitals": 2})
    workspace = workspace_for(config)
    strategy = build_strategy(config, workspace)
    strategy.rounds[1] = RoundRecord(
        train={0: {keys.NUM_EXAMPLES: 35.0, keys.TRAIN_LOSS: 0.69}},
        evaluate={i: {keys.NUM_EXAMPLES: 9.0, "accuracy": 0.5 + i / 4, "loss": 0.7} for i in (0, 1)},
        bytes_up={0: 4000}, left_out={"train:hospital 1 (node 8)": "NaN in the update"},
        train_aggregated=True, train_replies=1,
    )
    stream = io.StringIO()
    recorder = Recorder(config, workspace, strategy, RunDirectory(tmp_path / "run"), LineProgress(stream))

    # Execute
    recorder.record_round(1, numpy_to_record(initial_arrays(workspace, config)), {"accuracy": 0.625, "loss": 0.69})
    report = write_report(tmp_path / "run")

    # Assert
    assert stream.getvalue().startswith("progress: round 1/2 (50%) | replied 1/2, 1 left out | global accuracy 0.625 ")
    assert "| north | 0.5000 |" in report.read_text() and "NaN in the update" in report.read_text()
    _assert_png(report.parent / "hospitals.png")
