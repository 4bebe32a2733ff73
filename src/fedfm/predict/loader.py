"""Loading an exported ``adapter/`` or ``merged/`` folder back with plain transformers and peft.

The folder's files are checked first (:func:`check_exported`: ``fedfm.json``,
weights present and complete, a classifier head that matches the class names),
so a half-copied folder is named before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfm.adapters import EXPORT_SETTINGS, HEAD_MODULES, resolve_model_path
from fedfm.errors import ModelError
from fedfm.export import CLASSIFIER_TASKS, MODELING_FILE, PREDICTABLE_TASKS, ExportError, ExportSettings
from fedfm.tasks.pooling import apply_pooling

#: The file an image classifier's folder keeps its image processor in (``save_pretrained``'s name).
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Exported:
    """An exported folder loaded for inference.

    Attributes
    ----------
    model : torch.nn.Module
        ``PeftModel`` over the base (adapter folder) or the plain transformers model (merged folder), in eval mode.
    tokenizer : Any
        The tokenizer saved beside the weights (an image classifier: its image processor).
    settings : ExportSettings
        The folder's ``fedfm.json``.
    device : torch.device
        Where the model lives.
    """

    model: Any
    tokenizer: Any
    settings: ExportSettings
    device: torch.device


def base_model_path(settings: ExportSettings, folder: Path, override: str | None = None) -> str:
    """Where the base model's files are: ``override``, fedfm's alias, else the path peft recorded.

    Raises
    ------
    ModelError
        ``override`` is not a model folder, or none of them is a readable model folder.
    """
    if override:
        if not (Path(override) / "config.json").is_file():
            raise ModelError(f"--base-model {override} is not a model folder (it has no config.json): pass the folder "
                             f"of the base model `{settings.base_model}` the adapter was trained on")
        return override
    try:
        return str(resolve_model_path(settings.base_model))
    except ModelError as err:
        recorded = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
        if recorded and (Path(recorded) / "config.json").is_file():
            return str(recorded)
        raise ModelError(f"{err}; pass the base model's folder with --base-model") from err


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files an exported folder's weights are in (sharded merged models: every shard)."""
    adapter = (folder / "adapter_config.json").is_file()
    single = folder / ("adapter_model.safetensors" if adapter else "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if single.is_file() or adapter or not index.is_file():
        return [single]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportError(f"{index} is not a readable shard index ({err}): copy the folder again or re-export it") \
            from err


def check_exported(folder: str | Path, settings: ExportSettings) -> None:
    """Check an exported folder's files before any model loads: present, complete, and matching ``fedfm.json``.

    Reads only the safetensors headers (names and shapes), so a truncated or
    half-copied weights file, a missing one, or ``label_names`` edited to a
    different number of classes than the classifier head has outputs is named
    here rather than failing deep inside transformers or peft.

    Parameters
    ----------
    folder : str or Path
        An exported ``adapter/`` or ``merged/`` folder.
    settings : ExportSettings
        Its ``fedfm.json`` (:meth:`ExportSettings.read`).

    Raises
    ------
    ExportError
        Naming the file and what to do.
    """
    from safetensors import safe_open

    path = Path(folder)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            peft_config = json.loads(adapter.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ExportError(f"{adapter} is not readable JSON ({err}): copy the adapter folder again or re-export "
                              f"it") from err
        if not isinstance(peft_config, dict):
            raise ExportError(f"{adapter} must hold a JSON object: copy the adapter folder again or re-export it")
    elif not (path / "config.json").is_file():
        raise ExportError(f"{path} has neither adapter_config.json (an adapter) nor config.json (a merged model): "
                          f"pass the whole `adapter/` or `merged/` folder of a fedfm run")
    head: tuple[Path, list[int]] | None = None
    for weights in _weight_files(path):
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file() or (path / "pytorch_model.bin").is_file():
                continue  # weights saved as PyTorch pickles: nothing to check without loading them
            raise ExportError(f"{weights} is missing: the folder holds no weights; copy the whole folder again "
                              f"from the run directory, or re-export it")
        try:
            with safe_open(str(weights), framework="pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 -- safe_open is not iterable
                    if any(name == f"{m}.weight" or name.endswith(f".{m}.weight") for m in HEAD_MODULES):
                        head = (weights, list(tensors.get_slice(name).get_shape()))
        except Exception as err:  # safetensors raises its own error type (header, size) and OSError
            raise ExportError(f"{weights} is truncated or corrupt ({err}): copy it again from the run directory, "
                              f"or re-export it") from err
    if settings.task == "image-classification" and not (path / IMAGE_PROCESSOR_FILE).is_file():
        raise ExportError(f"{path / IMAGE_PROCESSOR_FILE} is missing: the image processor that resizes and normalizes "
                          f"images as training did; copy the whole folder again from the run directory")
    if settings.task in CLASSIFIER_TASKS and head is not None and head[1][0] != len(settings.label_names):
        raise ExportError(
            f"{path / EXPORT_SETTINGS}: `label_names` lists {len(settings.label_names)} classes "
            f"({settings.label_names}) but the classifier head in {head[0]} has {head[1][0]} outputs: give one "
            f"name per output, in id order, or re-export the folder"
        )


def _auto_classes(settings: ExportSettings) -> tuple[Any, Any]:
    """The transformers auto classes of a folder's model and of its tokenizer or image processor."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if settings.task == "image-classification":
        return AutoModelForImageClassification, AutoImageProcessor
    if settings.task == "sequence-classification":
        return AutoModelForSequenceClassification, AutoTokenizer
    return AutoModelForCausalLM, AutoTokenizer


def load_exported(folder: str | Path, *, base_model: str | None = None, device: str = "auto") -> Exported:
    """Load an exported ``adapter/`` (base + peft adapter) or ``merged/`` folder with transformers and peft.

    Parameters
    ----------
    folder : str or Path
        The folder; it must hold ``fedfm.json`` with the task (see :func:`write_model_card`).
    base_model : str, optional
        The base model's folder, when it is not where fedfm's alias or the adapter's record points.
    device : str
        ``auto`` (cuda when present), ``cpu`` or ``cuda``.

    Returns
    -------
    Exported

    Raises
    ------
    ExportError
        ``fedfm.json`` or the weights files are invalid (:func:`check_exported`), checked before anything loads.
    ModelError
        The base model cannot be found, or transformers or peft cannot load the folder.
    """
    from fedfm.adapters import _quiet_transformers

    _quiet_transformers()
    path = Path(folder)
    settings = ExportSettings.read(path)
    if settings.task not in PREDICTABLE_TASKS:
        raise ExportError(f"{path}: fedfm predict and evaluate cover the tasks {list(PREDICTABLE_TASKS)}; "
                          f"this folder's task is {settings.task!r}")
    check_exported(path, settings)
    place = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    auto, preprocessor = _auto_classes(settings)
    text = settings.task != "image-classification"
    model: Any
    try:
        tokenizer = preprocessor.from_pretrained(path)
        if text and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            kwargs = {"num_labels": len(settings.label_names)} if settings.task in CLASSIFIER_TASKS else {}
            base_path = base_model_path(settings, path, base_model)
            base = auto.from_pretrained(base_path, **kwargs)
            if settings.task == "sequence-classification":
                apply_pooling(base, settings.pooling or "cls")
            try:
                model = PeftModel.from_pretrained(base, path)
            except RuntimeError as err:  # torch's load_state_dict: the adapter's shapes are not this base's
                mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
                raise ModelError(f"the adapter in {path} does not fit the base model {base_path} ({mismatch}): "
                                 f"pass the base model it was trained on, `{settings.base_model}`, with --base-model"
                                 ) from err
        else:
            model = auto.from_pretrained(path, trust_remote_code=(path / MODELING_FILE).is_file())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the exported model in {path}: {err}") from err
    if text and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(place).eval()
    return Exported(model=model, tokenizer=tokenizer, settings=settings, device=place)
