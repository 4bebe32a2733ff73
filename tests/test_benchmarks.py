"""The benchmarks run end to end on small settings and write what they measured."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, tmp_path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--out tmp_path``, its Hugging Face cache under ``tmp_path``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, HF_HOME=str(tmp_path / "hf")),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_quality_quick_heart_writes_three_arms(tmp_path: Path) -> None:
    # Execute
    done = run_benchmark("quality.py", tmp_path, "--quick", "--dataset", "heart", timeout=600)

    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "quality-heart-quick.json").read_text())
    assert set(report["arms"]) == {"federated", "centralized", "local"}
    assert set(report["arms"]["local"]["per_hospital"]) == set(report["hospitals"])
    for arm in report["arms"].values():
        assert {"accuracy", "macro-f1", "weighted-f1", "loss"} <= set(arm["global"])
    # Same budget in every arm: that is what makes the comparison fair.
    seen = {name: arm["examples_seen"] for name, arm in report["arms"].items()}
    assert len(set(seen.values())) == 1, seen
    assert "federated_over_centralized_macro_f1" in report["comparison"]
    assert "federated_minus_local_mean_macro_f1" in report["comparison"]
    assert report["settings"]["data.dataset"] == "heart_disease_uci"
    assert report["arms"]["federated"]["exported"] is None  # no validation split: the last round is exported


def test_quality_reports_the_exported_round_under_select_best(tmp_path: Path) -> None:
    # Execute: with a validation split, so the exported adapter can be an earlier round than the last
    done = run_benchmark("quality.py", tmp_path, "--quick", "--dataset", "heart", "--arms", "federated",
                         "--set", "data.validation-fraction=0.2", "--set", "federation.select-best=validation",
                         timeout=600)

    # Assert: the exported round's test scores are that round's, not the last round's by default
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    arm = json.loads((tmp_path / "quality-heart-quick.json").read_text())["arms"]["federated"]
    exported = arm["exported"]
    assert exported["validation_metric"] == "loss"
    assert 1 <= exported["round"] <= arm["rounds"]
    same_round = arm["per_round_global"][exported["round"] - 1]
    assert same_round["round"] == exported["round"]
    assert exported["global"]["accuracy"] == pytest.approx(same_round["accuracy"])
    assert f"exported round {exported['round']}:" in done.stdout


def test_strategies_quick_writes_each_part(tmp_path: Path) -> None:
    # Execute: one linear and one stacking strategy; the robustness part with and without hostile hospitals
    done = run_benchmark("strategies.py", tmp_path, "--quick", "--dataset", "heart",
                         "--strategies", "fedavg,flora", "--parts", "compare,robust")

    # Assert
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "strategies-heart-quick.json").read_text())
    compare = {arm["strategy"]: arm for arm in report["parts"]["compare"]["arms"]}
    assert set(compare) == {"fedavg", "flora"}
    for arm in compare.values():
        assert {"accuracy", "macro-f1"} <= set(arm["global"])
        assert len(arm["per_hospital_macro_f1"]) == 4  # the four real hospitals
        assert arm["bytes_up_per_round"] > 0
    # FLoRA's downlink carries the stacked factors: more than FedAvg's adapter.
    assert compare["flora"]["bytes_down_per_round"] > compare["fedavg"]["bytes_down_per_round"]
    robust = [arm["label"] for arm in report["parts"]["robust"]["arms"]]
    assert robust == ["fedavg, no attack", "fedavg"]
    assert all(len(arm["per_hospital_macro_f1"]) == 10 for arm in report["parts"]["robust"]["arms"])
    assert "| fedavg, no attack |" in done.stdout


def test_privacy_quick_compares_dp_with_no_dp(tmp_path: Path) -> None:
    # Execute
    done = run_benchmark("privacy.py", tmp_path, "--quick", "--dataset", "heart", "--epsilons", "8")

    # Assert: both arms ran; the DP arm's hospitals spent (about) their budget and no more
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "privacy-heart-quick.json").read_text())
    labels = [arm["label"] for arm in report["arms"]]
    assert labels == ["no DP", "DP-SGD ε=8"]
    no_dp, dp = report["arms"]
    assert no_dp["epsilon_spent"] == {}
    assert len(dp["epsilon_spent"]) == 4
    assert all(7.9 <= eps <= 8.0 for eps in dp["epsilon_spent"].values())
    assert all(0.0 <= auc <= 1.0 for auc in dp["audit_auc"].values()) and len(dp["audit_auc"]) == 4
    # A DP hospital reports no training time (an unnoised statistic of its rows): the arms compare by wall time.
    assert no_dp["examples_per_second"] > 0 and dp["examples_per_second"] != dp["examples_per_second"]
    assert dp["recipe"] == "linear-probe" and no_dp["recipe"] is None
    assert report["comparison"]["DP-SGD ε=8"]["wall_vs_no_dp"] > 0
    assert "| DP-SGD ε=8 |" in done.stdout


def test_public_encoder_tunes_on_public_sections_and_saves_a_model_folder(tiny_bert: Path, tmp_path: Path) -> None:
    # Execute: the tiny BERT on 300 public sentences
    folder = tmp_path / "encoder"
    done = run_benchmark("public_encoder.py", tmp_path, "--quick", "--model", str(tiny_bert), "--model-out", str(folder),
                         timeout=600)

    # Assert: what was left out is recorded; a folder fedfm and transformers load
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "public-encoder-quick.json").read_text())
    assert report["dropped"]["abstracts_shared_with_nicta"] == []
    assert report["dropped"]["sentences_in_nicta"] > 0  # boilerplate lines NICTA shares are left out
    assert sum(report["rows_per_role"].values()) == 300 and report["steps"] > 0
    assert 0.0 <= report["public_validation_accuracy"] <= 1.0
    import torch
    from transformers import AutoModel

    from fedfm.adapters import resolve_model_path

    assert resolve_model_path(str(folder)) == folder
    tuned, start = AutoModel.from_pretrained(folder), AutoModel.from_pretrained(tiny_bert)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(tuned.state_dict()[name], start.state_dict()[name])  # the encoder itself was trained

    # Execute + Assert: the folder is not overwritten by a second run
    again = run_benchmark("public_encoder.py", tmp_path, "--quick", "--model", str(tiny_bert), "--model-out",
                          str(folder), timeout=600)
    assert again.returncode == 2 and "is not empty" in again.stderr


def test_public_rows_hold_no_nicta_sentence_and_map_headings_to_roles() -> None:
    # Setup
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import public_encoder

    from fedfm.data.paths import resolve_data_dir

    data = resolve_data_dir()
    assert data is not None

    # Execute
    rows, dropped = public_encoder.section_rows(data / "pubmedqa" / "ori_pqal.json", data / "nicta_piboso")

    # Assert: every public sentence is absent from every NICTA split; headings land on their roles
    nicta, _ = public_encoder.excluded_sentences(data / "nicta_piboso")
    assert rows and not any(public_encoder._key(row["text"]) in nicta for row in rows)
    assert {row["label"] for row in rows} == set(public_encoder.ROLES)
    roles = {heading: public_encoder.role_of(heading) for heading in (
        "BACKGROUND", "MATERIALS AND METHODS", "PATIENTS AND METHODS", "PATIENTS", "MAIN OUTCOME MEASURES",
        "STUDY DESIGN", "INTERVENTIONS", "CONCLUSIONS", "LIMITATIONS")}
    assert roles == {"BACKGROUND": "background", "MATERIALS AND METHODS": "methods", "PATIENTS AND METHODS": "methods",
                     "PATIENTS": "population", "MAIN OUTCOME MEASURES": "other", "STUDY DESIGN": "study design",
                     "INTERVENTIONS": "intervention", "CONCLUSIONS": "outcome", "LIMITATIONS": None}
    assert dropped["unmapped_sections"]["LIMITATIONS"] > 0


def test_scale_quick_measures_overhead_memory_and_bytes(tmp_path: Path) -> None:
    # Execute: every part, small
    done = run_benchmark("scale.py", tmp_path, "--quick", "--hospitals", "2,3", "--methods", "none,int8",
                         "--backends", "in-process", timeout=1200)
    # Assert: the same steps on both sides of the overhead ratio; a peak per size; int8 sends about a quarter
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "scale-quick.json").read_text())
    overhead = report["overhead"]
    assert overhead["simulated_steps"] == overhead["plain_loop_steps"] > 0
    assert overhead["overhead"] > 0
    assert [run["hospitals"] for run in report["memory"]["runs"]] == [2, 3]
    assert all(run["peak_rss_bytes"] > 100 * 2**20 for run in report["memory"]["runs"])
    arms = {arm["method"]: arm for arm in report["communication"]["arms"]}
    assert arms["int8"]["bytes_up_per_hospital_round"] < 0.3 * arms["none"]["bytes_up_per_hospital_round"]
    assert arms["none"]["full_model_bytes"] > 50 * arms["none"]["bytes_up_per_hospital_round"]


def test_instruction_benchmark_scores_every_arm_on_the_same_rows(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Execute: the tiny Llama, 4 hospitals of 4 conversations, one round; the step-speed and medical parts too
    done = run_benchmark("instruction.py", tmp_path, "--work", str(tmp_path / "work"), "--speed",
                         "--medical-limit", "1", "--set", f"model.name={tiny_llama_dir}",
                         "--set", "model.dtype=float32", "--set", "data.max-train-per-hospital=4",
                         "--set", "data.max-test=3", "--set", "federation.num-rounds=1")

    # Assert: every arm scored on the same global rows and hospitals; the comparison and the other parts written
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "instruction-meadow.json").read_text())
    arms = report["arms"]
    assert set(arms) == {"base", "federated", "centralized", "local"}
    hospitals = set(report["hospitals"])
    for name in ("base", "federated", "centralized"):
        assert set(arms[name]["per_hospital"]) == hospitals
        assert arms[name]["global"]["perplexity"] > 1
    assert set(arms["local"]["per_hospital"]) == hospitals
    # The federation and the pooled arm saw as many examples: 1 round x 3 local steps x 4 rows x 4 hospitals.
    assert arms["federated"]["examples_seen"] == arms["centralized"]["examples_seen"] == 4 * 3 * 4
    assert {"federated_over_centralized_loss", "every_hospital_perplexity_below_base",
            "federated_beats_every_local_only"} <= set(report["comparison"])
    assert report["speed"]["tokens"] > 0 and set(report["speed"]["tokens_per_second"]) == {"fedfm", "plain"}
    assert set(report["medical"]["scores"]) == {"base (zero-shot)", "federated SFT", "centralized SFT"}
    assert "federated / centralized held-out loss" in done.stdout


def test_pubmedqa_generative_route_trains_then_answers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    done = run_benchmark("pubmedqa_generative.py", tmp_path, "--work", str(tmp_path / "work"), "--limit", "2",
                         "--set", f"model.name={tiny_llama_dir}", "--set", "model.dtype=float32",
                         "--set", "model.max-length=192", "--set", "data.max-train-per-hospital=4",
                         "--set", "federation.num-rounds=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "pubmedqa-generative-limit2.json").read_text())
    assert report["training_questions"] == 500 and report["exported_round"] == 1
    assert set(report["scores"]) == {"base (zero-shot)", "federated SFT"}
    assert all(s["questions"] == 2 for s in report["scores"].values())


def test_gpu_scale_refuses_without_cuda_and_its_dry_run_writes_every_part(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is that of a machine without CUDA")
    # Without CUDA: one line, nothing measured
    refused = run_benchmark("gpu_scale.py", tmp_path)
    assert refused.returncode == 2 and not list(tmp_path.glob("*.json"))
    assert refused.stderr.strip().splitlines()[-1].startswith("gpu_scale.py: error: torch sees no CUDA GPU")

    # --dry-run: the same code paths on the CPU, with the tiny Llama; 1 and 2 hospitals
    done = run_benchmark("gpu_scale.py", tmp_path, "--dry-run", "--set", f"model.name={tiny_llama_dir}",
                         "--hospitals", "1,2", "--epochs", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-scale-dry-run.json").read_text())
    bf16 = report["quantization"]["arms"]["bf16"]
    assert bf16["tokens"] > 0 and bf16["tokens_per_second"] > 0 and bf16["peak_gib"] is None
    assert "4bit" not in report["quantization"]["arms"]  # needs a GPU and bitsandbytes
    assert report["utilization"]["flops_per_second"]["6N"] == pytest.approx(6 * bf16["base_parameters"]
                                                                           * bf16["tokens_per_second"])
    assert report["utilization"]["share_of_peak"] is None
    assert [run["hospitals"] for run in report["hospitals"]["runs"].values()] == [1, 2]
    assert all(run["rounds"] == 1 for run in report["hospitals"]["runs"].values())


def test_gpu_scale_knows_the_dense_bf16_peak_of_the_lent_chips() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_scale import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Tesla T4") is None


def test_pooled_and_local_arms_train_the_head_alone_for_the_federations_head_rounds() -> None:
    # Setup
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    from fedfm.config import RunConfig

    config = RunConfig().replace(**{"federation.num-rounds": 10, "federation.head-first-rounds": 2})
    # Execute: ten epochs pooled; thirty steps a hospital
    epochs = quality._phases(config, dataclasses.replace(config.train, local_epochs=10))
    steps = quality._phases(config, dataclasses.replace(config.train, local_steps=30))
    plain = quality._phases(RunConfig(), config.train)
    # Assert: the budget is split 2/10 head alone, 8/10 head and LoRA, and untouched without head rounds
    assert [(s.local_epochs, head) for s, head in epochs] == [(2, True), (8, False)]
    assert [(s.local_steps, head) for s, head in steps] == [(6, True), (24, False)]
    assert plain == [(config.train, False)]
