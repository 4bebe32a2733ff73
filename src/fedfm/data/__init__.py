"""Biomedical datasets as ``datasets.Dataset`` objects, split into simulated hospitals.

Load a source with :func:`load_source`, then :func:`build_federation` partitions
its rows into hospitals (IID, Dirichlet label skew, or a natural site column)
with a local train/test split each. On a SuperNode, :func:`node_data` reads the
hospital's own file from the node config and :func:`node_federation` splits it;
:func:`deployment_federation` is the coordinator's view of such hospitals (names, no rows).
"""

from __future__ import annotations

from fedfm.data._cache import clear_caches
from fedfm.data.base import CLASSIFICATION, MULTIPLE_CHOICE, TOKEN_CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.federation import (
    Federation,
    HospitalData,
    build_federation,
    check_federation,
    split_hospital,
    split_rows,
)
from fedfm.data.files import check_texts, check_utf8, normalize_label
from fedfm.data.local import NodeData, deployment_federation, node_data, node_federation
from fedfm.data.partitioners import (
    Partition,
    PartitionFn,
    dirichlet_partition,
    get_partitioner,
    iid_partition,
    known_partitioners,
    natural_partition,
    partition,
    register_partitioner,
)
from fedfm.data.paths import DATA_DIR_ENV, resolve_data_dir
from fedfm.data.sources import SourceLoader, known_sources, load_source, register_source
from fedfm.data.text import heart_row_to_text

__all__ = [
    "CLASSIFICATION",
    "DATA_DIR_ENV",
    "MULTIPLE_CHOICE",
    "TOKEN_CLASSIFICATION",
    "Federation",
    "HospitalData",
    "NodeData",
    "Partition",
    "PartitionFn",
    "SourceData",
    "SourceLoader",
    "SourceRequest",
    "build_federation",
    "check_federation",
    "check_texts",
    "check_utf8",
    "clear_caches",
    "deployment_federation",
    "dirichlet_partition",
    "get_partitioner",
    "heart_row_to_text",
    "iid_partition",
    "known_partitioners",
    "known_sources",
    "load_source",
    "natural_partition",
    "node_data",
    "node_federation",
    "normalize_label",
    "partition",
    "register_partitioner",
    "register_source",
    "resolve_data_dir",
    "split_hospital",
    "split_rows",
]
