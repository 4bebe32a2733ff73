"""Names of the records, config entries and metrics exchanged with Flower.

Kebab-case, as Flower's own keys (``num-examples``, ``server-round``).
"""

from __future__ import annotations

# Records inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# A hospital's persistent context state: tensors it keeps across rounds (FedSA-LoRA's B).
KEPT_ARRAYS = "fedfm-kept-arrays"
#: context.state key of what top-k compression has not sent yet (error feedback); never sent.
COMPRESSION_RESIDUAL = "fedfm-compression-residual"

# A hospital's persistent context state: its DP-SGD ledger (a ConfigRecord holding JSON).
PRIVACY_LEDGER = "fedfm-privacy-ledger"
#: context.state key of the round the kept arrays and the residual are from (a ConfigRecord, ``round``).
STATE_ROUND = "fedfm-state-round"

# ConfigRecord entries sent by the server.
SERVER_ROUND = "server-round"
RUN_CONFIG = "fedfm-config"
CLIENT_PLANS = "fedfm-client-plans"
AUDIT = "fedfm-audit"
#: Train-config entry: this round's local learning rate (federation.lr-decay), chosen by the server.
LEARNING_RATE = "fedfm-learning-rate"
#: Evaluate-config entry after the last round: fine-tune the global adapter locally for this many epochs.
PERSONALIZE_EPOCHS = "fedfm-personalize-epochs"

# MetricRecord entries sent by a hospital.
NUM_EXAMPLES = "num-examples"
HOSPITAL_INDEX = "hospital-index"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_LEARNING_RATE = "train-learning-rate"  # the round's local learning rate the hospital used
TRAIN_EXAMPLES = "train-examples"  # rows seen in the round (Poisson batches under DP-SGD vary)
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"

# Evaluate-reply prefixes: the task's metrics (loss, accuracy, macro-f1, ...) on other rows or another model.
#: The global adapter on the hospital's validation split (``val-loss``, ...), with its row count.
VALIDATION_PREFIX = "val-"
VALIDATION_EXAMPLES = "val-examples"
#: The hospital's personalized model (its kept parts, or a local fine-tune) on its local test split.
PERSONALIZED_PREFIX = "personalized-"

# MetricRecord entries of a hospital training with DP-SGD: its ledger after the round.
DP_EPSILON = "dp-epsilon"
DP_DELTA = "dp-delta"
DP_TARGET_EPSILON = "dp-target-epsilon"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
DP_REFUSED = "dp-refused"

# MetricRecord entries of a hospital's membership-inference audit.
AUDIT_AUC = "audit-auc"
AUDIT_MEMBERS = "audit-members"
AUDIT_NONMEMBERS = "audit-nonmembers"

# node_config entries a SuperNode (or the simulation engine) provides.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: The folder a SuperNode's hospital keeps its state in (ledger, kept arrays), beyond its process.
STATE_DIR = "state-dir"
#: A SuperNode's own cap on its hospital's ε.
EPSILON_CAP = "privacy-epsilon"
#: A SuperNode's own cap on its hospital's δ.
DELTA_CAP = "privacy-delta"
#: A SuperNode's operator accepts a DP-SGD ledger kept in memory only (a restart starts it again at ε = 0).
LEDGER_IN_MEMORY = "privacy-ledger-in-memory"

# Train-config entry: which attempt at its round an instruction is (0 first; retries count up).
ATTEMPT = "fedfm-attempt"
