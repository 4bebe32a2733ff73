"""Every problem of a run configuration, as messages naming field, value and allowed range.

First each field on its own, from its type and metadata (:func:`field_problems`:
a ``Literal`` field holds one of its values, an integer lies within its
``bounds``, a float is finite); then the rules between fields, one function per
section (:data:`RULES`). A rule's message about a field already reported is left
out, so each field has one message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

from fedfm.config.choices import (
    ABSTRACT_DATASETS,
    CHOICE_DATASETS,
    CONCLUSION_DATASETS,
    DEPLOYMENT_TASKS,
    FILE_DATASETS,
    HEAD_TASKS,
    HOSPITAL_FILE_SUFFIXES,
    HOSPITAL_NAME,
    IMAGE_DATASETS,
    INSTRUCTION_DATASETS,
    INT64_BOUNDS,
    MODEL_ALIASES,
    PROBE_TASKS,
    TABLE_DATASETS,
    TOKEN_DATASETS,
)
from fedfm.config.policy import recipe_of

if TYPE_CHECKING:
    from fedfm.config.schema import RunConfig


def kebab(name: str) -> str:
    """A field's name as configuration files spell it (``learning_rate`` -> ``learning-rate``)."""
    return name.replace("_", "-")


def shown(value: Any) -> str:
    """``repr(value)`` for a message, shortened when it is huge (a 400-digit integer)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def validate(config: RunConfig) -> list[str]:
    """Every problem of a configuration, as messages naming field, value and allowed range.

    First every field on its own (choices, integer bounds, finite floats: one loop over the
    field types and metadata), then the rules between fields; a rule's message about a field
    already reported (``nan`` fails every comparison) is left out, so each field has one.
    """
    problems, bad = field_problems(config)
    subject = re.compile(r"^`([a-z0-9-]+\.[a-z0-9-]+)`")
    for rule in RULES:
        for message in rule(config):
            match = subject.match(message)
            if match is None or match.group(1) not in bad:
                problems.append(message)
    return problems


@cache
def _types(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def field_problems(config: RunConfig) -> tuple[list[str], set[str]]:
    """Problems of single fields: a value not among its ``Literal``'s, an integer outside its
    ``bounds``, a float that is inf or nan.

    Returns the messages and the ``section.key`` names they are about.
    """
    problems: list[str] = []
    bad: set[str] = set()
    for section in fields(config):
        spec = getattr(config, section.name)
        types = _types(spec.__class__)
        for f in fields(spec):
            key = f"{section.name}.{kebab(f.name)}"
            message = _field_problem(key, getattr(spec, f.name), types[f.name], f.metadata)
            if message is not None:
                problems.append(message)
                bad.add(key)
    return problems, bad


def _field_problem(key: str, value: Any, typ: Any, metadata: Any) -> str | None:
    if get_origin(typ) is Literal:
        choices = list(get_args(typ))
        return None if value in choices else f"`{key}` must be one of {choices}, got {value!r}"
    if get_origin(typ) is tuple and get_origin(get_args(typ)[0]) is Literal:
        choices = list(get_args(get_args(typ)[0]))
        ok = all(v in choices for v in value)
        return None if ok else f"`{key}` must each be one of {choices}, got {list(value)}"
    note = f" ({metadata['note']})" if "note" in metadata else ""
    if typ is float and not _finite(value):
        return f"`{key}` must be a finite number, got {shown(value)}"
    if typ is float and "within" in metadata and not _inside(value, metadata["within"]):
        within = metadata["within"]
        return f"`{key}` must be {within if within.startswith('>') else 'in ' + within}{note}, got {value}"
    if typ is int and isinstance(value, int):
        lo, hi = metadata.get("bounds", INT64_BOUNDS)
        if value < lo:
            return f"`{key}` must be >= {lo}{note}, got {shown(value)}"
        if value > hi:
            return f"`{key}` must be in [{lo}, {hi}]{note}, got {shown(value)}"
    return None


def _inside(value: float, within: str) -> bool:
    """Whether ``value`` lies in ``within``: ``"> 0"``, ``">= 0"`` or an interval such as ``"[0, 1)"``."""
    if within.startswith(">="):
        return value >= float(within[2:])
    if within.startswith(">"):
        return value > float(within[1:])
    low, high = (float(end) for end in within[1:-1].split(","))
    above = low <= value if within[0] == "[" else low < value
    below = value <= high if within[-1] == "]" else value < high
    return above and below


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except (TypeError, OverflowError):  # not a number, or an int too large for a float
        return False


class _Problems(list[str]):
    """Messages of the rules that do not hold."""

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def model_rules(config: RunConfig) -> list[str]:
    """`[model]`: a known alias or a model folder; a quantized base only on a GPU, and not under DP-SGD."""
    p, model = _Problems(), config.model
    p.require(model.name in MODEL_ALIASES or Path(model.name).expanduser().is_dir(),
              f"`model.name` must be one of {list(MODEL_ALIASES)} or an existing local model directory, "
              f"got {model.name!r}")
    # Whether this machine has the GPU and bitsandbytes is asked at preflight (fedfm.adapters.hardware_problems).
    p.require(model.quantization == "none" or model.device != "cpu",
              f"`model.quantization` {model.quantization!r} needs a CUDA GPU and bitsandbytes, but `model.device` is "
              f"'cpu'; set model.quantization = \"none\" on a CPU")
    if config.privacy.mode == "dp-sgd":
        p.require(not model.gradient_checkpointing,
                  "`model.gradient-checkpointing` must be false with `privacy.mode` 'dp-sgd': Opacus records each "
                  "layer's activations in its forward hooks, and checkpointing runs every forward twice")
        p.require(model.quantization == "none",
                  f"`model.quantization` must be 'none' with `privacy.mode` 'dp-sgd', got {model.quantization!r}: "
                  f"Opacus's per-sample gradients have not been verified on a bitsandbytes base")
    return p


def lora_rules(config: RunConfig) -> list[str]:
    """`[lora]`: target modules."""
    p, lora = _Problems(), config.lora
    if "all-linear" in lora.target_modules:
        p.require(len(lora.target_modules) == 1,
                  f"`lora.target-modules` 'all-linear' must be the only entry, got {list(lora.target_modules)}")
    return p


def data_rules(config: RunConfig) -> list[str]:
    """`[data]`: the source, and what the dataset allows (context, augmentation, task)."""
    p, data, task = _Problems(), config.data, config.model.task
    if data.dataset in FILE_DATASETS and not data.hospitals:
        p.require(bool(data.path), f"`data.path` must name a file when `data.dataset` is {data.dataset!r}")
    # A table of one's own may group its sentences into abstracts; a word-tagged CoNLL file cannot.
    p.require(data.context == "none" or data.dataset in (*ABSTRACT_DATASETS, *TABLE_DATASETS) or bool(data.hospitals),
              f"`data.context` {data.context!r} needs sentences grouped into abstracts: a dataset of abstracts "
              f"{list(ABSTRACT_DATASETS)}, or a file ({', '.join(TABLE_DATASETS)}) or a deployment's SuperNode files "
              f"with an 'abstract_id' column; got {data.dataset!r}; use 'none'")
    p.require(data.augment != "conclusion" or (data.dataset in CONCLUSION_DATASETS and not data.hospitals),
              f"`data.augment` 'conclusion' needs a dataset whose questions carry their abstract's conclusion "
              f"{list(CONCLUSION_DATASETS)} (not a deployment's SuperNode files); got {data.dataset!r}; use 'none'")
    if not data.hospitals:
        p.require(task != "token-classification" or data.dataset in TOKEN_DATASETS,
                  f"`model.task` 'token-classification' needs a word-tagged dataset {list(TOKEN_DATASETS)} "
                  f"('conll': a file of one's own, a token and its BIO tag per line), got {data.dataset!r}")
        p.require(data.dataset not in TOKEN_DATASETS or task == "token-classification",
                  f"`data.dataset` {data.dataset!r} is tagged word by word and needs `model.task` "
                  f"'token-classification', got {task!r}")
        p.require(task != "causal-qa" or data.dataset in (*CHOICE_DATASETS, *TABLE_DATASETS),
                  f"`model.task` 'causal-qa' needs a multiple-choice dataset {list(CHOICE_DATASETS)} or a file of "
                  f"one's own ({', '.join(TABLE_DATASETS)}) with `question`, `options` (or `A`, `B`, ...) and "
                  f"`answer` columns; got {data.dataset!r}")
        p.require(task != "instruction-tuning" or data.dataset in (*INSTRUCTION_DATASETS, *TABLE_DATASETS),
                  f"`model.task` 'instruction-tuning' needs instruction/response rows: "
                  f"{list(INSTRUCTION_DATASETS)} or a file of one's own ({', '.join(TABLE_DATASETS)}) with "
                  f"`instruction`/`input`/`output` or `messages` columns; got {data.dataset!r}")
        p.require(data.dataset not in INSTRUCTION_DATASETS or task == "instruction-tuning",
                  f"`data.dataset` {data.dataset!r} holds instruction/response pairs and needs `model.task` "
                  f"'instruction-tuning', got {task!r}")
        p.require(task != "image-classification" or data.dataset in (*IMAGE_DATASETS, *TABLE_DATASETS),
                  f"`model.task` 'image-classification' needs images: {list(IMAGE_DATASETS)} ('image-folder': "
                  f"`data.path` a folder with one sub-folder per class) or a table ({', '.join(TABLE_DATASETS)}) "
                  f"of image paths and labels; got {data.dataset!r}")
        p.require(data.dataset not in IMAGE_DATASETS or task == "image-classification",
                  f"`data.dataset` {data.dataset!r} holds images and needs `model.task` 'image-classification', "
                  f"got {task!r}")
    return p


def deployment_rules(config: RunConfig) -> list[str]:
    """`data.hospitals` and `data.label-names` (a deployment's hospitals and classes)."""
    p, data, fed = _Problems(), config.data, config.federation
    if data.label_names:
        p.require(len(data.label_names) >= 2,
                  f"`data.label-names` must name at least two classes, got {list(data.label_names)}")
        p.require(all(n.strip() and "," not in n for n in data.label_names),
                  f"`data.label-names` must be non-empty names without commas, got {list(data.label_names)}")
        # Labels are read with surrounding spaces stripped, so "yes" and "yes " are one name.
        p.require(len({n.strip() for n in data.label_names}) == len(data.label_names),
                  f"`data.label-names` must not repeat a name, got {list(data.label_names)}")
    if not data.hospitals:
        return p
    bad = [n for n in data.hospitals if not HOSPITAL_NAME.match(n)]
    p.require(not bad, f"`data.hospitals` must be names of letters, digits, '_', '.' and '-' (as a SuperNode's "
                       f"node config `hospital` gives them), got {bad}")
    p.require(len(set(data.hospitals)) == len(data.hospitals),
              f"`data.hospitals` must not repeat a name, got {list(data.hospitals)}")
    p.require(bool(data.label_names),
              "`data.hospitals` needs `data.label-names`: the class names in label-id order, so that the server's "
              "classifier and every hospital number the classes the same way")
    p.require(config.model.task in DEPLOYMENT_TASKS,
              f"`data.hospitals` needs `model.task` 'sequence-classification' or 'image-classification' (each "
              f"hospital's file is a text classification file or a table of image paths), got {config.model.task!r}")
    p.require(fed.min_hospitals <= len(data.hospitals),
              f"`federation.min-hospitals` ({fed.min_hospitals}) must not exceed the {len(data.hospitals)} "
              f"`data.hospitals`")
    p.require(bool(data.path) or not fed.central_evaluation,
              "`federation.central-evaluation` needs a global test set: with `data.hospitals` the server holds no "
              "hospital rows, so set `data.path` to a labelled test file the server holds, or set "
              "`federation.central-evaluation=false` (the hospitals' own evaluation is then the global score)")
    if data.path:
        p.require(Path(data.path).suffix.lower() in HOSPITAL_FILE_SUFFIXES,
                  f"`data.path` must end in one of {list(HOSPITAL_FILE_SUFFIXES)} with `data.hospitals` (the suffix "
                  f"picks the reader), got {data.path!r}")
    p.require(not config.privacy.secure_aggregation,
              "`privacy.secure-aggregation` cannot be combined with `data.hospitals` yet: SecAgg+ bounds the "
              "hospitals' weights by the largest row count, which the server does not know in a deployment")
    return p


def train_rules(config: RunConfig) -> list[str]:
    """`[train]`: what DP-SGD and the task allow of the local recipe."""
    p, train = _Problems(), config.train
    p.require(train.class_weights == "none" or config.model.task in ("sequence-classification", "image-classification"),
              f"`train.class-weights` {train.class_weights!r} needs `model.task` 'sequence-classification' or "
              f"'image-classification', got "
              f"{config.model.task!r}; use 'none'")
    p.require(train.logit_adjustment_tau == 1.0 or train.class_weights == "logit-adjusted",
              f"`train.logit-adjustment-tau` ({train.logit_adjustment_tau}) scales the prior of "
              f"`train.class-weights` 'logit-adjusted', but class-weights is {train.class_weights!r}; set "
              f"class-weights to 'logit-adjusted', or `train.logit-adjustment-tau` to 1")
    p.require(not train.augment_images or config.model.task == "image-classification",
              f"`train.augment-images` needs `model.task` 'image-classification', got {config.model.task!r}; "
              "set it to false")
    if config.privacy.mode == "dp-sgd":
        p.require(train.gradient_accumulation == 1,
                  f"`train.gradient-accumulation` must be 1 with `privacy.mode` 'dp-sgd', got "
                  f"{train.gradient_accumulation}: DP-SGD steps on Poisson batches of `privacy.batch-size` rows "
                  f"(run as forward passes of train.batch-size), so raise `privacy.batch-size` instead")
        p.require(train.class_weights == "none",
                  f"`train.class-weights` must be 'none' with `privacy.mode` 'dp-sgd', got {train.class_weights!r}: "
                  f"balanced weights come from the hospital's label counts, so one patient's row would change every "
                  f"row's weight, which DP-SGD's per-example clipping does not bound")
    return p


def federation_rules(config: RunConfig) -> list[str]:
    """`[federation]`: strategy, ranks, sampling, engine and the norm screen."""
    p, fed = _Problems(), config.federation
    # The strategy's name is checked against the registry by fedfm.strategies.config_problems,
    # which also knows strategies registered by users.
    p.require(bool(fed.strategy.strip()), "`federation.strategy` must name a strategy, got ''")
    if fed.head_first_rounds:
        task = config.model.task
        p.require(task in HEAD_TASKS,
                  f"`federation.head-first-rounds` ({fed.head_first_rounds}) trains a classifier head alone, but "
                  f"`model.task` {task!r} has none (only {', '.join(map(repr, HEAD_TASKS))} do); set it to 0")
        p.require(config.privacy.mode != "dp-sgd" or recipe_of(config) != "linear-probe",
                  f"`federation.head-first-rounds` ({fed.head_first_rounds}) has no effect under DP-SGD's linear-probe "
                  f"recipe, which trains the head alone in every round; set it to 0, or `privacy.recipe` to 'lora'")
    p.require(all(1 <= r <= config.lora.r for r in fed.client_ranks),
              f"`federation.client-ranks` must each be in [1, lora.r = {config.lora.r}], got {list(fed.client_ranks)}")
    if config.data.partitioner != "natural":
        p.require(fed.min_hospitals <= config.data.num_hospitals,
                  f"`federation.min-hospitals` ({fed.min_hospitals}) must not exceed `data.num-hospitals` "
                  f"({config.data.num_hospitals})")
    p.require(fed.backend != "in-process" or fed.num_workers <= 1,
              f"`federation.backend` 'in-process' runs one hospital at a time, but `federation.num-workers` is "
              f"{fed.num_workers}; use 'ray' for several workers, or num-workers 1")
    if fed.ray_address.strip():
        p.require(fed.backend != "in-process",
                  f"`federation.ray-address` {fed.ray_address!r} runs the hospitals on a Ray cluster, but "
                  f"`federation.backend` is 'in-process'; set the backend to 'ray' (or 'auto'), or leave "
                  f"`federation.ray-address` empty")
    p.require(fed.gpus_per_hospital == 0 or fed.backend != "in-process",
              f"`federation.gpus-per-hospital` ({fed.gpus_per_hospital}) is a Ray worker's GPU share, but "
              f"`federation.backend` is 'in-process' (one process on one GPU); set it to 0, or the backend to 'ray'")
    p.require(fed.gpus_per_hospital == 0 or config.model.device != "cpu",
              f"`federation.gpus-per-hospital` ({fed.gpus_per_hospital}) reserves GPUs, but `model.device` is "
              f"'cpu'; set it to 0, or `model.device` to 'auto' or 'cuda'")
    p.require(fed.update_norm_limit == 0 or fed.update_norm_limit > 1,
              f"`federation.update-norm-limit` must be 0 (off) or > 1 (times the median change), got "
              f"{fed.update_norm_limit}")
    return p


def selection_rules(config: RunConfig) -> list[str]:
    """Best-round selection, early stopping and personalization."""
    p, fed = _Problems(), config.federation
    uses = [k for k, on in (("`federation.select-best` 'validation'", fed.select_best == "validation"),
                            (f"`federation.patience` {fed.patience}", fed.patience > 0)) if on]
    if uses:
        p.require(config.data.validation_fraction > 0,
                  f"{' and '.join(uses)} need a validation split: set `data.validation-fraction` > 0, got "
                  f"{config.data.validation_fraction}")
        p.require(fed.fraction_evaluate > 0,
                  f"{' and '.join(uses)} need the hospitals' evaluate step (they score the validation split there): "
                  f"set `federation.fraction-evaluate` > 0, got {fed.fraction_evaluate}")
    p.require(fed.patience == 0 or not config.privacy.secure_aggregation,
              f"`federation.patience` must be 0 with `privacy.secure-aggregation` (Flower's SecAgg+ workflow runs "
              f"every round and cannot stop early), got {fed.patience}")
    p.require(fed.personalize_epochs == 0 or config.privacy.mode == "none",
              f"`federation.personalize-epochs` must be 0 with `privacy.mode` {config.privacy.mode!r}: the local "
              f"fine-tune is not DP-SGD and its scores are not counted in the hospitals' ε, got "
              f"{fed.personalize_epochs}")
    if uses:
        p.require(config.model.task != "instruction-tuning" or fed.select_metric == "loss",
                  f"`federation.select-metric` must be 'loss' with `model.task` 'instruction-tuning' (a generative "
                  f"model is scored by its held-out loss and perplexity, not by classes), got {fed.select_metric!r}")
    return p


def attack_rules(config: RunConfig) -> list[str]:
    """`[attack]`: the simulated hostile hospitals."""
    p, at = _Problems(), config.attack
    p.require(all(h >= 0 for h in at.hospitals),
              f"`attack.hospitals` must be hospital indices >= 0, got {list(at.hospitals)}")
    return p


def privacy_rules(config: RunConfig) -> list[str]:
    """`[privacy]`: DP-SGD, client-level DP and secure aggregation."""
    p, pr = _Problems(), config.privacy
    p.require(pr.target_epsilon > 0 and math.isfinite(pr.target_epsilon),
              f"`privacy.target-epsilon` must be a finite number > 0, got {pr.target_epsilon}")
    p.require(0 <= pr.delta < 1, f"`privacy.delta` must be in (0, 1), or 0 for the default, got {pr.delta}")
    p.require(pr.max_grad_norm > 0 and math.isfinite(pr.max_grad_norm),
              f"`privacy.max-grad-norm` must be a finite number > 0, got {pr.max_grad_norm}")
    p.require(pr.client_noise_multiplier > 0 and math.isfinite(pr.client_noise_multiplier),
              f"`privacy.client-noise-multiplier` must be a finite number > 0, got {pr.client_noise_multiplier}")
    p.require(pr.client_clipping_norm > 0 and math.isfinite(pr.client_clipping_norm),
              f"`privacy.client-clipping-norm` must be a finite number > 0, got {pr.client_clipping_norm}")
    p.require(0 <= pr.client_delta < 1,
              f"`privacy.client-delta` must be in (0, 1), or 0 for the default, got {pr.client_delta}")
    task = config.model.task
    if pr.recipe == "linear-probe" and task not in PROBE_TASKS:
        p.append(f"`privacy.recipe` 'linear-probe' trains a classifier head on one pooled feature per row, which "
                 f"`model.task` {task!r} does not have; use 'lora' (or 'auto')")
    if task == "image-classification" and pr.probe_centring in ("vocabulary", "heart-codebook"):
        p.append(f"`privacy.probe-centring` {pr.probe_centring!r} centres features on public text, and `model.task` "
                 f"'image-classification' reads images; use 'generic' (grey images drawn in fedfm; what 'auto' "
                 f"picks for images) or 'none'")
    if pr.mode == "dp-sgd":
        data = config.data
        p.require(data.augment == "none",
                  f"`data.augment` must be 'none' with `privacy.mode` 'dp-sgd', got {data.augment!r}: it makes two "
                  f"training rows of every question, and DP-SGD's ε is per row, so a question would be protected "
                  f"only at twice the ε the ledger reports")
        p.require(data.context == "none",
                  f"`data.context` must be 'none' with `privacy.mode` 'dp-sgd', got {data.context!r}: each sentence's "
                  f"row then carries its neighbours' text or its abstract's length, so one sentence's removal "
                  f"changes other rows too, which DP-SGD's per-row guarantee does not cover")
    if pr.secure_aggregation and pr.client_dp != "none":
        p.append("`privacy.secure-aggregation` cannot be combined with `privacy.client-dp` yet: Flower's client-level "
                 "DP wrappers and its SecAgg+ workflow use different strategy APIs; use DP-SGD (`privacy.mode`) "
                 "with secure aggregation")
    for entry in pr.hospital_epsilon:
        name, sep, value = entry.partition("=")
        try:
            ok = bool(sep and name.strip()) and float(value) > 0 and math.isfinite(float(value))
        except ValueError:
            ok = False
        p.require(ok, f'`privacy.hospital-epsilon` entries must be "name=epsilon" with epsilon > 0, got {entry!r}')
    return p


def compression_rules(config: RunConfig) -> list[str]:
    """`[compression]`, and what it cannot be combined with."""
    p, co = _Problems(), config.compression
    if co.method != "none" and config.privacy.secure_aggregation:
        p.append("`compression.method` must be 'none' with `privacy.secure-aggregation`: SecAgg+ quantizes and masks "
                 "the float tensors itself, and the server never sees one hospital's update to decode")
    if co.method != "none" and config.privacy.client_dp != "none":
        p.append("`compression.method` must be 'none' with `privacy.client-dp`: Flower's client-level DP clips the "
                 "update as sent, before fedfm could decode it")
    return p


#: The rules between fields, in the order their messages are reported.
RULES: tuple[Callable[[RunConfig], list[str]], ...] = (
    model_rules, lora_rules, data_rules, deployment_rules, train_rules, federation_rules, selection_rules,
    attack_rules, privacy_rules, compression_rules,
)
