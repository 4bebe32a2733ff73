"""Splitting one dataset into hospitals, on top of flwr-datasets' partitioners.

The flwr-datasets partitioners only ever see a two-column copy (row number and
the column they split by), so text columns are never copied and the returned
partitions are index views of the caller's dataset.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from numbers import Real
from typing import Any, NamedTuple, Protocol

import numpy as np
import tqdm
from datasets import Dataset

from fedfm.data.base import is_count
from fedfm.errors import ConfigError, DataError

_ROW = "__fedfm_row__"
_KEY = "__fedfm_key__"


class Partition(NamedTuple):
    """One hospital's share of a dataset.

    Attributes
    ----------
    name : str
        ``"hospital-<i>"``, or the natural id (e.g. ``"Cleveland"``).
    rows : datasets.Dataset
        The hospital's rows.
    """

    name: str
    rows: Dataset


class PartitionFn(Protocol):
    """The signature every registered partitioner has."""

    def __call__(
        self,
        dataset: Dataset,
        *,
        num_partitions: int,
        seed: int,
        alpha: float,
        column: str | None,
        label_column: str = "label",
    ) -> list[Partition]:
        """Split ``dataset`` so that every row lands in exactly one partition."""


_PARTITIONERS: dict[str, PartitionFn] = {}


def register_partitioner(name: str, fn: PartitionFn, *, force: bool = False) -> None:
    """Make ``fn`` available to :func:`partition` under ``name``; a name taken by another function needs ``force``.

    Parameters
    ----------
    name : str
        E.g. ``"iid"``.
    fn : PartitionFn
        ``fn(dataset, *, num_partitions, seed, alpha, column, label_column)``
        returning a list of :class:`Partition` that covers every row once.
    force : bool
        Replace a partitioner already registered under ``name``.
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"a partitioner name must be a non-empty string, got {name!r}")
    if not force and _PARTITIONERS.get(name, fn) is not fn:
        raise ConfigError(f"partitioner {name!r} is registered already; pass force=True to replace it")
    _PARTITIONERS[name] = fn


def known_partitioners() -> list[str]:
    """Return the sorted names of the registered partitioners.

    Returns
    -------
    list[str]
        The names.
    """
    return sorted(_PARTITIONERS)


def get_partitioner(name: str) -> PartitionFn:
    """Look up a registered partitioner.

    Parameters
    ----------
    name : str
        ``"iid"``, ``"dirichlet"``, ``"natural"`` or a registered name.

    Returns
    -------
    PartitionFn
        The partitioning function.
    """
    if name not in _PARTITIONERS:
        raise ConfigError(f"unknown partitioner {name!r}; known partitioners: {known_partitioners()}")
    return _PARTITIONERS[name]


def partition(
    dataset: Dataset,
    partitioner: str,
    *,
    num_partitions: int | None,
    seed: int = 0,
    alpha: float = 0.5,
    column: str | None = None,
    label_column: str = "label",
) -> list[Partition]:
    """Split ``dataset`` into named hospitals with a registered partitioner.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows to split.
    partitioner : str
        ``"iid"``, ``"dirichlet"`` (label skew), ``"quantity-skew"`` (sizes), ``"natural"`` (one hospital per
        value of ``column``) or a registered name.
    num_partitions : int or None
        Number of hospitals; ignored by ``"natural"`` (may be ``None`` there),
        which has one per value.
    seed : int
        Seed of every random choice; same arguments give the same partitions.
    alpha : float
        Dirichlet concentration; small values give strongly skewed labels.
    column : str or None
        The natural-id column for ``"natural"``.
    label_column : str
        The label column for ``"dirichlet"``.

    Returns
    -------
    list[Partition]
        ``(name, rows)`` pairs; every row of ``dataset`` is in exactly one.
    """
    fn = get_partitioner(partitioner)
    problems = []
    if not is_count(seed, 0):
        problems.append(f"`seed` must be a non-negative integer, got {seed!r}")
    if partitioner != "natural" and not is_count(num_partitions, 1):
        problems.append(f"`num_partitions` must be a positive integer, got {num_partitions!r}")
    if problems:
        raise ConfigError(problems)
    return fn(
        dataset,
        # "natural" derives the count itself, so any placeholder (None, 0) is fine there.
        num_partitions=int(num_partitions or 0),
        seed=int(seed),
        alpha=alpha,
        column=column,
        label_column=label_column,
    )


def _column_values(dataset: Dataset, column: str, role: str) -> list[Any]:
    if column not in dataset.column_names:
        raise DataError(f"{role} {column!r} is not a column; columns present: {dataset.column_names}")
    values = list(dataset[column])
    missing = sum(v is None for v in values)
    if missing:
        raise DataError(f"{role} {column!r} has {missing} empty value(s); every row needs one")
    return values


def _check_enough_rows(num_rows: int, num_partitions: int) -> None:
    # flwr-datasets fails here with a bare IndexError (IID) or ValueError (Dirichlet).
    if num_partitions > num_rows:
        raise DataError(
            f"cannot deal {num_rows} row(s) into {num_partitions} hospitals: use fewer hospitals or more rows"
        )


def _key_dataset(values: Sequence[Any]) -> Dataset:
    return Dataset.from_dict({_ROW: list(range(len(values))), _KEY: list(values)})


def _rows_of(partitioner: Any, partition_id: int) -> list[int]:
    return list(partitioner.load_partition(partition_id)[_ROW])


def iid_partition(
    dataset: Dataset,
    *,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    column: str | None = None,
    label_column: str = "label",
) -> list[Partition]:
    """Deal shuffled rows into ``num_partitions`` hospitals of (almost) equal size.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows.
    num_partitions : int
        Number of hospitals (at most the number of rows); sizes differ by at most one.
    seed : int
        Seed of the shuffle.
    alpha, column, label_column
        Unused; accepted so every partitioner has the same signature.

    Returns
    -------
    list[Partition]
        ``hospital-0`` .. ``hospital-<n-1>``.
    """
    _check_enough_rows(len(dataset), num_partitions)
    from flwr_datasets.partitioner import IidPartitioner  # lazily: flwr_datasets pulls in seaborn and scipy

    order = np.random.default_rng(seed).permutation(len(dataset))
    # IidPartitioner takes contiguous shards without shuffling; on files sorted by
    # site or label (the heart table is) that would not be IID at all.
    splitter = IidPartitioner(num_partitions=num_partitions)
    splitter.dataset = _key_dataset(order.tolist())
    parts = []
    for i in range(num_partitions):
        shard = splitter.load_partition(i)
        parts.append(Partition(f"hospital-{i}", dataset.select(list(shard[_KEY]))))
    return parts


def dirichlet_partition(
    dataset: Dataset,
    *,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    column: str | None = None,
    label_column: str = "label",
    min_partition_size: int = 2,
) -> list[Partition]:
    """Give each hospital a label mix drawn from Dirichlet(alpha).

    Uses flwr-datasets' ``DirichletPartitioner`` (Yurochkin et al., ICML 2019,
    https://arxiv.org/abs/1905.12022) without self-balancing. It redraws up to
    ten times when a hospital gets fewer than ``min_partition_size`` rows; when
    every draw fails (tiny data, very small alpha), the last draw is kept and the
    smallest hospitals are topped up with rows from the largest, with a warning.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows.
    num_partitions : int
        Number of hospitals (at most the number of rows).
    seed : int
        Seed of the draws.
    alpha : float
        Concentration (> 0); 0.1 is strongly skewed, 100 is close to IID.
    column : str or None
        Unused.
    label_column : str
        The column whose values are skewed.
    min_partition_size : int
        Smallest hospital wanted; capped at ``len(dataset) // num_partitions``.

    Returns
    -------
    list[Partition]
        ``hospital-0`` .. ``hospital-<n-1>``.
    """
    _check_alpha(alpha, "dirichlet")
    labels = _column_values(dataset, label_column, "label_column")
    _check_enough_rows(len(labels), num_partitions)
    floor = min(min_partition_size, len(labels) // num_partitions)
    try:
        assignment = _flwr_dirichlet(labels, num_partitions, float(alpha), seed, floor)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        assignment = _flwr_dirichlet(labels, num_partitions, float(alpha), seed, 0)
        moved = _top_up(assignment, floor, np.random.default_rng(seed))
        warnings.warn(
            f"Dirichlet sampling (alpha={alpha}) left a hospital with fewer than {floor} "
            f"row(s) in 11 draws; moved {moved} row(s) from the largest hospitals to fill it. "
            "Raise alpha or lower the number of hospitals for a pure Dirichlet draw.",
            UserWarning,
            stacklevel=2,
        )
    return [Partition(f"hospital-{i}", dataset.select(rows)) for i, rows in enumerate(assignment)]


def quantity_skew_partition(
    dataset: Dataset,
    *,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    column: str | None = None,
    label_column: str = "label",
    min_partition_size: int = 2,
) -> list[Partition]:
    """Large and small hospitals: sizes drawn from Dirichlet(alpha) over the hospitals, rows dealt at random.

    The quantity-based label-balanced skew of NIID-Bench (Li et al., ICDE 2022,
    https://arxiv.org/abs/2102.02079): each hospital's share of the rows is one draw of a
    Dirichlet(alpha) vector, so every hospital's label mix is the dataset's (up to
    sampling) while their sizes differ. Shuffled rows are cut into those sizes by
    flwr-datasets' ``SizePartitioner``. A hospital below ``min_partition_size`` rows is
    raised to it with rows from the largest.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows.
    num_partitions : int
        Number of hospitals (at most the number of rows).
    seed : int
        Seed of the draw and the shuffle.
    alpha : float
        Concentration (> 0); 0.5 gives hospitals tens of times apart in size, 100 almost equal ones.
    column, label_column
        Unused.
    min_partition_size : int
        Smallest hospital; capped at ``len(dataset) // num_partitions``.

    Returns
    -------
    list[Partition]
        ``hospital-0`` .. ``hospital-<n-1>``.
    """
    _check_alpha(alpha, "quantity-skew")
    _check_enough_rows(len(dataset), num_partitions)
    from flwr_datasets.partitioner import SizePartitioner

    rng = np.random.default_rng(seed)
    floor = min(min_partition_size, len(dataset) // num_partitions)
    shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
    sizes = np.maximum(np.floor(shares * len(dataset)).astype(int), floor)
    # Rounding and the floor leave the total off by a few rows: the largest hospitals give or take them.
    while (excess := int(sizes.sum()) - len(dataset)) != 0:
        largest = int(np.argmax(sizes))
        sizes[largest] -= min(excess, sizes[largest] - floor) if excess > 0 else excess
    order = rng.permutation(len(dataset))
    splitter = SizePartitioner([int(n) for n in sizes])
    splitter.dataset = _key_dataset(order.tolist())
    return [Partition(f"hospital-{i}", dataset.select(list(splitter.load_partition(i)[_KEY])))
            for i in range(num_partitions)]


def _check_alpha(alpha: Any, partitioner: str) -> None:
    """Refuse a concentration that is not a positive number (``True`` included)."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not float(alpha) > 0:
        raise ConfigError(f"`alpha` must be > 0 for the {partitioner} partitioner, got {alpha!r}")


def _flwr_dirichlet(labels: list[Any], num_partitions: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    from flwr_datasets.partitioner import DirichletPartitioner

    splitter = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=_KEY,
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    splitter.dataset = _key_dataset(labels)
    # flwr-datasets warns on every redraw; the fallback above says it once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        return [_rows_of(splitter, i) for i in range(num_partitions)]


def _top_up(assignment: list[list[int]], floor: int, rng: np.random.Generator) -> int:
    moved = 0
    while True:
        sizes = [len(rows) for rows in assignment]
        smallest = int(np.argmin(sizes))
        if sizes[smallest] >= floor:
            return moved
        donor = assignment[int(np.argmax(sizes))]
        assignment[smallest].append(donor.pop(int(rng.integers(len(donor)))))
        moved += 1


def keep_groups_together(dataset: Dataset, parts: list[Partition], *, column: str, seed: int) -> list[Partition]:
    """Move rows so that all rows sharing a value of ``column`` (an abstract) are in one partition.

    Partitioners deal single rows; a hospital holds whole documents. Each group
    goes to one of the partitions that got some of its rows, drawn with
    probability proportional to how many it got, so every partition keeps its
    expected size and leans towards the same labels as before. A partition left
    with fewer than two groups takes the groups it held the largest share of from
    partitions that own more than two (when there are enough groups).

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows that were partitioned.
    parts : list[Partition]
        The partitions of ``dataset`` (every row in exactly one).
    column : str
        The group column, e.g. ``"abstract_id"``.
    seed : int
        Seed of the draws.

    Returns
    -------
    list[Partition]
        Same names and order; every group in exactly one partition.
    """
    counts: dict[str, np.ndarray] = {}
    for k, part in enumerate(parts):
        for g in _column_values(part.rows, column, "group column"):
            counts.setdefault(str(g), np.zeros(len(parts), dtype=int))[k] += 1
    rng = np.random.default_rng(seed)
    owner = {g: int(rng.choice(len(parts), p=c / c.sum())) for g, c in sorted(counts.items())}
    # Two groups each where there are enough, so every hospital can keep one for its local test split.
    floor = min(2, len(counts) // len(parts))
    for k in range(len(parts)):
        while (owned := np.bincount(list(owner.values()), minlength=len(parts)))[k] < floor:
            movable = [g for g, o in owner.items() if owned[o] > floor]
            if not movable:
                break
            owner[max(movable, key=lambda g: (counts[g][k] / counts[g].sum(), g))] = k
    rows_of: list[list[int]] = [[] for _ in parts]
    for i, g in enumerate(_column_values(dataset, column, "group column")):
        rows_of[owner[str(g)]].append(i)
    return [Partition(part.name, dataset.select(rows)) for part, rows in zip(parts, rows_of, strict=True)]


def natural_partition(
    dataset: Dataset,
    *,
    num_partitions: int = 0,
    seed: int = 0,
    alpha: float = 0.5,
    column: str | None = None,
    label_column: str = "label",
) -> list[Partition]:
    """One hospital per distinct value of ``column``, in sorted order of the values.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows.
    num_partitions : int
        Ignored: the number of distinct values decides it.
    seed, alpha, label_column
        Unused.
    column : str
        The natural-id column, e.g. ``"hospital"`` or ``"subject"``.

    Returns
    -------
    list[Partition]
        Named by the values (as strings), e.g. ``"Cleveland"``.
    """
    if column is None:
        raise ConfigError("the natural partitioner needs `column` (e.g. column='hospital')")
    values = _column_values(dataset, column, "column")
    from flwr_datasets.partitioner import NaturalIdPartitioner, natural_id_partitioner

    # Its only progress bar counts the rows it groups ("Generating partition_id_to_indices"), in well
    # under a second; flwr-datasets offers no switch, so its module's tqdm is bound with disable=True.
    natural_id_partitioner.tqdm = functools.partial(tqdm.tqdm, disable=True)
    splitter = NaturalIdPartitioner(partition_by=_KEY)
    splitter.dataset = _key_dataset(values)
    names = splitter.partition_id_to_natural_id if splitter.num_partitions else {}
    return [Partition(str(names[i]), dataset.select(_rows_of(splitter, i))) for i in range(len(names))]


register_partitioner("iid", iid_partition)
register_partitioner("dirichlet", dirichlet_partition)
register_partitioner("quantity-skew", quantity_skew_partition)
register_partitioner("natural", natural_partition)
