"""DP-SGD in a real Flower simulation: 3 hospitals, ε growing every round, one stopping at its budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_only_the_head_moved
from fedfm import keys
from fedfm.config import RunConfig
from fedfm.privacy.accounting import HospitalLedger, default_delta
from fedfm.privacy.dpsgd import sample_rate
from fedfm.privacy.hospital import LEDGER_FILE, dp_batch_size
from fedfm.workspace import workspace_for

pytestmark = pytest.mark.integration

SIGMA, STEPS = 0.9, 3


@pytest.fixture(scope="module")
def dp_run(tiny_csv_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Fixed noise; hospital-0's budget pays for two of the four rounds, the others' for all four; audited."""
    import fedfm

    config = RunConfig().replace(**{
        **tiny_csv_settings,
        "data.partitioner": "iid",
        "data.num-hospitals": 3,
        "train.learning-rate": 2e-2,
        "train.local-steps": STEPS,
        "federation.num-rounds": 4,
        "federation.min-hospitals": 2,
        "privacy.mode": "dp-sgd",
        "privacy.recipe": "lora",
        "privacy.noise-multiplier": SIGMA,
        "privacy.target-epsilon": 1000.0,
        "privacy.audit": True,
    })
    rows = len(workspace_for(config).hospital_rows("train", 0))
    ledger = HospitalLedger("hospital-0", 1e9, default_delta(rows), SIGMA, sample_rate(dp_batch_size(config), rows), STEPS)
    two_rounds = ledger.after_training(1, STEPS).after_training(2, STEPS).epsilon()
    config = config.replace(**{"privacy.hospital-epsilon": (f"hospital-0={two_rounds * 1.01:.6f}",)})
    return fedfm.run(config, out=tmp_path_factory.mktemp("dp") / "run")


def test_three_hospitals_spend_their_budgets_round_by_round(dp_run) -> None:  # type: ignore[no-untyped-def]
    result = dp_run
    # Every round aggregates; hospital-0 trains in rounds 1-2, then refuses and sends nothing
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["aggregated"] for line in lines] == [True] * 4
    spent = {name: [line["privacy"]["sample_level_epsilon"][name] for line in lines] for name in result.summary["hospitals"]}
    for name in ("hospital-1", "hospital-2"):
        assert all(b > a for a, b in zip(spent[name], spent[name][1:], strict=False)), spent[name]
    assert spent["hospital-0"][1] > spent["hospital-0"][0]
    assert spent["hospital-0"][1] == spent["hospital-0"][2] == spent["hospital-0"][3]
    for line in lines[2:]:
        assert line["per_hospital"]["hospital-0"]["train"][keys.DP_REFUSED] == 1
        # Its reply is a few scalars (training and evaluation metrics), no adapter.
        assert line["per_hospital"]["hospital-0"]["bytes_up"] < 1000 < line["per_hospital"]["hospital-1"]["bytes_up"]
        assert any("refused to train" in reason for reason in line["left_out"].values())
    ledger_summary = result.summary["privacy"]["hospitals"]
    assert ledger_summary["hospital-0"]["rounds_trained"] == [1, 2]
    assert ledger_summary["hospital-0"]["rounds_refused"] == [3, 4]
    assert ledger_summary["hospital-1"]["rounds_trained"] == [1, 2, 3, 4]
    assert ledger_summary["hospital-1"]["steps"] == 4 * STEPS
    assert ledger_summary["hospital-0"]["epsilon"] <= ledger_summary["hospital-0"]["target_epsilon"]
    # Each hospital's own ledger file agrees with what the server recorded.
    for name, row in ledger_summary.items():
        stored = HospitalLedger.load(result.run_dir / "hospitals" / name / LEDGER_FILE)
        assert stored is not None
        assert stored.epsilon() == pytest.approx(row["epsilon"])


def test_every_reported_epsilon_is_recomputed_by_a_fresh_opacus_accountant(dp_run) -> None:  # type: ignore[no-untyped-def]
    from opacus.accountants import RDPAccountant

    lines = [json.loads(x) for x in (dp_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in dp_run.summary["hospitals"]:
        stored = HospitalLedger.load(dp_run.run_dir / "hospitals" / name / LEDGER_FILE)
        assert stored is not None
        accountant = RDPAccountant()
        for line in lines:
            if line["round"] in stored.rounds:  # the steps this hospital took in this round, one at a time
                for _ in range(stored.steps_per_round):
                    accountant.step(noise_multiplier=stored.noise_multiplier, sample_rate=stored.sample_rate)
            reported = line["privacy"]["sample_level_epsilon"][name]
            assert reported == pytest.approx(accountant.get_epsilon(delta=stored.delta), rel=1e-9)
        # Under DP-SGD the reply held no unnoised statistic of the rows.
        assert not {keys.TRAIN_LOSS, keys.TRAIN_EXAMPLES, keys.TRAIN_SECONDS} & set(lines[0]["per_hospital"][name]["train"])


def test_each_hospital_reports_its_membership_inference_auc(dp_run) -> None:  # type: ignore[no-untyped-def]
    audit = dp_run.summary["privacy"]["audit"]
    assert sorted(audit["hospitals"]) == ["hospital-0", "hospital-1", "hospital-2"]
    for name, row in audit["hospitals"].items():
        assert 0.0 <= row["auc"] <= 1.0
        assert row["members"] == dp_run.summary["hospitals"][name]["train_rows"]
        assert row["nonmembers"] == dp_run.summary["hospitals"][name]["test_rows"]
    assert audit["mean_auc"] == pytest.approx(sum(r["auc"] for r in audit["hospitals"].values()) / 3)


def test_privacy_report_prints_the_ledger_and_draws_it(dp_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedfm.cli import main

    png = tmp_path / "eps.png"
    assert main(["privacy-report", str(dp_run.run_dir), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["round", "hospital-0", "hospital-1", "hospital-2"]
    assert [line.split()[0] for line in lines[1:5]] == ["1", "2", "3", "4"]
    assert "hospital-0: ε" in out and "refused rounds [3, 4]" in out
    assert "membership-inference audit" in out
    sent = dp_run.summary["sent_by_hospital"]["hospital-1"]
    assert all(".lora_" in name or "classifier" in name for name in sent["tensors"])
    assert f"{len(sent['tensors'])} tensors" in out
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_privacy_report_names_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedfm.cli import main

    assert main(["privacy-report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_the_linear_probe_recipe_trains_the_head_alone_in_full_batches(
    tiny_csv_settings: dict[str, Any], tmp_path: Path
) -> None:
    from opacus.accountants import RDPAccountant

    import fedfm
    from fedfm import privacy
    from safetensors.torch import load_file
    from fedfm.workspace import federation_for

    # Prepare: the recipe `auto` picks for sequence classification, 3 steps a round, 2 rounds.
    config = RunConfig().replace(**{
        **tiny_csv_settings, "federation.num-rounds": 2, "privacy.mode": "dp-sgd", "privacy.probe-steps": 3,
        "privacy.target-epsilon": 4.0,
    })
    plans = privacy.check(config, federation_for(config.data))
    # Execute
    result = fedfm.run(config, out=tmp_path / "probe")
    # Assert: every row in every step (rate 1), σ calibrated so the 6 steps end at the budget.
    assert {(p.sample_rate, p.steps_per_round) for p in plans} == {(1.0, 3)}
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in result.summary["hospitals"]:
        stored = HospitalLedger.load(result.run_dir / "hospitals" / name / LEDGER_FILE)
        assert stored is not None and stored.history == [(stored.noise_multiplier, 1.0, 6)]
        accountant = RDPAccountant()
        for line in lines:
            for _ in range(3):
                accountant.step(noise_multiplier=stored.noise_multiplier, sample_rate=1.0)
            assert line["privacy"]["sample_level_epsilon"][name] == pytest.approx(accountant.get_epsilon(delta=stored.delta))
        assert line["privacy"]["sample_level_epsilon"][name] == pytest.approx(4.0, rel=0.01)
    # Each hospital keeps its rows' features in its own state folder, for its next process (a deployed hospital).
    for index, name in enumerate(result.summary["hospitals"]):
        (stored_features,) = (result.run_dir / "hospitals" / name).glob("probe-features-*.npz")
        with np.load(stored_features) as saved:
            assert saved["labels"].tolist() == workspace_for(config).hospital_rows("train", index)["labels"]
            assert saved["features"].shape[0] == len(saved["labels"])
    # Only the head moved: the LoRA factors are the run's initial ones (up to FedAvg's rounding), the head left zero.
    initial = workspace_for(config).loaded.initial_state
    final = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert_only_the_head_moved(initial, final)
