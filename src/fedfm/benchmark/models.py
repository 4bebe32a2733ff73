"""The causal LM a benchmark scores: a bare base model (alias or folder), or a fedfm-exported folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfm.adapters import EXPORT_SETTINGS, resolve_model_path
from fedfm.benchmark.medical import BenchmarkError
from fedfm.errors import ModelError

__all__ = ["ScoredModel", "check_model", "load_model"]


@dataclass
class ScoredModel:
    """A loaded causal LM and how fedfm scores options with it.

    Attributes
    ----------
    model : Any
        The transformers causal LM (or peft model over one), in eval mode.
    tokenizer : Any
        Its tokenizer, with a padding token.
    device : torch.device
        Where the model is.
    name : str
        What the user named (alias, folder).
    kind : str
        ``base`` or ``exported``.
    length_normalize : bool
        Options scored by mean token log-probability (an exported folder's setting) rather than the sum.
    """

    model: Any
    tokenizer: Any
    device: torch.device
    name: str
    kind: str
    length_normalize: bool


def _is_exported(path: Path) -> bool:
    return (path / EXPORT_SETTINGS).is_file()


def check_model(name: str, *, base_model: str | None = None) -> None:
    """Refuse, before anything loads, a model that cannot generate text.

    An exported folder must hold a causal LM (``causal-qa``, ``instruction-tuning``) with its files complete
    (:func:`fedfm.predict.check_exported`); a base model's ``config.json`` must
    name a causal-LM architecture.

    Parameters
    ----------
    name : str
        A fedfm alias, a transformers folder, or an exported folder.
    base_model : str, optional
        An exported adapter's base model folder (refused with anything else).

    Raises
    ------
    BenchmarkError, ExportError, ModelError
        Naming the folder and what to pass instead.
    """
    path = Path(name).expanduser()
    if base_model is not None and not (path.is_dir() and _is_exported(path)):
        raise BenchmarkError(f"--base-model goes with an exported adapter folder; {name} is a model of its own")
    if path.is_dir() and _is_exported(path):
        from fedfm.export import ExportSettings
        from fedfm.predict import check_exported
        from fedfm.tasks import get_task

        settings = ExportSettings.read(path)
        if get_task(settings.task).peft_task_type != "CAUSAL_LM":  # causal-qa, instruction-tuning
            raise BenchmarkError(f"--model {name}: the exported folder's task is {settings.task!r}, not a causal "
                                 f"LM that writes answers; pass a causal-qa or instruction-tuning run's adapter/ or "
                                 f"merged/ folder")
        check_exported(path, settings)
        return
    folder = resolve_model_path(name)
    try:
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as err:
        raise ModelError(f"--model {name}: {folder / 'config.json'} is not readable JSON ({err})") from err
    if architectures and not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise BenchmarkError(f"--model {name}: {architectures} is not a causal language model; pass one that "
                             f"generates text, such as 'smollm2-135m', or a causal-qa or instruction-tuning run's "
                             f"adapter/ folder")


def load_model(name: str, *, base_model: str | None = None, device: str = "auto") -> ScoredModel:
    """Load the model to score: an exported folder as ``fedfm predict`` does, else the base model in float32.

    Parameters
    ----------
    name : str
        A fedfm alias (``smollm2-135m``), a transformers folder, or an exported ``adapter/`` / ``merged/`` folder.
    base_model : str, optional
        An exported adapter's base model folder, when fedfm's alias or peft's record does not find it.
    device : str
        ``auto`` (cuda when present), ``cpu`` or ``cuda``.

    Returns
    -------
    ScoredModel
    """
    check_model(name, base_model=base_model)
    path = Path(name).expanduser()
    if path.is_dir() and _is_exported(path):
        from fedfm.predict import load_exported

        exported = load_exported(path, base_model=base_model, device=device)
        return ScoredModel(model=exported.model, tokenizer=exported.tokenizer, device=exported.device, name=name,
                           kind="exported", length_normalize=exported.settings.length_normalize)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedfm.adapters import _quiet_transformers

    _quiet_transformers()
    folder = resolve_model_path(name)
    place = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # float32: transformers 5 keeps a checkpoint's dtype, and half precision on a CPU is slow and lossy.
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the model {name} ({folder}): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(place).eval()
    return ScoredModel(model=model, tokenizer=tokenizer, device=place, name=name, kind="base",
                       length_normalize=False)
