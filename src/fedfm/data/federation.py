"""From one source to a federation: hospitals with local train/test splits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets

from fedfm.config import AUGMENTS, FILE_DATASETS, RunConfig
from fedfm.data._cache import LruCache
from fedfm.data.base import CLASSIFICATION, IMAGE, SourceData, is_count
from fedfm.data.files import ONE_CLASS
from fedfm.data.partitioners import keep_groups_together, known_partitioners, partition
from fedfm.data.piboso import (
    ABSTRACT_COLUMN,
    CONTEXT_MODES,
    add_context,
    group_split,
    has_abstracts,
    with_abstract_columns,
)
from fedfm.data.qa import with_conclusions
from fedfm.errors import ConfigError, DataError


@dataclass(frozen=True)
class HospitalData:
    """One hospital's records.

    Parameters
    ----------
    name : str
        ``"hospital-<i>"`` or the natural id, e.g. ``"Cleveland"``.
    train : datasets.Dataset
        Rows the hospital trains on.
    test : datasets.Dataset
        Rows the hospital evaluates on locally (may be empty for a one-row hospital).
    validation : datasets.Dataset or None
        Rows held out of ``train`` to score the global adapter on and pick the best
        round (``data.validation-fraction``); None without a validation split.
    """

    name: str
    train: Dataset
    test: Dataset
    validation: Dataset | None = None


@dataclass(frozen=True)
class Federation:
    """A source split into hospitals, plus the test set the global model is scored on.

    Parameters
    ----------
    source : SourceData
        What the hospitals were built from.
    hospitals : list[HospitalData]
        In partition order; a client picks its own by index.
    global_test : datasets.Dataset
        The source's official test split when it has one, else the hospitals'
        local test splits pooled.
    """

    source: SourceData
    hospitals: list[HospitalData]
    global_test: Dataset

    @property
    def num_hospitals(self) -> int:
        """Number of hospitals."""
        return len(self.hospitals)

    def hospital(self, index: int) -> HospitalData:
        """Return hospital ``index``, with an error that says the valid range.

        Parameters
        ----------
        index : int
            A partition id, ``0 <= index < num_hospitals``.

        Returns
        -------
        HospitalData
            The hospital.
        """
        if not 0 <= index < len(self.hospitals):
            raise DataError(
                f"hospital index {index} is out of range: this federation has "
                f"{len(self.hospitals)} hospitals (0..{len(self.hospitals) - 1})"
            )
        return self.hospitals[index]


# Each entry keeps its source alive, so the id() in its key cannot be reused
# by another object while the entry exists.
_CACHE: LruCache[Federation] = LruCache(maxsize=8)


def split_rows(labels: Sequence[Any], test_fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Split row numbers into local train and test, stratified by label when possible.

    Stratifies when there are at least two classes and every class has at least
    two rows; otherwise splits at random. A hospital with two or more rows keeps
    at least one row on each side; a one-row hospital keeps its row for training.

    Parameters
    ----------
    labels : Sequence[Any]
        One label per row.
    test_fraction : float
        Share of rows for test, in (0, 1); the count is rounded half up.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    tuple[list[int], list[int]]
        Sorted train and test row numbers.
    """
    n = len(labels)
    if n < 2:
        return list(range(n)), []
    n_test = min(max(math.floor(test_fraction * n + 0.5), 1), n - 1)
    values = np.asarray(labels)
    classes, counts = np.unique(values, return_counts=True)
    if len(classes) > 1 and counts.min() >= 2:
        quota = _quotas(counts, n_test)
        picked = [rng.permutation(np.flatnonzero(values == cls))[:q] for cls, q in zip(classes, quota, strict=True)]
        test = np.concatenate(picked)
    else:
        test = rng.permutation(n)[:n_test]
    test_set = set(test.tolist())
    return [i for i in range(n) if i not in test_set], sorted(test_set)


def with_context(rows: Dataset, context: str, where: str) -> Dataset:
    """``rows`` with the ``context`` column of ``data.context`` (unchanged for ``"none"``).

    Parameters
    ----------
    rows : datasets.Dataset
        Sentences with an ``abstract_id`` (``position``, ``num_sentences`` optional) unless ``context`` is ``"none"``.
    context : str
        ``data.context``.
    where : str
        What the rows are, for error messages.

    Returns
    -------
    datasets.Dataset
    """
    if context == "none":
        return rows
    return add_context(with_abstract_columns(rows, where), context)


def split_hospital(
    name: str,
    rows: Dataset,
    *,
    index: int,
    test_fraction: float,
    seed: int,
    max_train_per_hospital: int | None = None,
    max_test: int | None = None,
    context: str = "none",
    validation_fraction: float = 0.0,
    augment: str = "none",
    group_column: str | None = None,
) -> HospitalData:
    """One hospital's rows split into local train and test (stratified), then capped.

    With ``context`` other than ``"none"``, rows split into abstracts
    (``abstract_id``, ``position``, ``num_sentences``) are split by whole abstracts
    instead, so that no abstract has sentences on both sides, and each side's
    ``context`` is built from that side's own rows before the caps.

    Parameters
    ----------
    name : str
        The hospital's name.
    rows : datasets.Dataset
        All of the hospital's rows, with a ``label`` column.
    index : int
        The hospital's position; with ``seed`` it seeds the split and the caps.
    test_fraction : float
        Share of rows held out as the local test split, in (0, 1).
    seed : int
        Seed of the split and the caps.
    max_train_per_hospital, max_test : int or None
        Keep at most this many train / test rows (a seeded sample).
    context : str
        ``data.context``: ``"none"``, ``"position"``, ``"neighbours"`` or ``"both"``
        (see :func:`fedfm.data.piboso.add_context`).
    validation_fraction : float
        Share of the train rows (after the test split) held out as the validation
        split, stratified (by whole abstracts where rows have them) and capped at
        ``max_test``; 0 keeps none. Never taken from the test rows.
    augment : str
        ``data.augment``: ``"none"`` or ``"conclusion"``
        (:func:`fedfm.data.qa.with_conclusions`), applied to the train rows only,
        after their cap.
    group_column : str or None
        A column of rows that belong together (:attr:`SourceData.group_column`):
        rows sharing its value stay on one side of the test and validation splits.

    Returns
    -------
    HospitalData
        The hospital.
    """
    # Whole abstracts only when sentences carry their neighbours: otherwise a test
    # sentence's text would reach training as a neighbour's context. Without
    # context, rows are split one by one, as the label-skew benchmarks were measured.
    group = ABSTRACT_COLUMN if context != "none" and has_abstracts(rows) else group_column
    if group is not None:
        train_rows, test_rows = group_split(list(rows[group]), test_fraction, _rng(seed, 0, index))
    else:
        train_rows, test_rows = split_rows(list(rows["label"]), test_fraction, _rng(seed, 0, index))
    train_rows, validation_rows = _carve_validation(
        rows, train_rows, validation_fraction, _rng(seed, 3, index), group=group
    )
    capper = _rng(seed, 1, index)
    train = _cap(add_context(rows.select(train_rows), context), max_train_per_hospital, capper)
    if augment == "conclusion":
        train = with_conclusions(train, f"hospital {name!r}'s training rows")
    return HospitalData(
        name=name,
        train=train,
        test=_cap(add_context(rows.select(test_rows), context), max_test, capper),
        validation=(
            _cap(add_context(rows.select(validation_rows), context), max_test, _rng(seed, 4, index))
            if validation_fraction > 0 else None
        ),
    )


def _carve_validation(
    rows: Dataset, train_rows: list[int], fraction: float, rng: np.random.Generator, *, group: str | None
) -> tuple[list[int], list[int]]:
    """Train row numbers split into (train, validation), by the same rules as the test split."""
    if fraction <= 0:
        return train_rows, []
    train = rows.select(train_rows)
    if group is not None:
        keep, held = group_split(list(train[group]), fraction, rng)
    else:
        keep, held = split_rows(list(train["label"]), fraction, rng)
    return [train_rows[i] for i in keep], [train_rows[i] for i in held]


def _quotas(counts: np.ndarray, n_test: int) -> np.ndarray:
    # Largest-remainder apportionment; remainders go first to classes that can
    # still leave a row in train, so every class is seen on both sides.
    exact = n_test * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")
    short = n_test - int(quota.sum())
    for room in (counts - 1, counts):
        for c in order:
            if short == 0:
                return quota
            if quota[c] < room[c]:
                quota[c] += 1
                short -= 1
    return quota


def _cap(rows: Dataset, limit: int | None, rng: np.random.Generator) -> Dataset:
    # A seeded sample (kept in row order) rather than the first rows: sources are
    # often sorted by site or label, so a head would not be representative.
    if limit is None or len(rows) <= limit:
        return rows
    return rows.select(np.sort(rng.choice(len(rows), size=limit, replace=False)).tolist())


def cap_global_test(rows: Dataset, max_test: int | None, seed: int) -> Dataset:
    """The global test set capped at ``max_test`` rows (a seeded sample, in row order).

    Parameters
    ----------
    rows : datasets.Dataset
        The whole global test set.
    max_test : int or None
        Keep at most this many rows; ``None`` keeps all.
    seed : int
        Seed of the sample (``data.seed``).

    Returns
    -------
    datasets.Dataset
        The capped rows.
    """
    return _cap(rows, max_test, _rng(seed, 2))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _check(
    partitioner: str,
    num_hospitals: int | None,
    alpha: float,
    test_fraction: float,
    seed: int,
    max_train_per_hospital: int | None,
    max_test: int | None,
    context: str = "none",
    validation_fraction: float = 0.0,
    augment: str = "none",
) -> None:
    problems = []
    if augment not in AUGMENTS:
        problems.append(f"`augment` must be one of {list(AUGMENTS)}, got {augment!r}")
    if not (isinstance(validation_fraction, (int, float)) and 0 <= validation_fraction < 1):
        problems.append(f"`validation_fraction` must be in [0, 1), got {validation_fraction!r}")
    if context not in CONTEXT_MODES:
        problems.append(f"`context` must be one of {list(CONTEXT_MODES)}, got {context!r}")
    if partitioner not in known_partitioners():
        problems.append(f"`partitioner` must be one of {known_partitioners()}, got {partitioner!r}")
    if partitioner != "natural" and not is_count(num_hospitals, 1):
        problems.append(f"`num_hospitals` must be a positive integer, got {num_hospitals!r}")
    if partitioner == "dirichlet" and not (isinstance(alpha, Real) and not isinstance(alpha, bool) and alpha > 0):
        problems.append(f"`alpha` must be > 0, got {alpha!r}")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        problems.append(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
    if not is_count(seed, 0):
        problems.append(f"`seed` must be a non-negative integer, got {seed!r}")
    for field, value in (("max_train_per_hospital", max_train_per_hospital), ("max_test", max_test)):
        if value is not None and not is_count(value, 1):
            problems.append(f"`{field}` must be a positive integer or None, got {value!r}")
    if problems:
        raise ConfigError(problems)


def build_federation(
    source: SourceData,
    *,
    partitioner: str,
    num_hospitals: int | None,
    alpha: float = 0.5,
    column: str | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    max_train_per_hospital: int | None = None,
    max_test: int | None = None,
    context: str = "none",
    validation_fraction: float = 0.0,
    augment: str = "none",
) -> Federation:
    """Partition a source's train rows into hospitals, each with a local train/test split.

    With ``context`` other than ``"none"``, sources split into abstracts
    (NICTA-PIBOSO) keep each abstract whole: in one hospital
    (:func:`fedfm.data.partitioners.keep_groups_together`) and on one side of its
    local split, so no neighbour's text crosses from test to train.

    Deterministic (same arguments, same federation) and cached per process, so
    every simulated hospital can build the federation and take its own entry.

    Parameters
    ----------
    source : SourceData
        From :func:`fedfm.data.load_source`.
    partitioner : str
        ``"iid"``, ``"dirichlet"``, ``"natural"`` or a registered name.
    num_hospitals : int or None
        Number of hospitals; ignored by ``"natural"`` (one per value of ``column``;
        ``None`` is fine there).
    alpha : float
        Dirichlet concentration, for ``"dirichlet"``.
    column : str or None
        Natural-id column; defaults to ``source.natural_column`` for ``"natural"``.
    test_fraction : float
        Share of each hospital's rows held out as its local test split.
    seed : int
        Seed of the partition, the splits and the caps.
    max_train_per_hospital : int or None
        Keep at most this many train rows per hospital (a seeded sample).
    max_test : int or None
        Keep at most this many rows in each local test split and in ``global_test``.
    context : str
        What each sentence is classified with (``data.context``): ``"none"``,
        ``"position"``, ``"neighbours"`` or ``"both"``; other than ``"none"`` only
        for sources split into abstracts. Built inside each hospital from its own
        rows, and for the global test set from the test abstracts.
    validation_fraction : float
        Share of each hospital's train rows held out as its validation split
        (:func:`split_hospital`); 0 keeps none.
    augment : str
        Extra training rows each hospital makes from its own training rows
        (``data.augment``, :func:`split_hospital`): ``"none"`` or ``"conclusion"``.

    Returns
    -------
    Federation
        The hospitals and the global test set.
    """
    _check(partitioner, num_hospitals, alpha, test_fraction, seed, max_train_per_hospital, max_test, context,
           validation_fraction, augment)
    if context != "none" and ABSTRACT_COLUMN not in source.train.column_names:
        raise ConfigError(
            f"`data.context` {context!r} needs sentences grouped into abstracts (nicta_piboso, or a file with an "
            f"{ABSTRACT_COLUMN!r} column, sentences in reading order); {source.name!r} has columns "
            f"{source.train.column_names}. Use `data.context = \"none\"`."
        )
    if partitioner == "natural":
        column = column if column is not None else source.natural_column
        if column is None:
            others = [name for name in known_partitioners() if name != "natural"]
            raise ConfigError(
                f"`data.partitioner` 'natural' needs a natural column naming each row's hospital, and {source.name!r} has "
                f"none: set `data.partition-column` to one of {source.train.column_names}, or `data.partitioner` "
                f"to one of {others}"
            )
    key = (
        id(source),
        partitioner,
        num_hospitals,
        alpha,
        column,
        test_fraction,
        seed,
        max_train_per_hospital,
        max_test,
        context,
        validation_fraction,
        augment,
    )
    return _CACHE.get_or_build(
        key,
        lambda: _build(
            source,
            partitioner,
            int(num_hospitals or 0),
            alpha,
            column,
            float(test_fraction),
            int(seed),
            max_train_per_hospital,
            max_test,
            context,
            float(validation_fraction),
            augment,
        ),
    )


def _build(
    source: SourceData,
    partitioner: str,
    num_hospitals: int,
    alpha: float,
    column: str | None,
    test_fraction: float,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    context: str = "none",
    validation_fraction: float = 0.0,
    augment: str = "none",
) -> Federation:
    train = source.train
    if source.kind in (CLASSIFICATION, IMAGE) and len(classes := set(train["label"])) < 2:
        named = f"{source.label_names[min(classes)]!r} (of {source.label_names})" if classes else "none"
        raise DataError(f"every row of {source.name!r} has the label {named}; {ONE_CLASS}")
    if context != "none":
        train = with_abstract_columns(train, f"the {source.name!r} rows")
    parts = partition(
        train,
        partitioner,
        num_partitions=num_hospitals,
        seed=seed,
        alpha=alpha,
        column=column,
    )
    if context != "none":
        parts = keep_groups_together(train, parts, column=ABSTRACT_COLUMN, seed=seed)
    elif source.group_column is not None:
        # Near-duplicates (one condition's questions) in one hospital: none is trained on elsewhere and held out here.
        parts = keep_groups_together(train, parts, column=source.group_column, seed=seed)
    hospitals = []
    for index, (name, rows) in enumerate(parts):
        if len(rows) == 0:
            raise DataError(
                f"hospital {name!r} got no rows: the {partitioner!r} partitioner split "
                f"{len(train)} rows into {len(parts)} hospitals; use fewer hospitals"
            )
        hospitals.append(
            split_hospital(
                name, rows, index=index, test_fraction=test_fraction, seed=seed,
                max_train_per_hospital=max_train, max_test=max_test, context=context,
                validation_fraction=validation_fraction, augment=augment, group_column=source.group_column,
            )
        )
    pooled = (
        with_context(source.test, context, f"the {source.name!r} test rows")
        if source.test is not None
        else concatenate_datasets([h.test for h in hospitals])
    )
    return Federation(source=source, hospitals=hospitals, global_test=cap_global_test(pooled, max_test, seed))


#: Hospital names shown in a message before "...".
_SHOWN_HOSPITALS = 10


def check_federation(config: RunConfig, federation: Federation) -> None:
    """Refuse a federation that cannot hold the rounds ``config`` asks for.

    How many hospitals a natural partition makes is known only once the data is
    read, so :func:`fedfm.config.validate` cannot check it. A partition column with
    one value is refused unless ``federation.min-hospitals`` is 1 (a one-hospital
    run is then deliberate); otherwise the hospitals must number at least
    ``federation.min-hospitals`` (the server never lowers it in silence).

    Parameters
    ----------
    config : RunConfig
        The run configuration.
    federation : Federation
        Its federation (:func:`fedfm.workspace.federation_for`).

    Raises
    ------
    ConfigError
        Naming the keys, the partition column and its values, and what to set instead.
    """
    d, fe = config.data, config.federation
    if d.partitioner != "natural" or d.hospitals:
        # Other partitioners make `data.num-hospitals` hospitals, a deployment those of `data.hospitals`:
        # fedfm.config.validate has compared min-hospitals with those already.
        return
    count = federation.num_hospitals
    of = f"the file {d.path!r}" if d.dataset in FILE_DATASETS else f"{d.dataset!r}"
    column = d.partition_column or federation.source.natural_column
    by = f"`data.partition-column` {column!r}" if d.partition_column else f"the natural column {column!r}"
    if count == 1 and fe.min_hospitals != 1:
        raise ConfigError(
            f"{by} of {of} has one value, {federation.hospitals[0].name!r}: a natural partition would make a "
            f"one-hospital federation. To simulate hospitals from these rows set `data.partitioner = \"iid\"` "
            f"with `data.num-hospitals` (e.g. 4), or name a column with several values; to train one hospital "
            f"on purpose set `federation.min-hospitals = 1`"
        )
    names = [h.name for h in federation.hospitals]
    shown = ", ".join(names[:_SHOWN_HOSPITALS]) + (", ..." if count > _SHOWN_HOSPITALS else "")
    if fe.min_hospitals > count:
        raise ConfigError(
            f"`federation.min-hospitals` ({fe.min_hospitals}) must not exceed the {count} hospitals that {by} of "
            f"{of} makes ({shown}): set it to at most {count}"
        )
