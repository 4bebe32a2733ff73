"""DP-SGD and the ledger on images: Opacus over the peft-wrapped DINOv2 classifier, and the DP linear probe.

A random 2-layer DINOv2 (``tiny_vit_dir``) on PneumoniaMNIST's first rows, three hospitals of 16 images;
every ε is recomputed by a fresh Opacus accountant from each hospital's stored (σ, q, steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import assert_only_the_head_moved
from fedfm import keys
from fedfm.adapters import set_adapter_state
from fedfm.config import RunConfig
from fedfm.errors import ConfigError
from fedfm.privacy.accounting import HospitalLedger
from fedfm.privacy.dpsgd import DpSgd, micro_batches, private_training
from fedfm.privacy.hospital import LEDGER_FILE, centring_of, recipe_of
from fedfm.workspace import workspace_for

pytestmark = pytest.mark.integration

LORA_STEPS, PROBE_STEPS = 2, 5


def _config(settings: dict[str, Any], **extra: Any) -> RunConfig:
    return RunConfig().replace(**{**settings, "privacy.mode": "dp-sgd", **extra})


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_epsilons_recomputed(result: Any, *, rate: float, steps: int) -> None:
    """Every round's ε of every hospital (round lines and summary) equals a fresh RDP accountant's, stepped one
    DP step at a time from the hospital's own stored ledger."""
    from opacus.accountants import RDPAccountant

    lines = _lines(result.run_dir)
    for name in result.summary["hospitals"]:
        stored = HospitalLedger.load(result.run_dir / "hospitals" / name / LEDGER_FILE)
        assert stored is not None
        assert (stored.sample_rate, stored.steps_per_round) == (rate, steps)
        assert stored.rounds == [line["round"] for line in lines]
        accountant = RDPAccountant()
        for line in lines:
            for _ in range(stored.steps_per_round):
                accountant.step(noise_multiplier=stored.noise_multiplier, sample_rate=stored.sample_rate)
            reported = line["privacy"]["sample_level_epsilon"][name]
            assert reported == pytest.approx(accountant.get_epsilon(delta=stored.delta), rel=1e-9)
        assert result.summary["privacy"]["hospitals"][name]["epsilon"] == pytest.approx(reported, rel=1e-9)
        assert reported == pytest.approx(8.0, rel=0.01)  # σ calibrated so the planned rounds end at the budget


# ---- DP-SGD on LoRA and the head ----------------------------------------------------------------


def test_opacus_per_example_gradients_of_the_vit_equal_autograds_row_by_row(
    tiny_image_settings: dict[str, Any],
) -> None:
    # Prepare: the peft-wrapped DINOv2 classifier of a run; 6 images, a clip that cuts some rows and not others
    config = _config(tiny_image_settings, **{"privacy.recipe": "lora"})
    workspace = workspace_for(config)
    loaded, task = workspace.loaded, workspace.task
    model = loaded.model
    rows = workspace.hospital_rows("train", 0)
    indices = [0, 3, 1, 5, 4, 2]
    collate = task.collate(loaded.tokenizer)
    set_adapter_state(model, loaded.initial_state)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a head and B factors away from zero, so every trainable tensor has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name or ("classifier" in name and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {type(m).__name__ for m in model.modules() if any(not p.requires_grad for p in m.parameters(False))}
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0  # both computations must be the same function

    try:
        model.train()
        per_row: list[dict[str, torch.Tensor]] = []
        for i in indices:  # Execute: the reference, one row at a time through the plain model
            model.zero_grad(set_to_none=True)
            task.loss(model, collate([rows[i]])).backward()
            per_row.append({n: p.grad.detach().clone() for n, p in trainable.items()})
        norms = [float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))) for grads in per_row]
        clip = float(np.median(norms))
        want = {n: sum(min(1.0, clip / norm) * grads[n] for grads, norm in zip(per_row, norms, strict=True))
                / len(indices) for n in trainable}
        captured: dict[str, torch.Tensor] = {}
        optimizer = torch.optim.SGD(list(trainable.values()), lr=0.0)
        dp = DpSgd(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=len(indices) / len(rows), steps=1)
        with private_training(model, optimizer, dp, len(rows), after_noise=lambda: captured.update(
                {n: p.grad.clone() for n, p in trainable.items()})) as (forward, private):
            private.zero_grad(set_to_none=True)
            for chunk in micro_batches(indices, task.row_lengths(rows), 4):
                task.loss(forward, collate([rows[i] for i in chunk])).backward()
            private.step()
    finally:
        model.eval()
        for m, rate in zip(dropouts, rates, strict=True):
            m.p = rate
        set_adapter_state(model, loaded.initial_state)

    # Assert: only LoRA factors and the head train, beside a frozen patch convolution, LayerNorms and layer scales
    assert trainable and all(".lora_" in n or ".classifier." in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert {"Conv2d", "LayerNorm", "Dinov2LayerScale"} <= frozen
    assert min(norms) < clip < max(norms)
    assert set(captured) == set(trainable)
    for name in trainable:
        torch.testing.assert_close(captured[name], want[name], rtol=1e-4, atol=1e-7)
    assert not [n for n, p in model.named_parameters() if hasattr(p, "grad_sample") or hasattr(p, "summed_grad")]


@pytest.fixture(scope="module")
def lora_run(tiny_image_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """DP-SGD on LoRA + head: Poisson batches of 8 expected images out of 16 (q = 0.5), 2 steps a round, ε 8."""
    import fedfm

    config = _config(tiny_image_settings, **{"privacy.recipe": "lora", "privacy.batch-size": 8,
                                              "train.local-steps": LORA_STEPS, "privacy.target-epsilon": 8.0})
    return fedfm.run(config, out=tmp_path_factory.mktemp("image-dp") / "run")


def test_dp_sgd_on_images_spends_each_hospitals_budget_as_opacus_counts_it(lora_run) -> None:  # type: ignore[no-untyped-def]
    _assert_epsilons_recomputed(lora_run, rate=0.5, steps=LORA_STEPS)
    lines = _lines(lora_run.run_dir)
    assert [line["aggregated"] for line in lines] == [True, True]
    for name in lora_run.summary["hospitals"]:
        # Only the LoRA tensors and the head leave, and no unnoised statistic of the rows.
        sent = lora_run.summary["sent_by_hospital"][name]["tensors"]
        assert sent and all(".lora_" in t or "classifier" in t for t in sent)
        assert not {keys.TRAIN_LOSS, keys.TRAIN_EXAMPLES, keys.TRAIN_SECONDS} & set(lines[0]["per_hospital"][name]["train"])


# ---- the DP linear probe ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_run(tiny_image_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`privacy.recipe` and `probe-centring` left at `auto`: the linear probe centred on images drawn in code, ε 8."""
    import fedfm

    # Its own seed, so its own cached workspace: the server picks its starting head from the config of the
    # workspace it finds (`server.model.initial_arrays`), which the DP-LoRA tests above built for `lora`.
    config = _config(tiny_image_settings, **{"privacy.probe-steps": PROBE_STEPS, "privacy.probe-learning-rate": 2.0,
                                              "privacy.target-epsilon": 8.0, "train.seed": 1})
    return config, fedfm.run(config, out=tmp_path_factory.mktemp("image-probe") / "run")


def test_auto_trains_the_linear_probe_centred_without_public_text(probe_run) -> None:  # type: ignore[no-untyped-def]
    config, result = probe_run
    assert (recipe_of(config), centring_of(config)) == ("linear-probe", "generic")
    _assert_epsilons_recomputed(result, rate=1.0, steps=PROBE_STEPS)
    lines = _lines(result.run_dir)
    # The run starts from the zero head (the same logit for both classes), and the probe moves it.
    assert result.summary["initial"]["global"]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert lines[-1]["global"]["loss"] != pytest.approx(math.log(2), rel=1e-3)
    # Each hospital keeps its images' features in its own state folder, in its rows' order.
    workspace = workspace_for(config)
    for index, name in enumerate(result.summary["hospitals"]):
        (stored,) = (result.run_dir / "hospitals" / name).glob("probe-features-*.npz")
        with np.load(stored) as saved:
            assert saved["labels"].tolist() == workspace.hospital_rows("train", index)["labels"]
            assert saved["features"].shape == (16, 2 * 32)  # [CLS ; mean of patch tokens]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_the_folded_probe_is_the_ordinary_adapter_and_loads_with_plain_peft(
    probe_run, tiny_vit_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    config, result = probe_run
    workspace = workspace_for(config)
    initial = workspace.loaded.initial_state
    final = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    # Only the head moved: the LoRA factors are the run's initial ones (up to FedAvg's rounding).
    assert_only_the_head_moved(initial, final)
    # Loaded by peft alone on the base folder, it scores the global test rows as the run's last round did.
    base = AutoModelForImageClassification.from_pretrained(tiny_vit_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter")
    scores = workspace.task.evaluate(model, workspace.hospital_rows("test", -1), workspace.loaded.tokenizer,
                                     batch_size=8, device=torch.device("cpu"))
    last = _lines(result.run_dir)[-1]["global"]
    assert scores["loss"] == pytest.approx(last["loss"], rel=1e-4)
    assert scores["accuracy"] == pytest.approx(last["accuracy"])


# ---- what the task tells the probe --------------------------------------------------------------


def test_image_rows_are_named_by_their_pixels_and_the_processors_settings(tiny_image_settings: dict[str, Any]) -> None:
    from fedfm.privacy.linear_probe import rows_digest

    workspace = workspace_for(_config(tiny_image_settings))
    loaded, task = workspace.loaded, workspace.task
    rows = workspace.hospital_rows("train", 0)
    digest = rows_digest(loaded.model, task, rows, loaded.tokenizer)
    assert digest == rows_digest(loaded.model, task, rows.select(range(len(rows))), loaded.tokenizer)
    assert digest != rows_digest(loaded.model, task, rows.select([1, 0, *range(2, len(rows))]), loaded.tokenizer)
    resized = type(loaded.tokenizer).from_dict({**loaded.tokenizer.to_dict(), "size": {"height": 42, "width": 42}})
    assert digest != rows_digest(loaded.model, task, rows, resized)
    assert set(task.model_inputs(task.collate(loaded.tokenizer)([rows[0]]))) == {"pixel_values"}


def test_text_rows_keep_the_digest_of_their_token_ids(tiny_csv_settings: dict[str, Any]) -> None:
    import hashlib

    from fedfm.privacy.linear_probe import rows_digest

    workspace = workspace_for(RunConfig().replace(**tiny_csv_settings))
    loaded, task = workspace.loaded, workspace.task
    rows = workspace.hospital_rows("train", 0)
    # The digest names feature files already in hospitals' state folders: it is the one of token ids and labels.
    digest = hashlib.sha256(str(loaded.model.config.name_or_path).encode())
    for ids, label in zip(rows["input_ids"], rows["labels"], strict=True):
        digest.update(np.asarray(ids, np.int64).tobytes())
        digest.update(np.int64(label).tobytes())
    assert rows_digest(loaded.model, task, rows, loaded.tokenizer) == digest.hexdigest()[:24]


def test_public_images_are_drawn_in_code_and_repeat(tiny_image_settings: dict[str, Any]) -> None:
    from fedfm.privacy import probe

    first = probe.public_images(count=8)
    assert first == probe.public_images(count=8) and len(set(first)) == 8
    assert all(image[:4] == b"\x89PNG" for image in first)
    for kind in ("generic", "none"):
        assert probe.public_rows(kind, data_kind="image").column_names == ["image", "label"]
    with pytest.raises(ValueError, match="public text cannot centre image features"):
        probe.public_rows("vocabulary", data_kind="image")
    # The probe and the generic and unspecified centrings are allowed for images.
    for centring in ("generic", "none"):
        _config(tiny_image_settings, **{"privacy.probe-centring": centring, "privacy.recipe": "linear-probe"})


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("centring", ["vocabulary", "heart-codebook"])
def test_text_centring_with_an_image_task_is_refused_in_one_line(
    tiny_image_settings: dict[str, Any], centring: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedfm.cli import main

    with pytest.raises(ConfigError) as err:
        _config(tiny_image_settings, **{"privacy.probe-centring": centring})
    assert err.value.problems == [(
        f"`privacy.probe-centring` {centring!r} centres features on public text, and `model.task` "
        "'image-classification' reads images; use 'generic' (grey images drawn in fedfm; what 'auto' picks for "
        "images) or 'none'"
    )]
    overrides = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in tiny_image_settings.items()]
    argv = ["check", *(x for o in overrides for x in ("--set", o)), "--set", "privacy.mode=dp-sgd",
            "--set", f"privacy.probe-centring={centring}"]
    assert main(argv) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("fedfm: error:") == 1 and "Traceback" not in err_text
    assert f"`privacy.probe-centring` {centring!r} centres features on public text" in err_text


def test_the_probe_stays_refused_for_tasks_without_one_pooled_feature() -> None:
    with pytest.raises(ConfigError, match="linear-probe"):
        RunConfig().replace(**{"model.task": "token-classification", "data.dataset": "ncbi_disease",
                               "privacy.recipe": "linear-probe"})
    config = RunConfig().replace(**{"model.task": "token-classification", "data.dataset": "ncbi_disease",
                                    "privacy.mode": "dp-sgd"})
    assert recipe_of(config) == "lora"


def test_the_starting_head_follows_the_runs_own_recipe_not_the_cached_workspaces(
    tiny_image_settings: dict[str, Any],
) -> None:
    from fedfm.server.model import initial_arrays

    # Prepare: a process's workspace built for a DP-LoRA run, then reused by a probe run of the same model and data
    lora = _config(tiny_image_settings, **{"privacy.recipe": "lora"})
    probe = _config(tiny_image_settings, **{"privacy.recipe": "linear-probe"})
    workspace = workspace_for(lora)
    assert workspace_for(probe) is workspace
    # Execute
    heads = {name: {k: v for k, v in initial_arrays(workspace, config).items() if "classifier" in k}
             for name, config in (("lora", lora), ("probe", probe))}
    # Assert: the probe starts from a zero head (its DP-GD unfolds it), DP-LoRA from the initialised one
    assert heads["probe"] and all(not v.any() for v in heads["probe"].values())
    assert any(v.any() for v in heads["lora"].values())
