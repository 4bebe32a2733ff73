"""Completing a finished run's exported folders: ``fedfm.json``, ``README.md`` and the merged model's loader.

At the end of a run :func:`write_model_card` completes ``adapter/`` and, with
``output.merged-model``, ``merged/``; it also works on an existing run directory.
A generative model's tokenizer is given the chat template training used when it
has none of its own (:func:`fedfm.export.conversation.carry_chat_template`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedfm.adapters import EXPORT_SETTINGS
from fedfm.config import RunConfig, load_config
from fedfm.errors import FedfmError
from fedfm.export.card import CARD, model_card
from fedfm.export.conversation import carry_chat_template
from fedfm.export.merged import describe_merged_config
from fedfm.export.settings import export_settings
from fedfm.rundir import RunSummary, atomic_write_text, read_run


def _label_names(config: RunConfig) -> list[str]:
    """The run's classes, from its configuration (a deployment lists them) or its data source."""
    if config.data.label_names:
        return list(config.data.label_names)
    from fedfm.data import load_source

    d = config.data
    source = load_source(
        d.dataset, data_dir=d.data_dir or None, path=d.path or None, text_column=d.text_column,
        label_column=d.label_column,
    )
    return list(source.label_names)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_model_card(run_dir: str | Path, *, label_names: list[str] | None = None) -> list[Path]:
    """Describe a finished run's exported folders: ``fedfm.json``, ``README.md`` (and the merged model's loader).

    Called at the end of every run; also works on an existing run directory.

    Parameters
    ----------
    run_dir : str or Path
        A run directory with ``config.toml``, ``summary.json`` and ``adapter/``.
    label_names : list of str, optional
        The classes in id order; by default read from ``fedfm.json``, the
        configuration or the run's data source.

    Returns
    -------
    list of Path
        The model cards written (``adapter/README.md``, and ``merged/README.md`` if there is a merged model).

    Raises
    ------
    FedfmError
        ``run_dir`` is not a finished run with an exported adapter.
    """
    run = Path(run_dir)
    for needed in ("config.toml", "summary.json", "adapter/adapter_config.json"):
        if not (run / needed).is_file():
            raise FedfmError(f"{run} is not a finished fedfm run: {needed} is missing")
    config = load_config(run / "config.toml")
    files = read_run(run, need_rounds=False)
    summary = files.summary if files.summary is not None else RunSummary()
    adapter_dir, merged_dir = run / "adapter", run / "merged"
    written = _read_json(adapter_dir / EXPORT_SETTINGS)
    names = label_names or written.get("label_names") or _label_names(config)
    settings = export_settings(config, list(names), pooling=str(written.get("pooling", "")))
    peft_config = _read_json(adapter_dir / "adapter_config.json")
    cards = []
    folders = [(adapter_dir, False)] + ([(merged_dir, True)] if (merged_dir / "config.json").is_file() else [])
    for folder, merged in folders:
        atomic_write_text(folder / EXPORT_SETTINGS, json.dumps(settings.to_json(), indent=2, sort_keys=True) + "\n")
        if settings.chat_template:
            carry_chat_template(folder)
        if merged:
            describe_merged_config(folder, settings)
        card = model_card(config, summary, files.rounds, settings, peft_config=peft_config, merged=merged)
        atomic_write_text(folder / CARD, card)
        cards.append(folder / CARD)
    return cards
