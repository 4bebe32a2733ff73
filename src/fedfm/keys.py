"""Names of the records, config entries and metrics exchanged with Flower.

Kebab-case, as Flower's own keys (``num-examples``, ``server-round``).
"""

from __future__ import annotations

# Records inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord entries sent by the server.
SERVER_ROUND = "server-round"
RUN_CONFIG = "fedfm-config"

# MetricRecord entries sent by a hospital.
NUM_EXAMPLES = "num-examples"
HOSPITAL_INDEX = "hospital-index"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"

# node_config entries a SuperNode (or the simulation engine) provides.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
