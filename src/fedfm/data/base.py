"""The shape every data source is loaded into."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import datasets

from fedfm.errors import DataError

CLASSIFICATION = "classification"
MULTIPLE_CHOICE = "multiple-choice"
TOKEN_CLASSIFICATION = "token-classification"
INSTRUCTION = "instruction"
IMAGE = "image"
KINDS = (CLASSIFICATION, MULTIPLE_CHOICE, TOKEN_CLASSIFICATION, INSTRUCTION, IMAGE)

# The columns a task can rely on; loaders may add more (hospital, pmid, ...).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("text", "label"),
    MULTIPLE_CHOICE: ("question", "context", "options", "label"),
    # `label` is a sentence-level summary (e.g. "mentions an entity") for stratified splits and label skew.
    TOKEN_CLASSIFICATION: ("tokens", "tags", "label"),
    # A conversation: a list of {"role", "content"} turns ending with the assistant's; `label` is a topic id
    # (e.g. the question's kind) for stratified splits and the Dirichlet partitioner.
    INSTRUCTION: ("messages", "label"),
    # An image (a datasets ``Image`` column: decoded to a PIL image on access) and its class id.
    IMAGE: ("image", "label"),
}


def is_count(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``minimum``.

    Parameters
    ----------
    value : Any
        The value to check.
    minimum : int
        Smallest allowed value.

    Returns
    -------
    bool
        True for an integral, non-bool value >= ``minimum``.
    """
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= minimum


@dataclass(frozen=True)
class SourceData:
    """A dataset loaded into fedfm's standard columns.

    Classification rows carry ``text`` (str) and ``label`` (int); multiple-choice
    rows carry ``question`` (str), ``context`` (str, "" when none), ``options``
    (list[str]) and ``label`` (int, index of the right option). Extra columns are
    allowed. Token-classification rows carry ``tokens`` (list[str], one per
    word), ``tags`` (list[int], one tag id per word, into ``label_names``) and
    ``label`` (int, a sentence-level summary the stratified local split and the
    Dirichlet partitioner use). Instruction rows carry ``messages`` (a list of
    ``{"role", "content"}`` turns, the last one the assistant's answer) and
    ``label`` (int, a topic id into ``label_names`` for stratified splits and
    the Dirichlet partitioner). Image rows carry ``image`` (a ``datasets.Image``
    column, a PIL image when read) and ``label`` (int). Objects returned by :func:`fedfm.data.load_source` are cached and
    shared: treat them as read-only (use ``Dataset.with_format``, which returns a
    copy, rather than ``set_format``, which changes the shared object).

    Parameters
    ----------
    name : str
        The source's registry name, e.g. ``"heart_disease_uci"``.
    kind : str
        ``"classification"``, ``"multiple-choice"``, ``"token-classification"``, ``"instruction"`` or ``"image"``.
    train : datasets.Dataset
        The rows hospitals are built from.
    test : datasets.Dataset or None
        The dataset's official test split, when it has one.
    label_names : list[str]
        Class names (index = label id) for classification; the tag names
        (index = tag id) for token classification; the option names
        (e.g. ``["A", "B", "C", "D"]``) for multiple-choice; the topics for instruction rows.
    natural_column : str or None
        A column naming a natural site (hospital, subject) to partition by.
    group_column : str or None
        A column whose rows belong together (e.g. the questions about one
        condition): every local split keeps a group's rows on one side, so
        near-duplicates never straddle train and test.
    """

    name: str
    kind: str
    train: datasets.Dataset
    test: datasets.Dataset | None
    label_names: list[str]
    natural_column: str | None = None
    group_column: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind not in KINDS:
            problems.append(f"`kind` must be one of {list(KINDS)}, got {self.kind!r}")
        else:
            for split_name, split in (("train", self.train), ("test", self.test)):
                if split is None:
                    continue
                missing = [c for c in REQUIRED_COLUMNS[self.kind] if c not in split.column_names]
                if missing:
                    problems.append(
                        f"{split_name} split lacks column(s) {missing} required for kind "
                        f"{self.kind!r}; it has {split.column_names}"
                    )
        if self.kind in (CLASSIFICATION, TOKEN_CLASSIFICATION, INSTRUCTION, IMAGE) and not self.label_names:
            problems.append(f"`label_names` must name at least one class for {self.kind}")
        if self.natural_column is not None and self.natural_column not in self.train.column_names:
            problems.append(
                f"`natural_column` {self.natural_column!r} is not a column of the train split; "
                f"it has {self.train.column_names}"
            )
        if self.group_column is not None and self.group_column not in self.train.column_names:
            problems.append(f"`group_column` {self.group_column!r} is not a column of the train split")
        if problems:
            raise DataError(f"invalid source {self.name!r}: " + "; ".join(problems))

    @property
    def num_labels(self) -> int:
        """Number of classes (classification), tags (token classification) or option names (multiple-choice)."""
        return len(self.label_names)


@dataclass(frozen=True)
class SourceRequest:
    """What a source loader is asked for; loaders ignore the fields they do not use.

    Parameters
    ----------
    name : str
        The registry name the loader was found under.
    data_dir : Path or None
        The resolved data directory (see :func:`fedfm.data.resolve_data_dir`).
    data_dir_origin : str
        How ``data_dir`` was found, for error messages.
    path : Path or None
        A file, for the generic ``csv``/``jsonl``/``parquet`` loaders.
    text_column : str
        Column holding the text, for generic classification files.
    label_column : str
        Column holding the label, for generic classification files.
    label_names : tuple[str, ...] or None
        Class names in label-id order; ``None`` lets the loader derive them.
    kind : str
        The kind of rows the task reads (:data:`KINDS`); the generic file
        loaders read a file of that kind (a task's :attr:`~fedfm.tasks.Task.data_kind`).
    """

    name: str
    data_dir: Path | None
    data_dir_origin: str
    path: Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    kind: str = CLASSIFICATION
