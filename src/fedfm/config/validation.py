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
    FILE_DATASETS,
    HOSPITAL_FILE_SUFFIXES,
    HOSPITAL_NAME,
    INT64_BOUNDS,
    MODEL_ALIASES,
    TOKEN_DATASETS,
)

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
    if typ is float and not _finite(value):
        return f"`{key}` must be a finite number, got {shown(value)}"
    if typ is int and isinstance(value, int):
        lo, hi = metadata.get("bounds", INT64_BOUNDS)
        note = f" ({metadata['note']})" if "note" in metadata else ""
        if value < lo:
            return f"`{key}` must be >= {lo}{note}, got {shown(value)}"
        if value > hi:
            return f"`{key}` must be in [{lo}, {hi}]{note}, got {shown(value)}"
    return None


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
    """`[model]`: a known alias or a model folder."""
    p, model = _Problems(), config.model
    p.require(model.name in MODEL_ALIASES or Path(model.name).expanduser().is_dir(),
              f"`model.name` must be one of {list(MODEL_ALIASES)} or an existing local model directory, "
              f"got {model.name!r}")
    return p


def lora_rules(config: RunConfig) -> list[str]:
    """`[lora]`: scaling, dropout, target modules."""
    p, lora = _Problems(), config.lora
    p.require(lora.alpha > 0, f"`lora.alpha` must be > 0, got {lora.alpha}")
    p.require(0 <= lora.dropout < 1, f"`lora.dropout` must be in [0, 1), got {lora.dropout}")
    if "all-linear" in lora.target_modules:
        p.require(len(lora.target_modules) == 1,
                  f"`lora.target-modules` 'all-linear' must be the only entry, got {list(lora.target_modules)}")
    return p


def data_rules(config: RunConfig) -> list[str]:
    """`[data]`: the source, its split, and what the dataset allows (context, augmentation, task)."""
    p, data, task = _Problems(), config.data, config.model.task
    if data.dataset in FILE_DATASETS and not data.hospitals:
        p.require(bool(data.path), f"`data.path` must name a file when `data.dataset` is {data.dataset!r}")
    p.require(data.alpha > 0 and math.isfinite(data.alpha), f"`data.alpha` must be > 0, got {data.alpha}")
    p.require(0 < data.test_fraction < 1, f"`data.test-fraction` must be in (0, 1), got {data.test_fraction}")
    p.require(0 <= data.validation_fraction < 1,
              f"`data.validation-fraction` must be in [0, 1) (0 turns it off), got {data.validation_fraction}")
    p.require(data.context == "none" or data.dataset in (*ABSTRACT_DATASETS, *FILE_DATASETS) or bool(data.hospitals),
              f"`data.context` {data.context!r} needs sentences grouped into abstracts: a dataset of abstracts "
              f"{list(ABSTRACT_DATASETS)}, or a file ({', '.join(FILE_DATASETS)}) or a deployment's SuperNode files "
              f"with an 'abstract_id' column; got {data.dataset!r}; use 'none'")
    p.require(data.augment != "conclusion" or (data.dataset in CONCLUSION_DATASETS and not data.hospitals),
              f"`data.augment` 'conclusion' needs a dataset whose questions carry their abstract's conclusion "
              f"{list(CONCLUSION_DATASETS)} (not a deployment's SuperNode files); got {data.dataset!r}; use 'none'")
    if not data.hospitals:
        p.require(task != "token-classification" or data.dataset in TOKEN_DATASETS,
                  f"`model.task` 'token-classification' needs a word-tagged dataset {list(TOKEN_DATASETS)}, "
                  f"got {data.dataset!r}")
        p.require(data.dataset not in TOKEN_DATASETS or task == "token-classification",
                  f"`data.dataset` {data.dataset!r} is tagged word by word and needs `model.task` "
                  f"'token-classification', got {task!r}")
        p.require(task != "causal-qa" or data.dataset in CHOICE_DATASETS,
                  f"`model.task` 'causal-qa' needs a multiple-choice dataset ('pubmedqa', 'medmcqa', 'medqa'), "
                  f"got {data.dataset!r}")
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
    p.require(config.model.task == "sequence-classification",
              f"`data.hospitals` needs `model.task` 'sequence-classification' (each hospital's file is a text "
              f"classification file), got {config.model.task!r}")
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
    """`[train]`: the local optimizer and schedule, and what DP-SGD and the task allow of them."""
    p, train = _Problems(), config.train
    p.require(0 < train.learning_rate <= 10, f"`train.learning-rate` must be in (0, 10], got {train.learning_rate}")
    p.require(0 <= train.momentum < 1, f"`train.momentum` must be in [0, 1), got {train.momentum}")
    p.require(train.weight_decay >= 0, f"`train.weight-decay` must be >= 0, got {train.weight_decay}")
    p.require(train.max_grad_norm >= 0, f"`train.max-grad-norm` must be >= 0, got {train.max_grad_norm}")
    p.require(0 <= train.warmup_ratio < 1, f"`train.warmup-ratio` must be in [0, 1), got {train.warmup_ratio}")
    p.require(train.class_weights == "none" or config.model.task == "sequence-classification",
              f"`train.class-weights` {train.class_weights!r} needs `model.task` 'sequence-classification', got "
              f"{config.model.task!r}; use 'none'")
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
    """`[federation]`: rounds, sampling, engine and learning-rate decay."""
    p, fed = _Problems(), config.federation
    p.require(0 <= fed.lr_min_ratio <= 1, f"`federation.lr-min-ratio` must be in [0, 1], got {fed.lr_min_ratio}")
    # The strategy's name is checked against the registry by fedfm.strategies.config_problems,
    # which also knows strategies registered by users.
    p.require(bool(fed.strategy.strip()), "`federation.strategy` must name a strategy, got ''")
    p.require(all(1 <= r <= config.lora.r for r in fed.client_ranks),
              f"`federation.client-ranks` must each be in [1, lora.r = {config.lora.r}], got {list(fed.client_ranks)}")
    p.require(0 < fed.fraction_train <= 1, f"`federation.fraction-train` must be in (0, 1], got {fed.fraction_train}")
    p.require(0 <= fed.fraction_evaluate <= 1,
              f"`federation.fraction-evaluate` must be in [0, 1], got {fed.fraction_evaluate}")
    if config.data.partitioner != "natural":
        p.require(fed.min_hospitals <= config.data.num_hospitals,
                  f"`federation.min-hospitals` ({fed.min_hospitals}) must not exceed `data.num-hospitals` "
                  f"({config.data.num_hospitals})")
    p.require(fed.backend != "in-process" or fed.num_workers <= 1,
              f"`federation.backend` 'in-process' runs one hospital at a time, but `federation.num-workers` is "
              f"{fed.num_workers}; use 'ray' for several workers, or num-workers 1")
    p.require(fed.round_timeout > 0, f"`federation.round-timeout` must be > 0, got {fed.round_timeout}")
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
    return p


def strategy_rules(config: RunConfig) -> list[str]:
    """`[strategy]`: the parameters every strategy reads."""
    p, st = _Problems(), config.strategy
    p.require(st.proximal_mu >= 0, f"`strategy.proximal-mu` must be >= 0, got {st.proximal_mu}")
    p.require(st.server_learning_rate > 0,
              f"`strategy.server-learning-rate` must be > 0, got {st.server_learning_rate}")
    p.require(0 <= st.server_momentum < 1, f"`strategy.server-momentum` must be in [0, 1), got {st.server_momentum}")
    p.require(st.eta > 0, f"`strategy.eta` must be > 0, got {st.eta}")
    p.require(0 <= st.beta_1 < 1, f"`strategy.beta-1` must be in [0, 1), got {st.beta_1}")
    p.require(0 <= st.beta_2 < 1, f"`strategy.beta-2` must be in [0, 1), got {st.beta_2}")
    p.require(st.tau > 0, f"`strategy.tau` must be > 0, got {st.tau}")
    p.require(0 <= st.trim_fraction < 0.5, f"`strategy.trim-fraction` must be in [0, 0.5), got {st.trim_fraction}")
    return p


def attack_rules(config: RunConfig) -> list[str]:
    """`[attack]`: the simulated hostile hospitals."""
    p, at = _Problems(), config.attack
    p.require(at.scale > 0, f"`attack.scale` must be > 0, got {at.scale}")
    p.require(0 <= at.failure_rate < 1, f"`attack.failure-rate` must be in [0, 1), got {at.failure_rate}")
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
    p.require(0 <= pr.learning_rate <= 10,
              f"`privacy.learning-rate` must be in [0, 10] (0 keeps train.learning-rate), got {pr.learning_rate}")
    p.require(pr.noise_multiplier >= 0 and math.isfinite(pr.noise_multiplier),
              f"`privacy.noise-multiplier` must be >= 0 (0 calibrates it), got {pr.noise_multiplier}")
    p.require(pr.client_noise_multiplier > 0 and math.isfinite(pr.client_noise_multiplier),
              f"`privacy.client-noise-multiplier` must be a finite number > 0, got {pr.client_noise_multiplier}")
    p.require(pr.client_clipping_norm > 0 and math.isfinite(pr.client_clipping_norm),
              f"`privacy.client-clipping-norm` must be a finite number > 0, got {pr.client_clipping_norm}")
    p.require(0 <= pr.client_target_quantile <= 1,
              f"`privacy.client-target-quantile` must be in [0, 1], got {pr.client_target_quantile}")
    p.require(pr.client_clip_learning_rate > 0,
              f"`privacy.client-clip-learning-rate` must be > 0, got {pr.client_clip_learning_rate}")
    p.require(pr.client_clipped_count_stddev >= 0,
              f"`privacy.client-clipped-count-stddev` must be >= 0 (0 for Flower's default), got "
              f"{pr.client_clipped_count_stddev}")
    p.require(0 <= pr.client_delta < 1,
              f"`privacy.client-delta` must be in (0, 1), or 0 for the default, got {pr.client_delta}")
    p.require(0 < pr.secagg_reconstruction_threshold <= 1,
              f"`privacy.secagg-reconstruction-threshold` must be in (0, 1], got {pr.secagg_reconstruction_threshold}")
    p.require(pr.secagg_clipping_range > 0,
              f"`privacy.secagg-clipping-range` must be > 0, got {pr.secagg_clipping_range}")
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
    p.require(0 < co.topk_fraction <= 1, f"`compression.topk-fraction` must be in (0, 1], got {co.topk_fraction}")
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
    strategy_rules, attack_rules, privacy_rules, compression_rules,
)
