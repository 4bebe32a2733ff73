"""The allowed values of the configuration's choice fields, as ``Literal`` types.

A field's type says what it may hold (``mode: PrivacyMode``), as peft's
``LoraConfig`` does; :func:`fedfm.config.validation.validate` checks every
``Literal`` field generically, and the tuples other modules import are read
from the same types with :func:`typing.get_args`, so each list is written once.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

ModelAlias = Literal["minilm", "smollm2-135m", "dinov2-small"]
Task = Literal[
    "sequence-classification", "causal-qa", "token-classification", "instruction-tuning", "image-classification"
]
#: `model.dtype`: the autocast dtype of forward passes (`auto`: bfloat16 on a CUDA device that has it, else float32).
DType = Literal["auto", "float32", "bfloat16"]
#: `model.quantization`: how the frozen base is stored (bitsandbytes; `4bit` is QLoRA's NF4).
Quantization = Literal["none", "8bit", "4bit"]
Device = Literal["auto", "cpu", "cuda"]
Pooling = Literal["auto", "cls", "mean", "layer-mean"]

BuiltinDataset = Literal[
    "heart_disease_uci", "nicta_piboso", "pubmedqa", "medmcqa", "medqa", "ncbi_disease", "medical_meadow_wikidoc_patient",
    "pneumoniamnist",
]
#: Tables of one's own (`data.path`); with an `abstract_id` column they take `data.context` too.
TableDataset = Literal["csv", "jsonl", "parquet"]
#: Datasets read from a file of one's own: the tables, and word-tagged CoNLL text (a token and its tag per line).
FileDataset = Literal[TableDataset, "conll", "image-folder"]
Dataset = Literal[BuiltinDataset, FileDataset]
Partitioner = Literal["iid", "dirichlet", "quantity-skew", "natural"]
Context = Literal["none", "position", "neighbours", "both"]
#: `data.augment`: extra training rows a hospital makes from its own training rows.
Augment = Literal["none", "conclusion"]

Optimizer = Literal["adamw", "sgd"]
#: `train.lr-schedule`: the learning rate over one round's local optimizer steps.
LrSchedule = Literal["constant", "linear", "cosine"]
#: `train.class-weights`: how a hospital's training loss treats its class imbalance (weights, or a logit offset).
ClassWeights = Literal["none", "balanced", "logit-adjusted"]

#: `federation.lr-decay`: the local learning rate over the rounds (the server sends each round's).
LrDecay = Literal["none", "linear", "cosine"]
#: Where simulated hospitals run (fedfm.engine).
Backend = Literal["auto", "in-process", "ray"]
#: `output.tracking`: the experiment tracker a run also logs to.
Tracking = Literal["none", "tensorboard", "mlflow"]
#: `federation.select-best`: which round's global adapter is exported.
SelectBest = Literal["last", "validation"]
#: `federation.select-metric`: validation metrics every task reports (loss is lower-is-better, the others higher).
SelectMetric = Literal["loss", "accuracy", "macro-f1"]

HetloraWeighting = Literal["sparsity", "examples"]
AttackKind = Literal["sign-flip", "scale", "noise", "nan"]

PrivacyMode = Literal["none", "dp-sgd"]
#: `privacy.recipe`: what a DP-SGD hospital trains (``auto``: the linear probe for sequence classification).
DpRecipe = Literal["auto", "linear-probe", "lora"]
#: `privacy.probe-centring`: the public text whose mean feature the probe's features are centred on.
ProbeCentring = Literal["auto", "generic", "vocabulary", "heart-codebook", "none"]
ClientDpMode = Literal["none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive"]
Accountant = Literal["rdp", "prv"]

CompressionMethod = Literal["none", "float16", "bfloat16", "int8", "topk"]

# The same lists as tuples, for the modules that import them (one source: the types above).
MODEL_ALIASES: tuple[str, ...] = get_args(ModelAlias)
TASKS: tuple[str, ...] = get_args(Task)
DATASETS: tuple[str, ...] = get_args(Dataset)
FILE_DATASETS: tuple[str, ...] = get_args(FileDataset)
TABLE_DATASETS: tuple[str, ...] = get_args(TableDataset)
CONTEXTS: tuple[str, ...] = get_args(Context)
AUGMENTS: tuple[str, ...] = get_args(Augment)
PARTITIONERS: tuple[str, ...] = get_args(Partitioner)
BACKENDS: tuple[str, ...] = get_args(Backend)
COMPRESSION_METHODS: tuple[str, ...] = get_args(CompressionMethod)
ATTACKS: tuple[str, ...] = get_args(AttackKind)

#: Datasets tagged word by word, for `model.task = "token-classification"` (and only for it).
TOKEN_DATASETS = ("ncbi_disease", "conll")
#: Datasets of images, for `model.task = "image-classification"` (which also reads `csv`/`jsonl`/`parquet` tables of
#: image paths).
IMAGE_DATASETS = ("pneumoniamnist", "image-folder")
#: Datasets whose rows are sentences of abstracts, for `data.context` other than "none".
ABSTRACT_DATASETS = ("nicta_piboso",)
#: Datasets whose rows carry a `conclusion` column, for `data.augment = "conclusion"`.
CONCLUSION_DATASETS = ("pubmedqa",)
#: Multiple-choice datasets, for `model.task = "causal-qa"`.
CHOICE_DATASETS = ("pubmedqa", "medmcqa", "medqa")
#: Instruction/response datasets, for `model.task = "instruction-tuning"` (and only for it).
INSTRUCTION_DATASETS = ("medical_meadow_wikidoc_patient",)

#: Tasks whose model gains a new classifier head beside the LoRA factors (`federation.head-first-rounds`).
HEAD_TASKS = ("sequence-classification", "token-classification", "image-classification")
#: The tasks whose model is a linear head on one pooled feature per row: DP-SGD's `auto` recipe trains the
#: linear probe there.
PROBE_TASKS = ("sequence-classification", "image-classification")
#: Tasks a deployment (`data.hospitals`) runs: each hospital's own file is a text classification file or a table
#: of image paths.
DEPLOYMENT_TASKS = ("sequence-classification", "image-classification")
#: The form of a hospital's name in `data.hospitals` and in a SuperNode's node config `hospital`.
HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: File suffixes a hospital's file (and a deployment's global test file) may have.
HOSPITAL_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")

#: Integers a TOML file and Flower's run config can hold (signed 64 bits); the bounds of an integer field without its own.
INT64_BOUNDS = (-(2**63), 2**63 - 1)
#: Largest seed: numpy's legacy generators and most seeding APIs take 32-bit seeds.
MAX_SEED = 2**32 - 1
