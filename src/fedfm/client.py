"""The Flower ClientApp of a hospital: unpack the global adapter, train or evaluate, pack the reply.

Only the adapter tensors and scalar metrics leave the hospital. The run
configuration arrives in the message's ConfigRecord, so the same ClientApp
serves the simulation engine and real SuperNodes.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm import keys
from fedfm.adapters import get_adapter_state, set_adapter_state
from fedfm.config import RunConfig, from_json, resolve_parallelism
from fedfm.errors import ConfigError
from fedfm.train import autocast, train_local
from fedfm.wire import record_to_state, state_to_record
from fedfm.workspace import Workspace, workspace_for

logger = logging.getLogger("fedfm")

app = ClientApp()

_threads_set = False


def _unpack(msg: Message, context: Context) -> tuple[RunConfig, int, Workspace]:
    global _threads_set
    config = from_json(str(msg.content[keys.CONFIG][keys.RUN_CONFIG]))
    if not _threads_set:
        torch.set_num_threads(resolve_parallelism(config.federation)[1])
        _threads_set = True
    if keys.PARTITION_ID not in context.node_config:
        raise ConfigError(
            f"this SuperNode has no `{keys.PARTITION_ID}` in its node config; "
            f"start it with --node-config \"{keys.PARTITION_ID}=<hospital index>\""
        )
    index = int(context.node_config[keys.PARTITION_ID])
    workspace = workspace_for(config)
    set_adapter_state(workspace.loaded.model, record_to_state(msg.content[keys.ARRAYS]))  # type: ignore[arg-type]
    return config, index, workspace


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on this hospital's rows and send the new adapter back."""
    config, index, workspace = _unpack(msg, context)
    rows = workspace.hospital_rows("train", index)
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])  # type: ignore[arg-type]
    result = train_local(
        workspace.loaded.model,
        workspace.task,
        rows,
        workspace.loaded.tokenizer,
        spec=config.train,
        device=workspace.loaded.device,
        dtype=config.model.dtype,
        seed=config.train.seed * 1_000_003 + server_round * 1009 + index,
    )
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: len(rows),
            keys.HOSPITAL_INDEX: index,
            keys.TRAIN_LOSS: result.loss,
            keys.TRAIN_SECONDS: result.seconds,
            "train-steps": result.steps,
        }
    )
    arrays: ArrayRecord = state_to_record(get_adapter_state(workspace.loaded.model))
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter on this hospital's local test rows."""
    config, index, workspace = _unpack(msg, context)
    rows = workspace.hospital_rows("test", index)
    with autocast(workspace.loaded.device, config.model.dtype):
        scores = workspace.task.evaluate(
            workspace.loaded.model,
            rows,
            workspace.loaded.tokenizer,
            batch_size=config.train.eval_batch_size,
            device=workspace.loaded.device,
        )
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(rows), keys.HOSPITAL_INDEX: index, **scores})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)
