"""NICTA-PIBOSO: the role of each sentence in a medical abstract.

Kim et al., "Automatic classification of sentences to support Evidence Based
Medicine", BMC Bioinformatics 2011 (https://doi.org/10.1186/1471-2105-12-S2-S5);
single-label files from Jin & Szolovits, EMNLP 2018.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np

from fedfm.config import CONTEXTS
from fedfm.data.base import CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.paths import data_file
from fedfm.errors import DataError

LABEL_NAMES = ["background", "intervention", "other", "outcome", "population", "study design"]

#: Values of ``data.context``: what a sentence is classified together with.
CONTEXT_MODES = CONTEXTS  # the allowed values of `data.context`, read from its Literal type
#: The column naming a row's abstract: rows sharing it stay in one hospital and on one side of its split.
ABSTRACT_COLUMN = "abstract_id"
#: The column :func:`add_context` writes; sequence classification encodes it as the second text of a pair.
CONTEXT_COLUMN = "context"
_ABSTRACT_COLUMNS = (ABSTRACT_COLUMN, "position", "num_sentences")
# Plain words rather than new special tokens: the tokenizer and the frozen
# embeddings already know them, and nothing has to be added to the model.
_START, _END = "start of abstract", "end of abstract"


def parse_piboso(path: Path) -> dict[str, list]:
    """Parse a PubMed-RCT-style file: ``###<id>``, then ``label<TAB>sentence`` lines.

    Parameters
    ----------
    path : Path
        The file (``train.txt``, ``dev.txt`` or ``test.txt``).

    Returns
    -------
    dict[str, list]
        Columns ``text``, ``label``, ``abstract_id``, ``position`` (0-based index
        of the sentence in its abstract) and ``num_sentences``.
    """
    label_ids = {name: i for i, name in enumerate(LABEL_NAMES)}
    columns: dict[str, list] = {"text": [], "label": [], "abstract_id": [], "position": []}
    sizes: dict[str, int] = {}
    abstract: str | None = None
    with path.open(encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                abstract = None
                continue
            if line.startswith("###"):
                abstract = line[3:].strip()
                if abstract in sizes:
                    raise DataError(f"{path}:{line_no}: abstract {abstract!r} appears twice")
                sizes[abstract] = 0
                continue
            label, sep, sentence = line.partition("\t")
            if abstract is None or not sep:
                raise DataError(
                    f"{path}:{line_no}: expected '###<id>' or 'label<TAB>sentence' inside an "
                    f"abstract, got {line[:60]!r}"
                )
            if label not in label_ids:
                raise DataError(f"{path}:{line_no}: unknown label {label!r}; expected one of {LABEL_NAMES}")
            columns["text"].append(sentence.strip())
            columns["label"].append(label_ids[label])
            columns["abstract_id"].append(abstract)
            columns["position"].append(sizes[abstract])
            sizes[abstract] += 1
    columns["num_sentences"] = [sizes[a] for a in columns["abstract_id"]]
    return columns


def load_piboso(request: SourceRequest) -> SourceData:
    """Load NICTA-PIBOSO: ``train.txt`` as train, ``test.txt`` as the official test.

    ``dev.txt`` is left out so that results stay comparable with the literature's
    train/test protocol.

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        6,979 train and 1,991 test sentences over six labels.
    """
    splits = {}
    for split in ("train", "test"):
        path = data_file(request.data_dir, request.data_dir_origin, f"nicta_piboso/{split}.txt")
        splits[split] = datasets.Dataset.from_dict(parse_piboso(path))
    return SourceData(
        name=request.name,
        kind=CLASSIFICATION,
        train=splits["train"],
        test=splits["test"],
        label_names=list(LABEL_NAMES),
        natural_column=None,
    )


def has_abstracts(rows: datasets.Dataset) -> bool:
    """Whether ``rows`` carry the abstract structure :func:`add_context` needs.

    Parameters
    ----------
    rows : datasets.Dataset
        Any rows.

    Returns
    -------
    bool
        True when the columns ``abstract_id``, ``position`` and ``num_sentences`` are present.
    """
    return all(c in rows.column_names for c in _ABSTRACT_COLUMNS)


def with_abstract_columns(rows: datasets.Dataset, where: str) -> datasets.Dataset:
    """Rows of sentences grouped by ``abstract_id``, with ``position`` and ``num_sentences`` filled in and checked.

    A file of one's own needs only an ``abstract_id`` column, with each
    abstract's sentences in reading order; ``position`` (0-based) and
    ``num_sentences`` are read where the rows have them and otherwise taken from
    that order. Training, ``fedfm predict`` and a SuperNode's own file all go
    through here, so a sentence gets the same context everywhere.

    Parameters
    ----------
    rows : datasets.Dataset
        Rows with ``abstract_id``; ``position`` and ``num_sentences`` optional.
    where : str
        What the rows are (a file's path), for error messages.

    Returns
    -------
    datasets.Dataset
        ``rows`` with integer ``position`` and ``num_sentences`` columns and a string ``abstract_id``.

    Raises
    ------
    DataError
        No ``abstract_id`` column or a row without one; a position or size that
        is not a whole number >= 0; a position >= its abstract's size; two rows
        at the same position of one abstract. Each message names the row.
    """
    if ABSTRACT_COLUMN not in rows.column_names:
        raise DataError(
            f"{where} has no {ABSTRACT_COLUMN!r} column: a sentence is read with its context only if the rows say "
            f"which abstract each sentence belongs to (one row per sentence, in reading order; optional columns "
            f"'position' from 0 and 'num_sentences'); columns present: {rows.column_names}"
        )
    raw = list(rows[ABSTRACT_COLUMN])
    missing = [i for i, a in enumerate(raw) if a is None or (isinstance(a, float) and math.isnan(a)) or str(a) == ""]
    if missing:
        raise DataError(f"{where} column {ABSTRACT_COLUMN!r}: row {missing[0]} has no abstract id")
    abstracts = [str(a) for a in raw]
    if "position" in rows.column_names:
        positions = _whole_numbers(list(rows["position"]), where, "position")
    else:
        seen: dict[str, int] = {}
        positions = []
        for a in abstracts:
            positions.append(seen.get(a, 0))
            seen[a] = positions[-1] + 1
    if "num_sentences" in rows.column_names:
        sizes = _whole_numbers(list(rows["num_sentences"]), where, "num_sentences")
    else:
        counts = Counter(abstracts)
        sizes = [counts[a] for a in abstracts]
    taken: dict[tuple[str, int], int] = {}
    for row, (a, p, n) in enumerate(zip(abstracts, positions, sizes, strict=True)):
        if p >= n:
            raise DataError(f"{where}: row {row} (abstract {a!r}) has position {p} but num_sentences {n}; "
                            f"positions count from 0")
        if (a, p) in taken:
            raise DataError(f"{where}: rows {taken[(a, p)]} and {row} are both sentence {p} of abstract {a!r}")
        taken[(a, p)] = row
    keep = [c for c in rows.column_names if c not in _ABSTRACT_COLUMNS]
    return rows.select_columns(keep).add_column(ABSTRACT_COLUMN, abstracts).add_column(
        "position", positions).add_column("num_sentences", sizes)


def _whole_numbers(values: list[object], where: str, name: str) -> list[int]:
    out = []
    for row, v in enumerate(values):
        number = v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        if isinstance(v, str):
            try:
                number = float(v)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number < 0 or number % 1 != 0:
            raise DataError(f"{where} column {name!r}: row {row} is {v!r}; expected a whole number >= 0")
        out.append(int(number))
    return out


def context_text(
    position: int, num_sentences: int, previous: str | None, following: str | None, *, mode: str
) -> str:
    """The context of one sentence, as the second text of a (sentence, context) pair.

    Parameters
    ----------
    position : int
        0-based index of the sentence in its abstract.
    num_sentences : int
        Sentences in the abstract.
    previous, following : str or None
        The neighbouring sentences; ``None`` at the start / end of the abstract.
    mode : str
        ``"position"``, ``"neighbours"`` or ``"both"`` (``"none"`` gives ``""``).

    Returns
    -------
    str
        E.g. ``"sentence 3 of 9. before: ... after: ..."``. The position comes
        first and the following sentence last, so a truncated context loses the
        end of the following sentence first.
    """
    if mode not in CONTEXT_MODES:
        raise DataError(f"`data.context` must be one of {list(CONTEXT_MODES)}, got {mode!r}")
    parts = []
    if mode in ("position", "both"):
        parts.append(f"sentence {position + 1} of {num_sentences}.")
    if mode in ("neighbours", "both"):
        parts.append(f"before: {previous if previous is not None else _START}")
        parts.append(f"after: {following if following is not None else _END}")
    return " ".join(parts)


def add_context(rows: datasets.Dataset, mode: str) -> datasets.Dataset:
    """Add a ``context`` column built from ``rows`` alone (one hospital's split, or the test set).

    A neighbour is the row of the same abstract one position before or after,
    looked up among ``rows`` only: nothing outside the rows a hospital holds
    enters its context. Callers keep whole abstracts together (see
    :func:`fedfm.data.split_hospital`), so every neighbour is present.

    Parameters
    ----------
    rows : datasets.Dataset
        Rows with ``text``, ``abstract_id``, ``position`` and ``num_sentences``.
    mode : str
        One of :data:`CONTEXT_MODES`; ``"none"`` returns ``rows`` unchanged.

    Returns
    -------
    datasets.Dataset
        ``rows`` plus a ``context`` column (str).
    """
    if mode not in CONTEXT_MODES:
        raise DataError(f"`data.context` must be one of {list(CONTEXT_MODES)}, got {mode!r}")
    if mode == "none":
        return rows
    if not has_abstracts(rows):
        raise DataError(
            f"`data.context` {mode!r} needs rows split into abstracts (columns {list(_ABSTRACT_COLUMNS)}); "
            f"these rows have {rows.column_names}. Use `data.context = \"none\"` for this dataset."
        )
    texts: list[str] = list(rows["text"])
    abstracts: list[str] = [str(a) for a in rows[ABSTRACT_COLUMN]]
    positions: list[int] = list(rows["position"])
    sizes: list[int] = list(rows["num_sentences"])
    at = {(a, p): i for i, (a, p) in enumerate(zip(abstracts, positions, strict=True))}

    def neighbour(i: int, step: int) -> str | None:
        j = at.get((abstracts[i], positions[i] + step))
        return None if j is None else texts[j]

    column = [
        context_text(positions[i], sizes[i], neighbour(i, -1), neighbour(i, 1), mode=mode) for i in range(len(rows))
    ]
    if CONTEXT_COLUMN in rows.column_names:
        rows = rows.remove_columns(CONTEXT_COLUMN)
    return rows.add_column(CONTEXT_COLUMN, column)


def group_split(
    groups: Sequence[str], test_fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Split row numbers into train and test by whole groups (abstracts), close to ``test_fraction`` of the rows.

    Groups are taken in a random order into the test side while that brings the
    test row count closer to ``test_fraction`` of all rows. With two or more
    groups each side keeps at least one; a single group stays in train.

    Parameters
    ----------
    groups : Sequence[str]
        One group id (abstract id) per row.
    test_fraction : float
        Wanted share of rows in test, in (0, 1).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    tuple[list[int], list[int]]
        Sorted train and test row numbers; no group has rows on both sides.
    """
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    names = sorted(members)
    if len(names) < 2:
        return list(range(len(groups))), []
    target = test_fraction * len(groups)
    test: list[int] = []
    taken = 0
    for k in rng.permutation(len(names)).tolist()[: len(names) - 1]:
        size = len(members[names[k]])
        if taken and abs(taken + size - target) >= abs(taken - target):
            continue
        test.extend(members[names[k]])
        taken += size
    test_set = set(test)
    return [i for i in range(len(groups)) if i not in test_set], sorted(test_set)
