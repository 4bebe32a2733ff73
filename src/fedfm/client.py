"""The Flower ClientApp of a hospital: unpack the global adapter, train or evaluate, pack the reply.

Only the adapter tensors and scalar metrics leave the hospital. The run
configuration arrives in the message's ConfigRecord, so the same ClientApp
serves the simulation engine and real SuperNodes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from datasets import Dataset
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm import keys, legacy, strategies
from fedfm.adapters import get_adapter_state, load_global_adapter
from fedfm.attacks import corrupt, fails
from fedfm.compression import encode
from fedfm.config import RunConfig, head_only_round, resolve_parallelism
from fedfm.data import node_data
from fedfm.data.local import DATA_PATH, HOSPITAL
from fedfm.errors import ConfigError, FedfmError
from fedfm.hospital_state import HospitalSession, state_folder
from fedfm.instruction import Instruction, hospital_index, parse_instruction
from fedfm.privacy.audit import loss_threshold_auc
from fedfm.privacy.hospital import centring_of, dp_train_spec, hospital_ledger, recipe_of
from fedfm.privacy.linear_probe import ProbeRound
from fedfm.privacy.linear_probe import train_round as probe_round
from fedfm.strategies.client_dp import clipping_mod
from fedfm.train import TrainResult, autocast, train_local
from fedfm.wire import numpy_to_record, record_to_numpy
from fedfm.workspace import Workspace, workspace_for

logger = logging.getLogger("fedfm")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


_TRIM = _malloc_trim()


def memory_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Hand the heap memory a message's handling freed back to the operating system.

    glibc keeps freed blocks for reuse; a worker that trains hospital after
    hospital kept a share of each one's peak (100 simulated hospitals of 2
    steps each: 1,431 MiB resident vs 885 MiB for 2 hospitals doing the same
    200 steps; 682 vs 665 MiB with a trim after each hospital). A trim costs
    about 2 ms.
    """
    try:
        return call_next(msg, context)
    finally:
        if _TRIM is not None:
            _TRIM(0)


# Flower's SecAgg+ mod and client-side clipping mods run only when the server's workflow or
# client-level DP wrapper asks for them.
app = ClientApp(mods=[memory_mod, legacy.secure_aggregation_mod, clipping_mod])

_threads_set = False


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


def _read(content: RecordDict, context: Context) -> tuple[Instruction, dict[str, np.ndarray] | None]:
    """fedfm's own instruction message: what it asks, and the global arrays by name (None if it holds none)."""
    instruction = parse_instruction(content.config_records[keys.CONFIG], context.node_config)
    arrays = content.array_records.get(keys.ARRAYS)
    return instruction, record_to_numpy(arrays) if arrays is not None else None


class _Unpacked(NamedTuple):
    workspace: Workspace
    session: HospitalSession
    #: The global arrays the server sent.
    received: dict[str, np.ndarray]
    #: The adapter state the round starts from (the global with this hospital's kept parts).
    start: dict[str, np.ndarray]


def use_threads(count: int) -> None:
    """Train with ``count`` torch threads whatever the run's federation settings derive (``fedfm hospital --threads``)."""
    global _threads_set
    torch.set_num_threads(count)
    _threads_set = True


def _unpack(
    instruction: Instruction, received: dict[str, np.ndarray] | None, context: Context, *, training: bool = False
) -> _Unpacked:
    """This hospital's workspace and state, with the global adapter (and its own kept parts) in its model."""
    global _threads_set
    config, index = instruction.config, instruction.hospital
    if not _threads_set:
        torch.set_num_threads(resolve_parallelism(config.federation)[1])
        _threads_set = True
    workspace = _workspace(config, context)  # first: a SuperNode that is no hospital of the run is told so
    if received is None:
        raise FedfmError(f"the instruction holds no `{keys.ARRAYS}` record: nothing to train or evaluate")
    folder = state_folder(config, context.node_config, workspace.hospital_name(index))
    session = HospitalSession.load(context, folder, server_round=instruction.server_round, training=training)
    tensors, _ = load_global_adapter(workspace.loaded, instruction.plan, received, kept=session.kept or None)
    return _Unpacked(workspace, session, received, _numpy(tensors))


def _workspace(config: RunConfig, context: Context) -> Workspace:
    """The hospital's workspace: over its own file when the node config has ``data-path``, else the run's federation.

    With ``data.hospitals`` (a deployment) a hospital must have its own file, and
    it is known by its name in that list.
    """
    node = node_data(context.node_config)
    hospitals = config.data.hospitals
    if node is None and hospitals:
        raise ConfigError(
            f"this hospital has no `{DATA_PATH}` in its node config, but the run lists `data.hospitals` (a "
            f"deployment: the server holds no hospital rows); start its SuperNode with --node-config "
            f"\"{HOSPITAL}=<its name in {list(hospitals)}> {DATA_PATH}=<its data file>\""
        )
    if node is not None and hospitals and HOSPITAL not in context.node_config:
        node = dataclasses.replace(node, name=hospitals[hospital_index(config, context.node_config)])
    return workspace_for(config, node, side="hospital")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on this hospital's rows and send the new adapter back."""
    if legacy.is_legacy(msg.content, "fitins"):  # the SecAgg+ workflow speaks Flower's legacy format
        instruction, received = legacy.from_legacy(msg.content, "fitins", context.node_config,
                                                   lambda config: _shared_names(config, context))
        return Message(legacy.to_fitres(_train(instruction, received, context)), reply_to=msg)
    return Message(_train(*_read(msg.content, context), context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter on this hospital's local test rows (with its own kept tensors, if any)."""
    if legacy.is_legacy(msg.content, "evaluateins"):
        instruction, received = legacy.from_legacy(msg.content, "evaluateins", context.node_config,
                                                   lambda config: _shared_names(config, context))
        return Message(legacy.to_evaluateres(_evaluate(instruction, received, context)), reply_to=msg)
    return Message(_evaluate(*_read(msg.content, context), context), reply_to=msg)


def _shared_names(config: RunConfig, context: Context) -> list[str]:
    """Names of the tensors exchanged under secure aggregation, in the order the server lists them."""
    return list(strategies.client_plan(config, -1).shared(_numpy(_workspace(config, context).loaded.initial_state)))


def _train(instruction: Instruction, received: dict[str, np.ndarray] | None, context: Context) -> RecordDict:
    workspace, session, _, start = _unpack(instruction, received, context, training=True)
    config, index, plan, server_round = instruction.config, instruction.hospital, instruction.plan, instruction.server_round
    rows = workspace.hospital_rows("train", index)
    if fails(rate=config.attack.failure_rate, seed=config.train.seed, server_round=server_round, hospital=index,
             attempt=instruction.attempt):
        raise RuntimeError(f"simulated failure of hospital {index} in round {server_round} (attack.failure-rate)")
    ledger = None
    if config.privacy.mode == "dp-sgd":
        name = workspace.hospital_name(index)
        _require_persistent_ledger(session, context, name)
        ledger = hospital_ledger(config, session.ledger, index=index, name=name, num_rows=len(rows),
                                 node_config=context.node_config)
        if not ledger.allows(ledger.steps_per_round):
            # The hospital, not the server, enforces its budget: it sends no update at all.
            session.ledger = ledger.after_refusal(server_round)
            session.save(context)
            logger.warning(
                "%s refuses round %d: another round would take ε from %.3f past its budget %g",
                name, server_round, session.ledger.epsilon(), session.ledger.target_epsilon,
            )
            refusal = MetricRecord({keys.NUM_EXAMPLES: len(rows), keys.HOSPITAL_INDEX: index,
                                    **session.ledger.metrics(refused=True)})
            return RecordDict({keys.METRICS: refusal})
    result: TrainResult | ProbeRound
    if ledger is not None and recipe_of(config) == "linear-probe":
        loaded, privacy = workspace.loaded, config.privacy
        result = probe_round(
            loaded.model, workspace.task, rows, loaded.tokenizer, dp=ledger.round_plan(privacy.max_grad_norm),
            learning_rate=privacy.probe_learning_rate, centring=centring_of(config),
            max_length=config.model.max_length, device=loaded.device, batch_size=config.train.eval_batch_size,
            folder=session.folder,
        )
    else:
        result = train_local(
            workspace.loaded.model,
            workspace.task,
            rows,
            workspace.loaded.tokenizer,
            spec=dataclasses.replace(dp_train_spec(config) if ledger is not None else config.train,
                                     learning_rate=instruction.learning_rate),
            device=workspace.loaded.device,
            dtype=config.model.dtype,
            seed=config.train.seed * 1_000_003 + server_round * 1009 + index,
            plan=plan.head_only() if head_only_round(config, server_round) else plan,
            dp=ledger.round_plan(config.privacy.max_grad_norm) if ledger is not None else None,
        )
    reported: dict[str, float | int] = {
        keys.NUM_EXAMPLES: len(rows),
        keys.HOSPITAL_INDEX: index,
        "train-steps": result.steps,
        keys.TRAIN_LEARNING_RATE: result.learning_rate,
    }
    if ledger is None:
        assert isinstance(result, TrainResult)
        reported.update({keys.TRAIN_LOSS: result.loss, keys.TRAIN_SECONDS: result.seconds,
                         keys.TRAIN_EXAMPLES: result.examples})
    else:
        # Under DP-SGD only what the ledger covers leaves: the loss over the sampled rows, how many rows
        # the Poisson batches drew and how long they took are statistics of the rows, with no noise on them.
        session.ledger = ledger.after_training(server_round, result.steps)
        reported.update(session.ledger.metrics())
    trained = _numpy(get_adapter_state(workspace.loaded.model))
    kept = plan.kept(trained)
    if kept:
        session.kept = kept  # carried to its next round by this hospital alone; never sent
    shared = plan.shared(trained)
    if index in config.attack.hospitals:
        attack = config.attack
        shared = corrupt(shared, plan.shared(start), kind=attack.kind_of(index), scale=attack.scale, seed=server_round * 7919 + index)
    if config.compression.method != "none":
        shared = _compress(shared, plan.shared(start), config, session)
    session.save(context, server_round=server_round)
    return RecordDict({keys.ARRAYS: numpy_to_record(shared), keys.METRICS: MetricRecord(dict(reported))})


def _require_persistent_ledger(session: HospitalSession, context: Context, name: str) -> None:
    """Refuse DP-SGD in a hospital whose ledger would not survive its process, unless its operator accepts that.

    A SuperNode without ``state-dir`` keeps the ledger in memory only: a restart would start ε again at 0.
    """
    if session.folder is not None or _truthy(context.node_config.get(keys.LEDGER_IN_MEMORY)):
        return
    raise ConfigError(
        f"hospital {name!r} has nowhere to keep its privacy ledger across restarts (DP-SGD): start its SuperNode "
        f"with --node-config \"{keys.STATE_DIR}=<a folder of its own>\", or with {keys.LEDGER_IN_MEMORY}=true "
        "to accept that a restarted SuperNode reports ε from 0 again"
    )


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, (int, float)) and value == 1) or str(value).lower() in {"true", "yes", "1"}


def _compress(
    shared: dict[str, np.ndarray], start: dict[str, np.ndarray], config: RunConfig, session: HospitalSession
) -> dict[str, np.ndarray]:
    """Encode the reply; top-k keeps what it did not send in the hospital's session (never sent)."""
    encoded, left = encode(
        shared, start, config.compression.method, fraction=config.compression.topk_fraction,
        residual=session.residual or None,
    )
    if left:
        session.residual = left
    return encoded


def _evaluate(instruction: Instruction, received: dict[str, np.ndarray] | None, context: Context) -> RecordDict:
    workspace, session, sent, _ = _unpack(instruction, received, context)
    config, index, plan = instruction.config, instruction.hospital, instruction.plan
    rows = workspace.hospital_rows("test", index)
    scores: dict[str, float | int]
    if instruction.audit:
        scores = dict(_audit(config, workspace, index))
    elif instruction.personalize_epochs > 0:
        scores = _personalize(instruction, workspace)
    else:
        scores = {}
        if plan.private and session.kept:
            # The model holds this hospital's own kept parts: that is its personalized model. The plain
            # metrics below are the global adapter's alone, as every other strategy reports them.
            scores.update(_prefixed(keys.PERSONALIZED_PREFIX, _score(config, workspace, rows)))
            load_global_adapter(workspace.loaded, plan, sent)  # the global adapter without the kept parts
        scores.update(_score(config, workspace, rows))
        validation = workspace.hospital_rows("validation", index)
        if len(validation):
            # Scored here, with the test rows, so validation adds no message and no pass over the training rows.
            scores.update(_prefixed(keys.VALIDATION_PREFIX, _score(config, workspace, validation)))
            scores[keys.VALIDATION_EXAMPLES] = len(validation)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(rows), keys.HOSPITAL_INDEX: index, **scores})
    return RecordDict({keys.METRICS: metrics})


def _score(config: RunConfig, workspace: Workspace, rows: Dataset) -> dict[str, float]:
    """The task's metrics of the model as it is now on ``rows``."""
    loaded = workspace.loaded
    with autocast(loaded.device, config.model.dtype):
        return workspace.task.evaluate(
            loaded.model, rows, loaded.tokenizer, batch_size=config.train.eval_batch_size, device=loaded.device,
        )


def _prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in scores.items()}


def _personalize(instruction: Instruction, workspace: Workspace) -> dict[str, float | int]:
    """Fine-tune the received adapter (with this hospital's kept parts) on its own training rows, then score it.

    Only the local-test scores leave (``personalized-*``); the fine-tuned tensors and the
    hospital's kept state stay as they are, and the next instruction loads its adapter afresh.
    """
    config, index, epochs = instruction.config, instruction.hospital, instruction.personalize_epochs
    loaded = workspace.loaded
    train_rows = workspace.hospital_rows("train", index)
    result = train_local(
        loaded.model,
        workspace.task,
        train_rows,
        loaded.tokenizer,
        spec=dataclasses.replace(config.train, local_epochs=epochs, local_steps=0),
        device=loaded.device,
        dtype=config.model.dtype,
        seed=config.train.seed * 1_000_003 + (instruction.server_round + 1) * 1009 + index,
        # A local fine-tune after the run: nothing to stay near, so no proximal term.
        plan=dataclasses.replace(instruction.plan, proximal_mu=0.0),
    )
    scores: dict[str, float | int] = dict(
        _prefixed(keys.PERSONALIZED_PREFIX, _score(config, workspace, workspace.hospital_rows("test", index)))
    )
    scores.update({f"{keys.PERSONALIZED_PREFIX}train-loss": result.loss, f"{keys.PERSONALIZED_PREFIX}epochs": epochs})
    return scores


def _audit(config: RunConfig, workspace: Workspace, index: int) -> dict[str, float]:
    """The membership-inference AUC on this hospital's own rows; only the scalars leave."""
    loaded = workspace.loaded
    losses = []
    for split in ("train", "test"):
        with autocast(loaded.device, config.model.dtype):
            losses.append(workspace.task.example_losses(
                loaded.model, workspace.hospital_rows(split, index), loaded.tokenizer,
                batch_size=config.train.eval_batch_size, device=loaded.device,
            ))
    return {
        keys.AUDIT_AUC: loss_threshold_auc(losses[0], losses[1]),
        keys.AUDIT_MEMBERS: len(losses[0]),
        keys.AUDIT_NONMEMBERS: len(losses[1]),
    }
