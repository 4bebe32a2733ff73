"""Run configuration: frozen dataclasses, TOML loading, ``--set`` overrides, validation.

One source of truth for the Python API, the TOML files, the ``fedfm`` command and
Flower's run config. In TOML and on the command line keys are kebab-case and
grouped by section (``[train]`` / ``train.learning-rate``); in Python they are
the snake_case dataclass fields (``config.train.learning_rate``).

Every problem is collected and reported at once by :class:`~fedfm.errors.ConfigError`,
before any model or dataset is loaded.

- :mod:`fedfm.config.choices`: the allowed values of the choice fields (``Literal`` types).
- :mod:`fedfm.config.schema`: the dataclasses, with help, choices and ranges per field.
- :mod:`fedfm.config.validation`: every problem of a configuration, field by field and section by section.
- :mod:`fedfm.config.codec` and :mod:`fedfm.config.io`: flat keys, JSON, TOML files and ``--set`` overrides.
- :mod:`fedfm.config.policy`: what the server and the hospitals both compute from a configuration.
"""

from __future__ import annotations

from fedfm.config.choices import (
    AUGMENTS,
    COMPRESSION_METHODS,
    CONTEXTS,
    DATASETS,
    FILE_DATASETS,
    HOSPITAL_FILE_SUFFIXES,
    HOSPITAL_NAME,
    INT64_BOUNDS,
    MAX_SEED,
    MODEL_ALIASES,
    TASKS,
)
from fedfm.config.io import describe, from_flat, from_json, load_config, parse_override, to_flat, to_json, to_toml
from fedfm.config.policy import (
    available_cores,
    evaluation_due,
    head_only_round,
    hospital_epsilons,
    hospital_rank,
    recipe_of,
    resolve_parallelism,
    round_learning_rate,
)
from fedfm.config.schema import (
    SECTIONS,
    AttackSpec,
    CompressionSpec,
    DataSpec,
    FederationSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    PrivacySpec,
    RunConfig,
    StrategySpec,
    TrainSpec,
)
from fedfm.config.validation import validate

__all__ = [
    "AUGMENTS",
    "COMPRESSION_METHODS",
    "CONTEXTS",
    "DATASETS",
    "FILE_DATASETS",
    "HOSPITAL_FILE_SUFFIXES",
    "HOSPITAL_NAME",
    "INT64_BOUNDS",
    "MAX_SEED",
    "MODEL_ALIASES",
    "SECTIONS",
    "TASKS",
    "AttackSpec",
    "CompressionSpec",
    "DataSpec",
    "FederationSpec",
    "LoraSpec",
    "ModelSpec",
    "OutputSpec",
    "PrivacySpec",
    "RunConfig",
    "StrategySpec",
    "TrainSpec",
    "available_cores",
    "describe",
    "evaluation_due",
    "from_flat",
    "from_json",
    "head_only_round",
    "hospital_epsilons",
    "hospital_rank",
    "load_config",
    "parse_override",
    "recipe_of",
    "resolve_parallelism",
    "round_learning_rate",
    "to_flat",
    "to_json",
    "to_toml",
    "validate",
]
