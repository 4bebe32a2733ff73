"""NCBI-disease: disease mentions in PubMed abstracts, tagged word by word (BIO).

Dogan, Leaman & Lu, "NCBI disease corpus: a resource for disease name
recognition and concept normalization", J. Biomed. Inform. 2014
(https://doi.org/10.1016/j.jbi.2013.12.006); the IOB files of Crichton et al.,
BMC Bioinformatics 2017 (github.com/cambridgeltl/MTL-Bioinformatics-2016).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from fedfm.data.base import TOKEN_CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.paths import data_file
from fedfm.errors import DataError

#: The tag every word outside an entity has; it is listed first (id 0).
OUTSIDE = "O"
SPLITS = ("train", "devel", "test")


def parse_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Parse a two-column CoNLL file: ``token<TAB>tag`` per line, a blank line between sentences.

    Parameters
    ----------
    path : Path
        The file (``train.tsv``, ``devel.tsv`` or ``test.tsv``).

    Returns
    -------
    list of (tokens, tags)
        One pair of equally long lists per sentence, in file order.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if tokens:
                    sentences.append((tokens, tags))
                    tokens, tags = [], []
                continue
            token, sep, tag = line.partition("\t")
            if not sep or not token or not tag or "\t" in tag:
                raise DataError(f"{path}:{line_no}: expected 'token<TAB>tag', got {line[:60]!r}")
            tokens.append(token)
            tags.append(tag.strip())
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def tag_names(tag_sets: list[set[str]]) -> list[str]:
    """The tag vocabulary in id order: ``O`` first, then the others sorted.

    Parameters
    ----------
    tag_sets : list of set of str
        The tags seen in each file.

    Returns
    -------
    list[str]
        E.g. ``["O", "B-Disease", "I-Disease"]``.
    """
    seen = set().union(*tag_sets) if tag_sets else set()
    return [OUTSIDE, *sorted(seen - {OUTSIDE})]


def sentences_to_dataset(sentences: list[tuple[list[str], list[str]]], names: list[str]) -> datasets.Dataset:
    """Rows ``tokens``, ``tags`` (ids into ``names``, a ClassLabel sequence), ``label``, ``position``.

    Parameters
    ----------
    sentences : list of (tokens, tags)
        From :func:`parse_conll`.
    names : list[str]
        The tag vocabulary; the ``tags`` feature carries it, so tasks can read
        the tag names from the rows themselves.

    Returns
    -------
    datasets.Dataset
        ``label`` is 1 when the sentence has any tag other than ``O`` (it
        mentions an entity), else 0; ``position`` is the sentence's index in its file.
    """
    ids = {name: i for i, name in enumerate(names)}
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "tags": datasets.Sequence(datasets.ClassLabel(names=list(names))),
            "label": datasets.Value("int64"),
            "position": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "tokens": [tokens for tokens, _ in sentences],
            "tags": [[ids[t] for t in tags] for _, tags in sentences],
            "label": [int(any(t != OUTSIDE for t in tags)) for _, tags in sentences],
            "position": list(range(len(sentences))),
        },
        features=features,
    )


def load_ncbi_disease(request: SourceRequest) -> SourceData:
    """Load NCBI-disease: ``train.tsv`` as train, ``test.tsv`` as the official test.

    ``devel.tsv`` is read for its tags only (so the vocabulary is the corpus's)
    and otherwise left out: a hospital's validation rows come from its own
    training rows (``data.validation-fraction``), and the published anchors
    train on the train split.
    The files carry no abstract ids, so hospitals are built from sentences.

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        5,424 train and 940 test sentences, tags ``O``, ``B-Disease``, ``I-Disease``.
    """
    parsed = {
        split: parse_conll(data_file(request.data_dir, request.data_dir_origin, f"ncbi_disease/{split}.tsv"))
        for split in SPLITS
    }
    names = tag_names([{t for _, tags in sentences for t in tags} for sentences in parsed.values()])
    malformed = [n for n in names[1:] if not n.startswith(("B-", "I-"))]
    if malformed:
        raise DataError(f"ncbi_disease: tags must be 'O', 'B-<type>' or 'I-<type>', found {malformed}")
    return SourceData(
        name=request.name,
        kind=TOKEN_CLASSIFICATION,
        train=sentences_to_dataset(parsed["train"], names),
        test=sentences_to_dataset(parsed["test"], names),
        label_names=names,
        natural_column=None,
    )
