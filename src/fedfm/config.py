"""Run configuration: frozen dataclasses, TOML loading, ``--set`` overrides, validation.

One source of truth for the Python API, the TOML files, the ``fedfm`` command and
Flower's run config. In TOML and on the command line keys are kebab-case and
grouped by section (``[train]`` / ``train.learning-rate``); in Python they are
the snake_case dataclass fields (``config.train.learning_rate``).

Every problem is collected and reported at once by :class:`~fedfm.errors.ConfigError`,
before any model or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

from fedfm.errors import ConfigError

MODEL_ALIASES = ("minilm", "smollm2-135m")
TASKS = ("sequence-classification", "causal-qa", "token-classification")
DATASETS = ("heart_disease_uci", "nicta_piboso", "pubmedqa", "medmcqa", "medqa", "ncbi_disease", "csv", "jsonl", "parquet")
#: Datasets tagged word by word, for `model.task = "token-classification"` (and only for it).
TOKEN_DATASETS = ("ncbi_disease",)
#: Datasets whose rows are sentences of abstracts, for `data.context` other than "none".
ABSTRACT_DATASETS = ("nicta_piboso",)
#: Datasets read from a file of one's own; with an `abstract_id` column they take `data.context` too.
FILE_DATASETS = ("csv", "jsonl", "parquet")
CONTEXTS = ("none", "position", "neighbours", "both")
#: `data.augment`: extra training rows a hospital makes from its own training rows.
AUGMENTS = ("none", "conclusion")
#: Datasets whose rows carry a `conclusion` column, for `data.augment = "conclusion"`.
CONCLUSION_DATASETS = ("pubmedqa",)
PARTITIONERS = ("iid", "dirichlet", "natural")
OPTIMIZERS = ("adamw", "sgd")
#: Where simulated hospitals run (fedfm.engine).
BACKENDS = ("auto", "in-process", "ray")
#: `train.lr-schedule`: the learning rate over one round's local optimizer steps.
LR_SCHEDULES = ("constant", "linear", "cosine")
#: `federation.lr-decay`: the local learning rate over the rounds (the server sends each round's).
LR_DECAYS = ("none", "linear", "cosine")
#: `train.class-weights`: per-class weights of the training loss.
CLASS_WEIGHTS = ("none", "balanced")
COMPRESSION_METHODS = ("none", "float16", "bfloat16", "int8", "topk")
HETLORA_WEIGHTINGS = ("sparsity", "examples")
ATTACKS = ("sign-flip", "scale", "noise", "nan")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
POOLINGS = ("auto", "cls", "mean")
PRIVACY_MODES = ("none", "dp-sgd")
CLIENT_DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
ACCOUNTANTS = ("rdp", "prv")
#: `federation.select-best`: which round's global adapter is exported.
SELECT_BEST = ("last", "validation")
#: `federation.select-metric`: validation metrics every task reports (loss is lower-is-better, the others higher).
SELECT_METRICS = ("loss", "accuracy", "macro-f1")


#: Integers a TOML file and Flower's run config can hold (signed 64 bits); the bounds of an integer field without its own.
INT64_BOUNDS = (-(2**63), 2**63 - 1)
#: Largest seed: numpy's legacy generators and most seeding APIs take 32-bit seeds.
MAX_SEED = 2**32 - 1


def _help(
    text: str,
    default: Any = dataclasses.MISSING,
    factory: Any = dataclasses.MISSING,
    *,
    bounds: tuple[int, int] | None = None,
    note: str = "",
) -> Any:
    """A field with its help text and, for integers, its allowed range ``bounds`` (inclusive).

    ``validate`` checks every integer field against its bounds (:data:`INT64_BOUNDS` without)
    and every float field for finiteness, in one loop; ``note`` (e.g. "0 keeps all") is added
    to the message of a value out of range.
    """
    metadata: dict[str, Any] = {"help": text}
    if bounds is not None:
        metadata["bounds"] = bounds
    if note:
        metadata["note"] = note
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelSpec:
    """Which foundation model to fine-tune, and for which task."""

    name: str = _help("A model alias (`minilm`, `smollm2-135m`) or a local model directory.", "minilm")
    task: str = _help(
        "`sequence-classification` (encoder + head), `causal-qa` (answer scoring with a causal LM) or "
        "`token-classification` (encoder + per-token head, BIO tags; entity-level F1).",
        "sequence-classification",
    )
    max_length: int = _help(
        "Tokens kept per example (longer inputs are truncated; token classification instead cuts long "
        "sentences into windows at word boundaries, so no word is lost).",
        128,
        bounds=(8, 1_048_576),
    )
    dtype: str = _help("Autocast dtype for forward passes: `float32` (safe everywhere) or `bfloat16`.", "float32")
    device: str = _help("`auto` (cuda when present), `cpu` or `cuda`.", "auto")
    pooling: str = _help(
        "Sequence classification: how token states become one vector. `mean` (mask-aware mean of the last "
        "layer, as sentence-transformers models are trained), `cls` (the architecture's own first-token "
        "pooler) or `auto` (`mean` when the model folder's 1_Pooling/config.json says so, else `cls`).",
        "auto",
    )


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapter each hospital trains (peft)."""

    r: int = _help("Rank of the LoRA update.", 8, bounds=(1, 4096))
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r).", 16.0)
    dropout: float = _help("Dropout on the LoRA branch, in [0, 1).", 0.05)
    target_modules: tuple[str, ...] = _help(
        "Module names to adapt; empty picks a default per architecture (BERT: query, value; Llama: q_proj, v_proj); "
        '["all-linear"] adapts every linear layer except the task head (which trains in full) and the LM head.',
        factory=tuple,
    )


#: The form of a hospital's name in `data.hospitals` and in a SuperNode's node config `hospital`.
HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: File suffixes a hospital's file (and a deployment's global test file) may have.
HOSPITAL_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and how it is split into hospitals."""

    dataset: str = _help("A built-in dataset name or a generic file type (`csv`, `jsonl`, `parquet`).", "heart_disease_uci")
    path: str = _help("For `csv`/`jsonl`/`parquet`: the file to read.", "")
    data_dir: str = _help("Folder of the built-in datasets; empty uses FEDFM_DATA_DIR or ../shared/data.", "")
    text_column: str = _help("For generic files: the column holding the text.", "text")
    label_column: str = _help("For generic files: the column holding the label.", "label")
    partitioner: str = _help("How rows are split into hospitals: `natural`, `iid` or `dirichlet`.", "natural")
    partition_column: str = _help("For `natural`: the column naming the hospital; empty uses the dataset's own.", "")
    num_hospitals: int = _help("For `iid`/`dirichlet`: how many hospitals to simulate.", 4, bounds=(1, 100_000))
    alpha: float = _help("For `dirichlet`: concentration of the label skew (smaller = more skewed).", 0.5)
    test_fraction: float = _help("Share of each hospital's rows kept as its local test split.", 0.3)
    validation_fraction: float = _help(
        "Share of each hospital's training rows (after the test split) held out as its validation split, seeded and "
        "stratified; hospitals score the global adapter on it in the evaluate step (federation.select-best, "
        "federation.patience). Never taken from test rows; 0 (the default, so existing runs keep their training "
        "rows) turns it off; 0.1 is a good start.",
        0.0,
    )
    max_train_per_hospital: int = _help(
        "Cap on each hospital's training rows; 0 keeps all.", 0, bounds=(0, 1_000_000_000), note="0 keeps all"
    )
    max_test: int = _help(
        "Cap on test rows (global and per hospital) and on each validation split; 0 keeps all.", 0,
        bounds=(0, 1_000_000_000), note="0 keeps all",
    )
    seed: int = _help("Seed of the partition and split.", 0, bounds=(0, MAX_SEED))
    context: str = _help(
        "Sentence-role data (nicta_piboso, or a file of one's own and a deployment's SuperNode files with an "
        "`abstract_id` column, sentences in reading order): what each sentence is classified with, as the second "
        "text of a (sentence, context) pair that is truncated before the sentence is: `none`, `position` "
        "(\"sentence 3 of 9\"), `neighbours` (the sentences before and after it) or `both`. Built inside each "
        "hospital from its own abstracts, which stay whole (one hospital, one side of its local split).",
        "none",
    )
    augment: str = _help(
        "Extra training rows each hospital makes from its own training rows (never from test or validation rows): "
        "`none`, or `conclusion` (pubmedqa: every training "
        "question is trained a second time with the abstract's conclusion appended to its context, the "
        "\"reasoning-free\" form; the test questions are still answered without it). Applied after "
        "`data.max-train-per-hospital`, so a hospital trains on twice the capped count.",
        "none",
    )
    hospitals: tuple[str, ...] = _help(
        "A deployment's hospitals, by name in index order (letters, digits, '_', '.', '-'). When set, the server "
        "holds no hospital rows: each SuperNode reads its own file (node config `data-path`) and gives its "
        "`partition-id` or its `hospital` name from this list; `data.path`, if set, is the server's global test "
        "file (read by its suffix), else `federation.central-evaluation` must be false. Needs `data.label-names`. "
        "Empty: hospitals are partitions of `data.dataset`.",
        factory=tuple,
    )
    label_names: tuple[str, ...] = _help(
        "Class names in label-id order, the same at every hospital (string labels must be one of them, integer "
        "labels are ids into the list); empty numbers a file's string labels in sorted order.",
        factory=tuple,
    )


@dataclass(frozen=True)
class TrainSpec:
    """Local training inside each hospital."""

    local_epochs: int = _help(
        "Passes over the hospital's training rows per round (unless local-steps is set).", 1, bounds=(1, 10_000)
    )
    local_steps: int = _help(
        "If > 0: optimizer steps per round instead of epochs.", 0, bounds=(0, 10_000_000), note="0 uses local-epochs"
    )
    batch_size: int = _help(
        "Examples per optimizer step (with DP-SGD: per forward pass; see privacy.batch-size).", 16,
        bounds=(1, 1_048_576),
    )
    eval_batch_size: int = _help("Examples per evaluation forward pass.", 64, bounds=(1, 1_048_576))
    optimizer: str = _help("Local optimizer, fresh each round: `adamw` or `sgd` (with momentum).", "adamw")
    learning_rate: float = _help("Local learning rate.", 5e-4)
    momentum: float = _help("SGD momentum (optimizer `sgd` only).", 0.9)
    weight_decay: float = _help("Weight decay (decoupled for AdamW).", 0.0)
    max_grad_norm: float = _help("Gradient-norm clipping; 0 disables.", 1.0)
    lr_schedule: str = _help(
        "Learning rate over each round's local optimizer steps (the optimizer is fresh every round): `constant`, "
        "`linear` or `cosine` decay to 0 after the warm-up. Also under DP-SGD.",
        "constant",
    )
    warmup_ratio: float = _help(
        "Share of each round's local optimizer steps spent warming the learning rate up linearly, in [0, 1).", 0.0
    )
    gradient_accumulation: int = _help(
        "Batches of batch-size whose gradients add up to one optimizer step (effective batch = batch-size x "
        "this); local-steps counts optimizer steps. Not with DP-SGD: use privacy.batch-size there.",
        1,
        bounds=(1, 65_536),
    )
    class_weights: str = _help(
        "Sequence classification: `none`, or `balanced` (each class weighted N / (K x N_c) from this hospital's "
        "own training label counts, never another hospital's; the mean weight over its rows is 1). Not with DP-SGD.",
        "none",
    )
    seed: int = _help("Seed of initialisation, shuffling and dropout.", 0, bounds=(0, MAX_SEED))


@dataclass(frozen=True)
class FederationSpec:
    """The federation: rounds, sampling, aggregation and the simulation engine."""

    num_rounds: int = _help("Federated rounds.", 5, bounds=(1, 1_000_000))
    lr_decay: str = _help(
        "Local learning rate across rounds: `none`, `linear` or `cosine` from the full rate in round 1 to "
        "lr-min-ratio x it in the last round. The server sends each round's rate (train.learning-rate, or "
        "privacy.learning-rate under DP-SGD), a function of the round number, so a resumed run continues it.",
        "none",
    )
    lr_min_ratio: float = _help("Learning rate of the last round as a share of the first's (lr-decay), in [0, 1].", 0.1)
    strategy: str = _help(
        "Aggregation strategy: a registered name (see `fedfm strategies`) or `module:Class` of your own.", "fedavg"
    )
    client_ranks: tuple[int, ...] = _help(
        "LoRA rank per hospital for `flora` and `hetlora`, cycled over the hospitals (each <= lora.r); "
        "empty gives every hospital lora.r.",
        factory=tuple,
    )
    fraction_train: float = _help("Share of hospitals sampled for training each round, in (0, 1].", 1.0)
    fraction_evaluate: float = _help("Share of hospitals sampled for evaluation each round, in [0, 1].", 1.0)
    min_hospitals: int = _help("Fewest hospitals that must take part in a round.", 2, bounds=(1, 100_000))
    central_evaluation: bool = _help("Evaluate the global adapter on the global test set on the server each round.", True)
    evaluate_every: int = _help(
        "Evaluate (centrally and at the hospitals) every this many rounds, and always after the last one.", 1,
        bounds=(1, 1_000_000),
    )
    num_workers: int = _help(
        "Simulation worker processes; 0 picks one per two cores (at least 1).", 0, bounds=(0, 4096)
    )
    threads_per_worker: int = _help(
        "Torch threads inside each worker; 0 derives it from the cores.", 0, bounds=(0, 4096)
    )
    backend: str = _help(
        "Where `fedfm run` simulates the hospitals: `in-process` (in its own process, one at a time, no Ray: "
        "least start-up and memory), `ray` (Flower's Ray backend, one process per worker), or `auto` "
        "(in-process with one worker, Ray with several). `flwr run` uses Flower's own engine (Ray).",
        "auto",
    )
    round_timeout: float = _help("Seconds the server waits for replies in a round.", 3600.0)
    round_retries: int = _help(
        "Times a round is run again when fewer than min-hospitals replied (hospitals down or timed out); "
        "after that the run stops cleanly and can be resumed.", 2, bounds=(0, 1000)
    )
    update_norm_limit: float = _help(
        "Leave out a hospital's update whose change to the global adapter is larger than this many times the "
        "round's median change (a scaled or runaway update); 0 turns the check off.", 10.0
    )
    select_best: str = _help(
        "Which round's global adapter is exported: `last`, or `validation` (the round with the best "
        "example-weighted validation score across hospitals; needs data.validation-fraction > 0). Test scores "
        "are reported for the best and the last round, never used to choose.",
        "last",
    )
    select_metric: str = _help(
        "Validation metric that picks the best round and drives patience: `loss` (lower is better), `accuracy` "
        "or `macro-f1`.",
        "loss",
    )
    patience: int = _help(
        "Stop cleanly after this many rounds without a better validation score than the best round's "
        "(resumable); 0 never stops early.",
        0,
        bounds=(0, 1_000_000),
        note="0 never stops early",
    )
    personalize_epochs: int = _help(
        "After the last round, each hospital fine-tunes the exported global adapter for this many epochs on its "
        "own training rows and reports the personalized model's local-test score (only scores leave); 0 turns "
        "it off.",
        0,
        bounds=(0, 10_000),
        note="0 turns it off",
    )


@dataclass(frozen=True)
class StrategySpec:
    """Parameters of the aggregation strategies (each strategy reads its own)."""

    proximal_mu: float = _help("FedProx: weight of the proximal term mu/2 ||w - w_global||^2 in the local loss.", 0.01)
    server_learning_rate: float = _help("FedAvgM: server learning rate.", 1.0)
    server_momentum: float = _help("FedAvgM: server momentum.", 0.9)
    eta: float = _help("FedAdam, FedYogi, FedAdagrad: server learning rate.", 1e-2)
    beta_1: float = _help("FedAdam, FedYogi: first-moment decay.", 0.9)
    beta_2: float = _help("FedAdam, FedYogi: second-moment decay.", 0.99)
    tau: float = _help("FedAdam, FedYogi, FedAdagrad: adaptivity (added to the root of the second moment).", 1e-3)
    trim_fraction: float = _help("FedTrimmedAvg: share of hospitals cut from each end per coordinate, in [0, 0.5).", 0.2)
    byzantine: int = _help("Krum, MultiKrum: number of faulty hospitals to tolerate.", 1, bounds=(0, 100_000))
    krum_select: int = _help(
        "MultiKrum: updates averaged after selection; 0 keeps all but `byzantine`.", 0, bounds=(0, 100_000)
    )
    hetlora_weighting: str = _help(
        "HetLoRA: `sparsity` (weights by the Frobenius norm of each hospital's B.A, as the paper) or "
        "`examples` (plain zero-padded averaging by example counts).",
        "sparsity",
    )


@dataclass(frozen=True)
class AttackSpec:
    """Simulated faulty or hostile hospitals, for robustness experiments only."""

    def kind_of(self, hospital: int) -> str:
        """The corruption hospital ``hospital`` (one of ``hospitals``) sends."""
        if not self.kinds:
            return self.kind
        return self.kinds[self.hospitals.index(hospital) % len(self.kinds)]

    hospitals: tuple[int, ...] = _help("Indices of the hospitals that send corrupted updates; empty for none.", factory=tuple)
    kind: str = _help(
        "`sign-flip` (send global - scale x update), `scale` (global + scale x update) or "
        "`noise` (global + Gaussian noise of std scale) or `nan` (NaN in every tensor).",
        "sign-flip",
    )
    kinds: tuple[str, ...] = _help(
        "A kind per listed hospital (cycled), to mix corruptions in one run; empty gives every one `kind`.",
        factory=tuple,
    )
    scale: float = _help("Strength of the corruption.", 5.0)
    failure_rate: float = _help(
        "Chance that each hospital fails (raises) in each round, drawn from train.seed, round and hospital; "
        "simulates crashes and drop-outs.", 0.0
    )


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy: DP-SGD inside each hospital, with one ledger across rounds and restarts."""

    mode: str = _help(
        "`none`, or `dp-sgd`: sample-level DP-SGD (Opacus) on the LoRA tensors in every hospital, "
        "each keeping its own accountant across rounds.",
        "none",
    )
    target_epsilon: float = _help(
        "Each hospital's ε budget for the whole run. With noise-multiplier 0 the noise is calibrated so "
        "the planned rounds end at this ε; a hospital refuses any round that would take it past.",
        8.0,
    )
    delta: float = _help("δ of the guarantee, in (0, 1); 0 picks 1e-5 or 1/N^1.1 per hospital (N its rows), whichever is smaller.", 0.0)
    max_grad_norm: float = _help("Per-example gradient clipping norm of DP-SGD.", 1.0)
    batch_size: int = _help(
        "Expected examples per DP-SGD step (Poisson sampling); 0 uses train.batch-size. Larger batches shrink "
        "the noise on each step's mean; a step runs as length-sorted forward passes of train.batch-size.",
        64,
        bounds=(0, 1_048_576),
        note="0 uses train.batch-size",
    )
    optimizer: str = _help(
        "DP-SGD's local optimizer, `sgd` (with train.momentum) or `adamw`; it replaces train.optimizer under "
        "DP. AdamW rescales every coordinate's noise into a full-size step; SGD keeps it small where the signal is.",
        "sgd",
    )
    learning_rate: float = _help("DP-SGD's local learning rate (replaces train.learning-rate under DP); 0 keeps train's.", 0.1)
    noise_multiplier: float = _help(
        "σ of DP-SGD's Gaussian noise (in units of max-grad-norm); 0 calibrates it from target-epsilon.", 0.0
    )
    accountant: str = _help("Opacus accountant that turns steps into ε: `rdp` or `prv`.", "rdp")
    hospital_epsilon: tuple[str, ...] = _help(
        'Per-hospital budgets overriding target-epsilon, as "name=epsilon" or "index=epsilon" '
        '(e.g. ["Cleveland=3", "2=1.5"]). A SuperNode may also cap its own with node config privacy-epsilon.',
        factory=tuple,
    )
    audit: bool = _help(
        "After the last round, each hospital runs a loss-threshold membership-inference attack on the final "
        "model (its training rows vs its held-out rows) and reports the attack's AUC (0.5: nothing visible).",
        False,
    )
    secure_aggregation: bool = _help(
        "Flower's SecAgg+: hospitals mask their updates so the server learns only their weighted sum. "
        "Needs a linear strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, ffa-lora, fedsa-lora).",
        False,
    )
    secagg_reconstruction_threshold: float = _help(
        "SecAgg+: share of a hospital's key shares needed to unmask a dropped hospital, in (0, 1]; higher is "
        "safer against a curious server colluding with hospitals, lower tolerates more dropouts.",
        0.67,
    )
    secagg_clipping_range: float = _help(
        "SecAgg+: adapter values are clipped to [-range, range] before quantization (LoRA tensors are far smaller).",
        8.0,
    )
    secagg_quantization_range: int = _help(
        "SecAgg+: quantization levels over the clipping range (2^22).", 4194304, bounds=(2, 2**32 - 1)
    )
    client_dp: str = _help(
        "Client-level (hospital-level) DP with Flower's wrappers: `none`, `server-fixed`, `server-adaptive` "
        "(the server clips each update), `client-fixed`, `client-adaptive` (each hospital clips its own); "
        "Gaussian noise is added to the mean on the server. Needs a strategy that aggregates by FedAvg's mean.",
        "none",
    )
    client_noise_multiplier: float = _help(
        "Client-level DP: σ of the noise on the mean, in units of the clipping norm divided by the hospitals sampled.", 1.0
    )
    client_clipping_norm: float = _help(
        "Client-level DP: L2 bound of each hospital's update (fixed), or its starting value (adaptive).", 0.1
    )
    client_target_quantile: float = _help("Adaptive client-level DP: share of updates the norm should leave unclipped.", 0.5)
    client_clip_learning_rate: float = _help("Adaptive client-level DP: learning rate of the clipping norm.", 0.2)
    client_clipped_count_stddev: float = _help(
        "Adaptive client-level DP: σ of the noise on the count of clipped updates; 0 uses Flower's default "
        "(hospitals sampled / 20). client-noise-multiplier must stay below twice this value.",
        0.0,
    )
    client_delta: float = _help(
        "Client-level DP: δ, in (0, 1); 0 picks 1e-5 or 1/H^1.1 (H hospitals), whichever is smaller.", 0.0
    )


@dataclass(frozen=True)
class CompressionSpec:
    """How hospitals compress the adapter update they send (the server decodes it before aggregating)."""

    method: str = _help(
        "`none`, `float16` or `bfloat16` (each tensor cast), `int8` (the update quantized with one scale per "
        "tensor) or `topk` (the largest entries of the update; the rest is kept and sent later: error feedback).",
        "none",
    )
    topk_fraction: float = _help("`topk`: share of each tensor's entries sent, in (0, 1].", 0.1)


@dataclass(frozen=True)
class OutputSpec:
    """Where and what a run writes."""

    dir: str = _help("Run directory; empty uses runs/<timestamp>.", "")
    merged_model: bool = _help("Also export the base model with the adapter merged in.", False)
    resume: bool = _help(
        "Continue the run in `dir` from its last complete round (its checkpoint) instead of starting afresh.", False
    )
    overwrite: bool = _help(
        "Delete the fedfm run already in `dir` and start afresh. Without it (or `resume`) a `dir` that holds "
        "anything is refused, so no run is ever overwritten by accident.",
        False,
    )


@dataclass(frozen=True)
class RunConfig:
    """A whole fedfm run. Build it in code, from TOML (:func:`load_config`) or flat keys."""

    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ConfigError(problems)

    def replace(self, **overrides: Any) -> RunConfig:
        """Return a copy with flat ``section.key`` overrides applied (kebab or snake case)."""
        flat = to_flat(self)
        for key, value in overrides.items():
            flat[_kebab(key.replace("__", "."))] = value
        return from_flat(flat)

    def to_flat(self) -> dict[str, Any]:
        """Flat ``{"section.kebab-key": value}`` form (Flower run config, JSON)."""
        return to_flat(self)

    def to_toml(self) -> str:
        """The resolved configuration as a TOML document."""
        return to_toml(self)


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "lora": LoraSpec,
    "data": DataSpec,
    "train": TrainSpec,
    "federation": FederationSpec,
    "strategy": StrategySpec,
    "attack": AttackSpec,
    "privacy": PrivacySpec,
    "compression": CompressionSpec,
    "output": OutputSpec,
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str, problems: list[str]) -> Any:
    """Coerce a TOML/JSON value to a field's type, or record why it cannot be."""
    text = str(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"`{key}` must be true or false, got {value!r}")
        return None
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            problems.append(f"`{key}` must be an integer, got {_shown(value)}")
            return None
        if isinstance(value, int):
            return value  # as it is: a round trip through float would round a large one
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass  # "1e3" is read below
        try:
            return _integral(float(value))
        except ValueError:
            problems.append(f"`{key}` must be an integer, got {_shown(value)}")
            return None
    if typ is float:
        if isinstance(value, bool):
            problems.append(f"`{key}` must be a number, got {value!r}")
            return None
        try:
            return float(value)
        except OverflowError:
            problems.append(f"`{key}` must be a finite number, got {_shown(value)}")
            return None
        except (TypeError, ValueError):
            problems.append(f"`{key}` must be a number, got {_shown(value)}")
            return None
    if typ is str:
        if isinstance(value, (dict, list, tuple)):
            problems.append(f"`{key}` must be a string, got {value!r}")
            return None
        return str(value)
    if text.startswith("tuple[int"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        items: list[int] = []
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).lstrip("-").isdigit():
                problems.append(f"`{key}` must be a list of integers, got {value!r}")
                return None
            items.append(int(v))
        return tuple(items)
    if text.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            problems.append(f"`{key}` must be a list of strings, got {value!r}")
            return None
        return tuple(value)
    raise TypeError(f"unsupported config field type {typ} for {key}")  # a bug in this module


def _integral(value: float) -> int:
    """``value`` as an int when it is a finite whole number (``1e3``), else ValueError."""
    if not (math.isfinite(value) and value.is_integer()):
        raise ValueError(value)
    return int(value)


def _shown(value: Any) -> str:
    """``repr(value)`` for a message, shortened when it is huge (a 400-digit integer)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def from_flat(flat: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from ``{"section.key": value}``; every problem reported at once."""
    nested: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            problems.append(
                f"unknown configuration key `{key}`; sections are {sorted(SECTIONS)}"
            )
            continue
        nested.setdefault(section, {})[name] = value
    return _from_nested(nested, problems)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested ``{"section": {"key": value}}`` (TOML layout)."""
    problems: list[str] = []
    nested: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            problems.append(f"unknown configuration section `[{section}]`; allowed: {sorted(SECTIONS)}")
            continue
        if not isinstance(table, dict):
            problems.append(f"`{section}` must be a table of keys, got {table!r}")
            continue
        nested[section] = dict(table)
    return _from_nested(nested, problems)


def _from_nested(nested: dict[str, dict[str, Any]], problems: list[str]) -> RunConfig:
    specs: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        allowed = {_kebab(f.name): f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in nested.get(section, {}).items():
            name = allowed.get(_kebab(key))
            if name is None:
                problems.append(
                    f"unknown key `{section}.{key}`; allowed keys of [{section}]: {sorted(allowed)}"
                )
                continue
            coerced = _coerce(value, types[name], f"{section}.{_kebab(name)}", problems)
            if coerced is not None:
                kwargs[name] = coerced
        specs[section] = cls(**kwargs)
    if problems:
        # Report type problems together with range problems of what did parse.
        config = object.__new__(RunConfig)
        for section, spec in specs.items():
            object.__setattr__(config, section, spec)
        raise ConfigError(problems + validate(config))
    return RunConfig(**specs)


def to_flat(config: RunConfig) -> dict[str, Any]:
    """Flatten to ``{"section.kebab-key": value}`` with scalar values (Flower's run config type)."""
    flat: dict[str, Any] = {}
    for section in SECTIONS:
        spec = getattr(config, section)
        for f in fields(spec):
            value = getattr(spec, f.name)
            # Flower's run config holds scalars only: lists travel comma-separated.
            flat[f"{section}.{_kebab(f.name)}"] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return flat


def to_json(config: RunConfig) -> str:
    """Serialize for a Flower ConfigRecord or a file."""
    return json.dumps(to_flat(config), sort_keys=True)


def from_json(text: str) -> RunConfig:
    """Inverse of :func:`to_json`."""
    return from_flat(json.loads(text))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(config: RunConfig) -> str:
    """Render the resolved configuration as TOML (readable by :func:`load_config`)."""
    lines: list[str] = []
    for section in SECTIONS:
        spec = getattr(config, section)
        lines.append(f"[{section}]")
        for f in fields(spec):
            lines.append(f"{_kebab(f.name)} = {_toml_value(getattr(spec, f.name))}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``section.key=value`` override; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(f"override `{text}` must look like section.key=value, e.g. train.learning-rate=1e-4")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return _kebab(key), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML file (or the defaults) and apply ``section.key=value`` overrides.

    Parameters
    ----------
    path : str or Path, optional
        A TOML file with ``[model]``, ``[lora]``, ``[data]``, ``[train]``,
        ``[federation]`` and ``[output]`` tables. None starts from the defaults.
    overrides : list of str, optional
        ``section.key=value`` strings applied on top, as ``fedfm run --set`` does.

    Returns
    -------
    RunConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        Listing every invalid or unknown field with its value and the allowed values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file `{p}` does not exist")
        data_bytes = _read_bytes(p)
        try:
            text = data_bytes.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
        except UnicodeDecodeError as err:
            line = data_bytes[:err.start].count(b"\n") + 1
            raise ConfigError(
                f"config file `{p}` is not UTF-8 text (line {line}: byte {data_bytes[err.start]:#04x}); TOML files "
                f"are UTF-8: save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            ) from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file `{p}` is not valid TOML: {err}") from err
    flat: dict[str, Any] = {}
    problems: list[str] = []
    for section, table in data.items():
        if not isinstance(table, dict):
            problems.append(f"`{section}` must be a table, got {table!r}")
            continue
        for key, value in table.items():
            flat[f"{section}.{_kebab(key)}"] = value
    for text in overrides or []:
        key, value = parse_override(text)
        flat[key] = value
    if problems:
        raise ConfigError(problems)
    return from_flat(flat)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file `{path}` cannot be read: {err.strerror or err}") from err


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def validate(config: RunConfig) -> list[str]:
    """Every problem of a configuration, as messages naming field, value and allowed range.

    First every field on its own (integers within their bounds, floats finite: one loop over the
    field metadata), then the rules between fields; a rule's message about a field already
    reported out of range (``nan`` fails every comparison) is left out, so each field has one.
    """
    problems, bad = _field_problems(config)
    subject = re.compile(r"^`([a-z0-9-]+\.[a-z0-9-]+)`")
    for message in _rule_problems(config):
        match = subject.match(message)
        if match is None or match.group(1) not in bad:
            problems.append(message)
    return problems


def _field_problems(config: RunConfig) -> tuple[list[str], set[str]]:
    """Problems of single fields: an integer outside its ``bounds``, a float that is inf or nan.

    Returns the messages and the ``section.key`` names they are about.
    """
    problems: list[str] = []
    bad: set[str] = set()
    for section, cls in SECTIONS.items():
        spec = getattr(config, section)
        types = _field_types(cls)
        for f in fields(cls):
            key, value = f"{section}.{_kebab(f.name)}", getattr(spec, f.name)
            message = None
            if types[f.name] is float and not _finite(value):
                message = f"`{key}` must be a finite number, got {_shown(value)}"
            elif types[f.name] is int and isinstance(value, int):
                lo, hi = f.metadata.get("bounds", INT64_BOUNDS)
                note = f" ({f.metadata['note']})" if "note" in f.metadata else ""
                if value < lo:
                    message = f"`{key}` must be >= {lo}{note}, got {_shown(value)}"
                elif value > hi:
                    message = f"`{key}` must be in [{lo}, {hi}]{note}, got {_shown(value)}"
            if message is not None:
                problems.append(message)
                bad.add(key)
    return problems, bad


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except (TypeError, OverflowError):  # not a number, or an int too large for a float
        return False


def _rule_problems(config: RunConfig) -> list[str]:
    """Problems of allowed choices and of fields together."""
    p: list[str] = []
    m, lo, d, t, fe = config.model, config.lora, config.data, config.train, config.federation
    _check(p, m.name in MODEL_ALIASES or Path(m.name).expanduser().is_dir(),
           f"`model.name` must be one of {list(MODEL_ALIASES)} or an existing local model directory, got {m.name!r}")
    _check(p, m.task in TASKS, f"`model.task` must be one of {list(TASKS)}, got {m.task!r}")
    _check(p, m.dtype in DTYPES, f"`model.dtype` must be one of {list(DTYPES)}, got {m.dtype!r}")
    _check(p, m.device in DEVICES, f"`model.device` must be one of {list(DEVICES)}, got {m.device!r}")
    _check(p, m.pooling in POOLINGS, f"`model.pooling` must be one of {list(POOLINGS)}, got {m.pooling!r}")
    _check(p, lo.alpha > 0, f"`lora.alpha` must be > 0, got {lo.alpha}")
    _check(p, 0 <= lo.dropout < 1, f"`lora.dropout` must be in [0, 1), got {lo.dropout}")
    _check(p, d.dataset in DATASETS, f"`data.dataset` must be one of {list(DATASETS)}, got {d.dataset!r}")
    if d.dataset in FILE_DATASETS and not d.hospitals:
        _check(p, bool(d.path), f"`data.path` must name a file when `data.dataset` is {d.dataset!r}")
    _check(p, d.partitioner in PARTITIONERS, f"`data.partitioner` must be one of {list(PARTITIONERS)}, got {d.partitioner!r}")
    _check(p, d.alpha > 0 and math.isfinite(d.alpha), f"`data.alpha` must be > 0, got {d.alpha}")
    _check(p, 0 < d.test_fraction < 1, f"`data.test-fraction` must be in (0, 1), got {d.test_fraction}")
    _check(p, 0 <= d.validation_fraction < 1,
           f"`data.validation-fraction` must be in [0, 1) (0 turns it off), got {d.validation_fraction}")
    _check(p, d.context in CONTEXTS, f"`data.context` must be one of {list(CONTEXTS)}, got {d.context!r}")
    _check(p, d.context == "none" or d.dataset in (*ABSTRACT_DATASETS, *FILE_DATASETS) or bool(d.hospitals),
           f"`data.context` {d.context!r} needs sentences grouped into abstracts: a dataset of abstracts "
           f"{list(ABSTRACT_DATASETS)}, or a file ({', '.join(FILE_DATASETS)}) or a deployment's SuperNode files "
           f"with an 'abstract_id' column; got {d.dataset!r}; use 'none'")
    _check(p, d.augment in AUGMENTS, f"`data.augment` must be one of {list(AUGMENTS)}, got {d.augment!r}")
    _check(p, d.augment != "conclusion" or (d.dataset in CONCLUSION_DATASETS and not d.hospitals),
           f"`data.augment` 'conclusion' needs a dataset whose questions carry their abstract's conclusion "
           f"{list(CONCLUSION_DATASETS)} (not a deployment's SuperNode files); got {d.dataset!r}; use 'none'")
    p.extend(_deployment_problems(config))
    if not d.hospitals:
        _check(p, m.task != "token-classification" or d.dataset in TOKEN_DATASETS,
               f"`model.task` 'token-classification' needs a word-tagged dataset {list(TOKEN_DATASETS)}, got {d.dataset!r}")
        _check(p, d.dataset not in TOKEN_DATASETS or m.task == "token-classification",
               f"`data.dataset` {d.dataset!r} is tagged word by word and needs `model.task` 'token-classification', "
               f"got {m.task!r}")
    if m.task == "causal-qa" and not d.hospitals:
        _check(p, d.dataset in ("pubmedqa", "medmcqa", "medqa"),
               f"`model.task` 'causal-qa' needs a multiple-choice dataset ('pubmedqa', 'medmcqa', 'medqa'), got {d.dataset!r}")
    _check(p, t.optimizer in OPTIMIZERS, f"`train.optimizer` must be one of {list(OPTIMIZERS)}, got {t.optimizer!r}")
    _check(p, 0 < t.learning_rate <= 10, f"`train.learning-rate` must be in (0, 10], got {t.learning_rate}")
    _check(p, 0 <= t.momentum < 1, f"`train.momentum` must be in [0, 1), got {t.momentum}")
    _check(p, t.weight_decay >= 0, f"`train.weight-decay` must be >= 0, got {t.weight_decay}")
    _check(p, t.max_grad_norm >= 0, f"`train.max-grad-norm` must be >= 0, got {t.max_grad_norm}")
    p.extend(_recipe_problems(config))
    # The strategy's name is checked against the registry by fedfm.strategies.config_problems,
    # which also knows strategies registered by users.
    _check(p, bool(fe.strategy.strip()), "`federation.strategy` must name a strategy, got ''")
    _check(p, all(1 <= r <= lo.r for r in fe.client_ranks),
           f"`federation.client-ranks` must each be in [1, lora.r = {lo.r}], got {list(fe.client_ranks)}")
    _check(p, 0 < fe.fraction_train <= 1, f"`federation.fraction-train` must be in (0, 1], got {fe.fraction_train}")
    _check(p, 0 <= fe.fraction_evaluate <= 1, f"`federation.fraction-evaluate` must be in [0, 1], got {fe.fraction_evaluate}")
    if d.partitioner != "natural":
        _check(p, fe.min_hospitals <= d.num_hospitals,
               f"`federation.min-hospitals` ({fe.min_hospitals}) must not exceed `data.num-hospitals` ({d.num_hospitals})")
    _check(p, fe.backend in BACKENDS, f"`federation.backend` must be one of {list(BACKENDS)}, got {fe.backend!r}")
    _check(p, fe.backend != "in-process" or fe.num_workers <= 1,
           f"`federation.backend` 'in-process' runs one hospital at a time, but `federation.num-workers` is "
           f"{fe.num_workers}; use 'ray' for several workers, or num-workers 1")
    _check(p, fe.round_timeout > 0, f"`federation.round-timeout` must be > 0, got {fe.round_timeout}")
    _check(p, fe.update_norm_limit == 0 or fe.update_norm_limit > 1,
           f"`federation.update-norm-limit` must be 0 (off) or > 1 (times the median change), got {fe.update_norm_limit}")
    p.extend(_selection_problems(config))
    st = config.strategy
    _check(p, st.proximal_mu >= 0, f"`strategy.proximal-mu` must be >= 0, got {st.proximal_mu}")
    _check(p, st.server_learning_rate > 0, f"`strategy.server-learning-rate` must be > 0, got {st.server_learning_rate}")
    _check(p, 0 <= st.server_momentum < 1, f"`strategy.server-momentum` must be in [0, 1), got {st.server_momentum}")
    _check(p, st.eta > 0, f"`strategy.eta` must be > 0, got {st.eta}")
    _check(p, 0 <= st.beta_1 < 1, f"`strategy.beta-1` must be in [0, 1), got {st.beta_1}")
    _check(p, 0 <= st.beta_2 < 1, f"`strategy.beta-2` must be in [0, 1), got {st.beta_2}")
    _check(p, st.tau > 0, f"`strategy.tau` must be > 0, got {st.tau}")
    _check(p, 0 <= st.trim_fraction < 0.5, f"`strategy.trim-fraction` must be in [0, 0.5), got {st.trim_fraction}")
    _check(p, st.hetlora_weighting in HETLORA_WEIGHTINGS,
           f"`strategy.hetlora-weighting` must be one of {list(HETLORA_WEIGHTINGS)}, got {st.hetlora_weighting!r}")
    at = config.attack
    _check(p, at.kind in ATTACKS, f"`attack.kind` must be one of {list(ATTACKS)}, got {at.kind!r}")
    _check(p, all(k in ATTACKS for k in at.kinds), f"`attack.kinds` must each be one of {list(ATTACKS)}, got {list(at.kinds)}")
    _check(p, at.scale > 0, f"`attack.scale` must be > 0, got {at.scale}")
    _check(p, 0 <= at.failure_rate < 1, f"`attack.failure-rate` must be in [0, 1), got {at.failure_rate}")
    _check(p, all(h >= 0 for h in at.hospitals), f"`attack.hospitals` must be hospital indices >= 0, got {list(at.hospitals)}")
    p.extend(_privacy_problems(config))
    co = config.compression
    _check(p, co.method in COMPRESSION_METHODS,
           f"`compression.method` must be one of {list(COMPRESSION_METHODS)}, got {co.method!r}")
    _check(p, 0 < co.topk_fraction <= 1, f"`compression.topk-fraction` must be in (0, 1], got {co.topk_fraction}")
    if co.method != "none" and config.privacy.secure_aggregation:
        p.append("`compression.method` must be 'none' with `privacy.secure-aggregation`: SecAgg+ quantizes and masks "
                 "the float tensors itself, and the server never sees one hospital's update to decode")
    if co.method != "none" and config.privacy.client_dp != "none":
        p.append("`compression.method` must be 'none' with `privacy.client-dp`: Flower's client-level DP clips the "
                 "update as sent, before fedfm could decode it")
    return p


def _recipe_problems(config: RunConfig) -> list[str]:
    """Problems of the training recipe: schedules, accumulation, class weights, LoRA targets."""
    p: list[str] = []
    t, fe, lo = config.train, config.federation, config.lora
    dp = config.privacy.mode == "dp-sgd"
    _check(p, t.lr_schedule in LR_SCHEDULES,
           f"`train.lr-schedule` must be one of {list(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    _check(p, 0 <= t.warmup_ratio < 1, f"`train.warmup-ratio` must be in [0, 1), got {t.warmup_ratio}")
    _check(p, t.class_weights in CLASS_WEIGHTS,
           f"`train.class-weights` must be one of {list(CLASS_WEIGHTS)}, got {t.class_weights!r}")
    _check(p, fe.lr_decay in LR_DECAYS, f"`federation.lr-decay` must be one of {list(LR_DECAYS)}, got {fe.lr_decay!r}")
    _check(p, 0 <= fe.lr_min_ratio <= 1, f"`federation.lr-min-ratio` must be in [0, 1], got {fe.lr_min_ratio}")
    _check(p, t.class_weights == "none" or config.model.task == "sequence-classification",
           f"`train.class-weights` {t.class_weights!r} needs `model.task` 'sequence-classification', got "
           f"{config.model.task!r}; use 'none'")
    if dp:
        _check(p, t.gradient_accumulation == 1,
               f"`train.gradient-accumulation` must be 1 with `privacy.mode` 'dp-sgd', got "
               f"{t.gradient_accumulation}: DP-SGD steps on Poisson batches of `privacy.batch-size` rows "
               f"(run as forward passes of train.batch-size), so raise `privacy.batch-size` instead")
        _check(p, t.class_weights == "none",
               f"`train.class-weights` must be 'none' with `privacy.mode` 'dp-sgd', got {t.class_weights!r}: "
               f"balanced weights come from the hospital's label counts, so one patient's row would change every "
               f"row's weight, which DP-SGD's per-example clipping does not bound")
    if "all-linear" in lo.target_modules:
        _check(p, len(lo.target_modules) == 1,
               f"`lora.target-modules` 'all-linear' must be the only entry, got {list(lo.target_modules)}")
    return p


def _selection_problems(config: RunConfig) -> list[str]:
    """Problems of best-round selection, early stopping and personalization."""
    p: list[str] = []
    fe = config.federation
    _check(p, fe.select_best in SELECT_BEST,
           f"`federation.select-best` must be one of {list(SELECT_BEST)}, got {fe.select_best!r}")
    _check(p, fe.select_metric in SELECT_METRICS,
           f"`federation.select-metric` must be one of {list(SELECT_METRICS)}, got {fe.select_metric!r}")
    uses = [k for k, on in (("`federation.select-best` 'validation'", fe.select_best == "validation"),
                            (f"`federation.patience` {fe.patience}", fe.patience > 0)) if on]
    if uses:
        _check(p, config.data.validation_fraction > 0,
               f"{' and '.join(uses)} need a validation split: set `data.validation-fraction` > 0, got "
               f"{config.data.validation_fraction}")
        _check(p, fe.fraction_evaluate > 0,
               f"{' and '.join(uses)} need the hospitals' evaluate step (they score the validation split there): "
               f"set `federation.fraction-evaluate` > 0, got {fe.fraction_evaluate}")
    _check(p, fe.patience == 0 or not config.privacy.secure_aggregation,
           f"`federation.patience` must be 0 with `privacy.secure-aggregation` (Flower's SecAgg+ workflow runs "
           f"every round and cannot stop early), got {fe.patience}")
    _check(p, fe.personalize_epochs == 0 or config.privacy.mode == "none",
           f"`federation.personalize-epochs` must be 0 with `privacy.mode` {config.privacy.mode!r}: the local "
           f"fine-tune is not DP-SGD and its scores are not counted in the hospitals' ε, got {fe.personalize_epochs}")
    return p


def _deployment_problems(config: RunConfig) -> list[str]:
    """Problems of `data.hospitals` and `data.label-names` (a deployment's hospitals and classes)."""
    p: list[str] = []
    d, fe = config.data, config.federation
    if d.label_names:
        _check(p, len(d.label_names) >= 2,
               f"`data.label-names` must name at least two classes, got {list(d.label_names)}")
        _check(p, all(n.strip() and "," not in n for n in d.label_names),
               f"`data.label-names` must be non-empty names without commas, got {list(d.label_names)}")
        # Labels are read with surrounding spaces stripped, so "yes" and "yes " are one name.
        _check(p, len({n.strip() for n in d.label_names}) == len(d.label_names),
               f"`data.label-names` must not repeat a name, got {list(d.label_names)}")
    if not d.hospitals:
        return p
    bad = [n for n in d.hospitals if not HOSPITAL_NAME.match(n)]
    _check(p, not bad, f"`data.hospitals` must be names of letters, digits, '_', '.' and '-' (as a SuperNode's "
                       f"node config `hospital` gives them), got {bad}")
    _check(p, len(set(d.hospitals)) == len(d.hospitals), f"`data.hospitals` must not repeat a name, got {list(d.hospitals)}")
    _check(p, bool(d.label_names),
           "`data.hospitals` needs `data.label-names`: the class names in label-id order, so that the server's "
           "classifier and every hospital number the classes the same way")
    _check(p, config.model.task == "sequence-classification",
           f"`data.hospitals` needs `model.task` 'sequence-classification' (each hospital's file is a text "
           f"classification file), got {config.model.task!r}")
    _check(p, fe.min_hospitals <= len(d.hospitals),
           f"`federation.min-hospitals` ({fe.min_hospitals}) must not exceed the {len(d.hospitals)} `data.hospitals`")
    _check(p, bool(d.path) or not fe.central_evaluation,
           "`federation.central-evaluation` needs a global test set: with `data.hospitals` the server holds no "
           "hospital rows, so set `data.path` to a labelled test file the server holds, or set "
           "`federation.central-evaluation=false` (the hospitals' own evaluation is then the global score)")
    if d.path:
        _check(p, Path(d.path).suffix.lower() in HOSPITAL_FILE_SUFFIXES,
               f"`data.path` must end in one of {list(HOSPITAL_FILE_SUFFIXES)} with `data.hospitals` (the suffix "
               f"picks the reader), got {d.path!r}")
    _check(p, not config.privacy.secure_aggregation,
           "`privacy.secure-aggregation` cannot be combined with `data.hospitals` yet: SecAgg+ bounds the "
           "hospitals' weights by the largest row count, which the server does not know in a deployment")
    return p


def _privacy_problems(config: RunConfig) -> list[str]:
    p: list[str] = []
    pr = config.privacy
    _check(p, pr.mode in PRIVACY_MODES, f"`privacy.mode` must be one of {list(PRIVACY_MODES)}, got {pr.mode!r}")
    _check(p, pr.target_epsilon > 0 and math.isfinite(pr.target_epsilon),
           f"`privacy.target-epsilon` must be a finite number > 0, got {pr.target_epsilon}")
    _check(p, 0 <= pr.delta < 1, f"`privacy.delta` must be in (0, 1), or 0 for the default, got {pr.delta}")
    _check(p, pr.max_grad_norm > 0 and math.isfinite(pr.max_grad_norm),
           f"`privacy.max-grad-norm` must be a finite number > 0, got {pr.max_grad_norm}")
    _check(p, pr.optimizer in OPTIMIZERS, f"`privacy.optimizer` must be one of {list(OPTIMIZERS)}, got {pr.optimizer!r}")
    _check(p, 0 <= pr.learning_rate <= 10,
           f"`privacy.learning-rate` must be in [0, 10] (0 keeps train.learning-rate), got {pr.learning_rate}")
    _check(p, pr.noise_multiplier >= 0 and math.isfinite(pr.noise_multiplier),
           f"`privacy.noise-multiplier` must be >= 0 (0 calibrates it), got {pr.noise_multiplier}")
    _check(p, pr.accountant in ACCOUNTANTS, f"`privacy.accountant` must be one of {list(ACCOUNTANTS)}, got {pr.accountant!r}")
    _check(p, pr.client_dp in CLIENT_DP_MODES,
           f"`privacy.client-dp` must be one of {list(CLIENT_DP_MODES)}, got {pr.client_dp!r}")
    _check(p, pr.client_noise_multiplier > 0 and math.isfinite(pr.client_noise_multiplier),
           f"`privacy.client-noise-multiplier` must be a finite number > 0, got {pr.client_noise_multiplier}")
    _check(p, pr.client_clipping_norm > 0 and math.isfinite(pr.client_clipping_norm),
           f"`privacy.client-clipping-norm` must be a finite number > 0, got {pr.client_clipping_norm}")
    _check(p, 0 <= pr.client_target_quantile <= 1,
           f"`privacy.client-target-quantile` must be in [0, 1], got {pr.client_target_quantile}")
    _check(p, pr.client_clip_learning_rate > 0,
           f"`privacy.client-clip-learning-rate` must be > 0, got {pr.client_clip_learning_rate}")
    _check(p, pr.client_clipped_count_stddev >= 0,
           f"`privacy.client-clipped-count-stddev` must be >= 0 (0 for Flower's default), got {pr.client_clipped_count_stddev}")
    _check(p, 0 <= pr.client_delta < 1, f"`privacy.client-delta` must be in (0, 1), or 0 for the default, got {pr.client_delta}")
    _check(p, 0 < pr.secagg_reconstruction_threshold <= 1,
           f"`privacy.secagg-reconstruction-threshold` must be in (0, 1], got {pr.secagg_reconstruction_threshold}")
    _check(p, pr.secagg_clipping_range > 0, f"`privacy.secagg-clipping-range` must be > 0, got {pr.secagg_clipping_range}")
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
        _check(p, ok, f'`privacy.hospital-epsilon` entries must be "name=epsilon" with epsilon > 0, got {entry!r}')
    return p


def hospital_epsilons(spec: PrivacySpec) -> dict[str, float]:
    """``privacy.hospital-epsilon`` as ``{name or index: epsilon}``."""
    out = {}
    for entry in spec.hospital_epsilon:
        name, _, value = entry.partition("=")
        out[name.strip()] = float(value)
    return out


def evaluation_due(spec: FederationSpec, server_round: int) -> bool:
    """Whether round ``server_round`` is evaluated (round 0 is the initial adapter, always scored)."""
    return server_round in (0, spec.num_rounds) or server_round % spec.evaluate_every == 0


def round_learning_rate(config: RunConfig, server_round: int) -> float:
    """The local learning rate of round ``server_round`` (1-based) under ``federation.lr-decay``.

    The full rate (``privacy.learning-rate`` under DP-SGD when set, else
    ``train.learning-rate``) in round 1, falling to ``lr-min-ratio`` times it
    in round ``num-rounds``; later rounds (a run extended on resume) keep the floor.
    """
    base = config.train.learning_rate
    if config.privacy.mode == "dp-sgd" and config.privacy.learning_rate > 0:
        base = config.privacy.learning_rate
    fe = config.federation
    if fe.lr_decay == "none" or fe.num_rounds <= 1:
        return base
    progress = min(max((server_round - 1) / (fe.num_rounds - 1), 0.0), 1.0)
    shape = 1 - progress if fe.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return base * (fe.lr_min_ratio + (1 - fe.lr_min_ratio) * shape)


def hospital_rank(config: RunConfig, hospital: int) -> int:
    """The LoRA rank hospital ``hospital`` trains: ``federation.client-ranks`` cycled, else ``lora.r``."""
    ranks = config.federation.client_ranks
    return ranks[hospital % len(ranks)] if ranks else config.lora.r


def describe() -> str:
    """A reference of every section and key with its default and help text (for docs and `--help`)."""
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]  {cls.__doc__.splitlines()[0] if cls.__doc__ else ''}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            lines.append(f"  {_kebab(f.name)} = {_toml_value(default)}    # {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def available_cores() -> int:
    """CPU cores this process may use."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_parallelism(spec: FederationSpec) -> tuple[int, int]:
    """Simulation workers and torch threads per worker for this machine.

    One worker per two cores (at least one): on small CPUs a worker with two
    threads trains faster than two single-threaded workers that each hold a
    model copy.
    """
    cores = available_cores()
    workers = spec.num_workers or max(1, cores // 2)
    threads = spec.threads_per_worker or max(1, cores // workers)
    return workers, threads
