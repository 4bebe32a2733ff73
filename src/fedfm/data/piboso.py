"""NICTA-PIBOSO: the role of each sentence in a medical abstract.

Kim et al., "Automatic classification of sentences to support Evidence Based
Medicine", BMC Bioinformatics 2011 (https://doi.org/10.1186/1471-2105-12-S2-S5);
single-label files from Jin & Szolovits, EMNLP 2018.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from fedfm.data.base import CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.paths import data_file
from fedfm.errors import DataError

LABEL_NAMES = ["background", "intervention", "other", "outcome", "population", "study design"]


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
