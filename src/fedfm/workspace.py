"""Per-process state shared by every hospital a worker simulates, and by the server.

The data of the federation, the LoRA-wrapped model and each hospital's
tokenized rows are built once per process and reused across rounds and
hospitals; only adapter tensors change between calls.

A SuperNode whose node config names its own data file (``data-path``, see
:mod:`fedfm.data.local`) gets a workspace over that file alone: its hospital
is the only one it knows, whatever index the server gives it.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from datasets import Dataset

from fedfm.adapters import LoadedModel, clear_cache, load_model
from fedfm.config import DataSpec, RunConfig
from fedfm.data import (
    CLASSIFICATION,
    Federation,
    NodeData,
    build_federation,
    deployment_federation,
    load_source,
    node_federation,
)
from fedfm.errors import ConfigError
from fedfm.privacy.linear_probe import clear_features
from fedfm.tasks import Task, get_task

# One progress bar per hospital and split would bury the round lines.
datasets.disable_progress_bars()

_LOCK = threading.RLock()
_FEDERATIONS: dict[tuple[DataSpec, str], Federation] = {}
_NODE_FEDERATIONS: dict[tuple[DataSpec, NodeData, str], Federation] = {}
_WORKSPACES: dict[tuple[Any, ...], Workspace] = {}


def federation_for(data: DataSpec, *, kind: str = CLASSIFICATION) -> Federation:
    """The hospitals of a data spec (deterministic, cached per process).

    With ``data.hospitals`` (a deployment) the hospitals are those names
    without rows, and the global test set is the ``data.path`` file or empty.
    ``kind`` is the rows the task reads (:attr:`fedfm.tasks.Task.data_kind`):
    a file of one's own (``data.dataset = csv | jsonl | parquet``) is read as that kind.
    """
    with _LOCK:
        key = (data, kind)
        if key not in _FEDERATIONS and data.hospitals:
            _FEDERATIONS[key] = deployment_federation(
                data.hospitals,
                label_names=data.label_names,
                test_path=data.path or None,
                text_column=data.text_column,
                label_column=data.label_column,
                seed=data.seed,
                max_test=data.max_test or None,
                context=data.context,
                kind=kind,
            )
        if key not in _FEDERATIONS:
            source = load_source(
                data.dataset,
                data_dir=data.data_dir or None,
                path=data.path or None,
                text_column=data.text_column,
                label_column=data.label_column,
                label_names=data.label_names or None,
                kind=kind,
            )
            if data.label_names and list(data.label_names) != source.label_names:
                raise ConfigError(
                    f"`data.label-names` {list(data.label_names)} differ from the classes of {data.dataset!r}, "
                    f"{source.label_names}; leave it empty for a built-in dataset, or list these"
                )
            _FEDERATIONS[key] = build_federation(
                source,
                partitioner=data.partitioner,
                num_hospitals=data.num_hospitals,
                alpha=data.alpha,
                column=data.partition_column or None,
                test_fraction=data.test_fraction,
                seed=data.seed,
                max_train_per_hospital=data.max_train_per_hospital or None,
                max_test=data.max_test or None,
                context=data.context,
                validation_fraction=data.validation_fraction,
                augment=data.augment,
            )
        return _FEDERATIONS[key]


@dataclass
class Workspace:
    """The model, task and data one process works with.

    ``node`` is set on a SuperNode that reads its own file: ``federation`` then
    holds that one hospital, and every hospital index means it.
    """

    config: RunConfig
    task: Task
    loaded: LoadedModel
    federation: Federation
    num_labels: int
    node: NodeData | None = None
    _tokenized: dict[tuple[str, int], Dataset] = field(default_factory=dict)

    @property
    def hospital_names(self) -> list[str]:
        return [h.name for h in self.federation.hospitals]

    def hospital_name(self, index: int) -> str:
        """The name of hospital ``index`` (on a SuperNode with its own file: that hospital's name)."""
        return self.node.name if self.node is not None else self.hospital_names[index]

    def hospital_rows(self, split: str, index: int) -> Dataset:
        """Tokenized rows of hospital ``index`` (``split`` is ``train``, ``test`` or ``validation``), or of the global
        test set (index -1). A hospital without a validation split has no ``validation`` rows.

        On a SuperNode with its own file, the rows of that file whatever the index.
        """
        if self.node is not None:
            index = 0  # the federation holds this SuperNode's hospital only
        key = (split, index)
        with _LOCK:
            if key not in self._tokenized:
                if index == -1:
                    raw = self.federation.global_test
                else:
                    if not 0 <= index < len(self.federation.hospitals):
                        raise ConfigError(
                            f"hospital index {index} is out of range: the federation has "
                            f"{len(self.federation.hospitals)} hospitals {self.hospital_names}"
                        )
                    hospital = self.federation.hospitals[index]
                    if split == "validation":
                        raw = hospital.validation if hospital.validation is not None else hospital.test.select([])
                    else:
                        raw = hospital.train if split == "train" else hospital.test
                self._tokenized[key] = self.task.tokenize(
                    raw, self.loaded.tokenizer, max_length=self.config.model.max_length
                )
            return self._tokenized[key]


def node_federation_for(data: DataSpec, node: NodeData, *, kind: str = CLASSIFICATION) -> Federation:
    """A SuperNode's own hospital, split as the data spec says (cached per process).

    Only the spec's column names, label names, test fraction, seed, caps and context are used;
    its dataset, path and partitioner describe the coordinator's data, not this hospital's.
    """
    key = (data, node, kind)
    with _LOCK:
        if key not in _NODE_FEDERATIONS:
            _NODE_FEDERATIONS[key] = node_federation(
                node,
                text_column=data.text_column,
                label_column=data.label_column,
                label_names=data.label_names or None,
                test_fraction=data.test_fraction,
                seed=data.seed,
                max_train_per_hospital=data.max_train_per_hospital or None,
                max_test=data.max_test or None,
                validation_fraction=data.validation_fraction,
                context=data.context,
                kind=kind,
            )
        return _NODE_FEDERATIONS[key]


def workspace_for(config: RunConfig, node: NodeData | None = None, *, side: str = "server") -> Workspace:
    """This process's workspace for a configuration, built on first use.

    Parameters
    ----------
    config : RunConfig
        The run configuration.
    node : NodeData or None
        A SuperNode's own data file (:func:`fedfm.data.node_data`); ``None`` builds
        the federation of the run configuration (simulation, and the server).
    side : str
        ``"server"`` or ``"hospital"``: each side has its own model, so hospitals
        run in the server's process (the in-process simulation backend) never
        touch the model the server evaluates and exports. A process that holds
        one side only (a Ray worker, a SuperNode) loads one model.

    Returns
    -------
    Workspace
        The cached workspace.
    """
    key = (config.model, config.lora, config.data, config.train.seed, node, side)
    with _LOCK:
        if key not in _WORKSPACES:
            task = get_task(config.model.task)
            federation = (federation_for(config.data, kind=task.data_kind) if node is None
                          else node_federation_for(config.data, node, kind=task.data_kind))
            source = federation.source
            num_labels = len(source.label_names) if source.kind in ("classification", "token-classification", "image") else 0
            loaded = load_model(config.model, config.lora, task, num_labels=num_labels, seed=config.train.seed,
                                side=side)
            _WORKSPACES[key] = Workspace(config, task, loaded, federation, num_labels, node)
        return _WORKSPACES[key]


def clear() -> None:
    """Forget every cached federation and workspace of this process."""
    with _LOCK:
        _FEDERATIONS.clear()
        _NODE_FEDERATIONS.clear()
        _WORKSPACES.clear()


def release() -> None:
    """Forget everything this process cached for its runs: federations, workspaces, models, probe features.

    A long-lived hospital process (:mod:`fedfm.hospital_process`) calls it when a
    new run begins, so it never holds two runs' models at once.
    """
    clear()
    clear_cache()
    clear_features()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
