"""Word-tagged CoNLL files: a token and its BIO tag per line, a blank line between sentences.

The reader of the built-in NCBI-disease set (:mod:`fedfm.data.ncbi`) and of a
hospital's own file (``data.dataset = "conll"``, :func:`load_conll`). A line
is ``token<TAB>tag``, or whitespace-separated columns with the token first and
the tag last (CoNLL-2003's ``token POS chunk tag``); tags are ``O``,
``B-<type>`` or ``I-<type>`` (Ramshaw & Marcus, 1995,
https://aclanthology.org/W95-0107).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from fedfm.data.base import TOKEN_CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.files import check_utf8, locate_file
from fedfm.errors import ConfigError, DataError

#: The tag every word outside an entity has; it is listed first (id 0).
OUTSIDE = "O"
#: What a line must look like, for messages.
LINE_FORM = "expected 'token<TAB>tag' (or whitespace-separated columns, token first, tag last)"


def is_bio(tag: str) -> bool:
    """Whether ``tag`` is ``O``, ``B-<type>`` or ``I-<type>`` (a non-empty type).

    Parameters
    ----------
    tag : str
        A tag name.

    Returns
    -------
    bool
    """
    return tag == OUTSIDE or (tag.startswith(("B-", "I-")) and len(tag) > 2)


def _split_line(line: str) -> tuple[str, str] | None:
    """``(token, tag)`` of a line, or ``None`` when it has no tag."""
    fields = line.split("\t") if "\t" in line else line.split()
    fields = [f.strip() for f in fields]
    if len(fields) < 2 or not fields[0] or not fields[-1]:
        return None
    return fields[0], fields[-1]


def parse_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Parse a CoNLL file: a token and its BIO tag per line, a blank line between sentences.

    Parameters
    ----------
    path : Path
        The file, UTF-8 text.

    Returns
    -------
    list of (tokens, tags)
        One pair of equally long lists per sentence, in file order.

    Raises
    ------
    DataError
        The file is not UTF-8, has no sentence, or a line has no tag or a tag
        that is not BIO; the message names the file and line.
    """
    check_utf8(path)
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
            pair = _split_line(line)
            if pair is None:
                raise DataError(f"{path}:{line_no}: {LINE_FORM}, got {line[:60]!r}: the line has no tag")
            if not is_bio(pair[1]):
                raise DataError(f"{path}:{line_no}: {LINE_FORM}, got {line[:60]!r}: the tag {pair[1]!r} is not "
                                f"BIO ('O', 'B-<type>' or 'I-<type>')")
            tokens.append(pair[0])
            tags.append(pair[1])
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise DataError(f"{path} holds no sentence: {LINE_FORM} per line, a blank line between sentences")
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


def given_tag_names(label_names: Sequence[str], found: set[str], *, where: str) -> list[str]:
    """``data.label-names`` as the tag vocabulary, checked against the tags a file holds.

    Parameters
    ----------
    label_names : Sequence[str]
        The tags in id order, as the run lists them (the same at every hospital).
    found : set of str
        The tags the file holds.
    where : str
        The file, for the message.

    Returns
    -------
    list[str]
        ``label_names`` (stripped).

    Raises
    ------
    DataError
        A name is not BIO, ``O`` is missing, or the file holds a tag not listed.
    """
    names = [n.strip() for n in label_names]
    problems = []
    not_bio = [n for n in names if not is_bio(n)]
    if not_bio:
        problems.append(f"{not_bio} are not BIO tags ('O', 'B-<type>' or 'I-<type>')")
    if OUTSIDE not in names:
        problems.append(f"{OUTSIDE!r}, the tag of words outside every entity, is missing")
    unknown = sorted(found - set(names))
    if unknown:
        problems.append(f"{where} holds tag(s) {unknown} not among them")
    if problems:
        raise DataError(f"`data.label-names` {names}: {'; '.join(problems)}")
    return names


def load_conll(request: SourceRequest) -> SourceData:
    """Load a hospital's own CoNLL file (``data.dataset = "conll"``, ``data.path``) for token classification.

    Parameters
    ----------
    request : SourceRequest
        ``path`` (absolute, or relative to the working or data directory),
        ``label_names`` (the tags in id order; default: ``O`` first, then the
        file's other tags sorted) and ``kind`` (must be token classification).

    Returns
    -------
    SourceData
        The file's sentences as train rows (no test split: each hospital keeps
        ``data.test-fraction`` of its sentences).
    """
    if request.kind != TOKEN_CLASSIFICATION:
        raise ConfigError(f"a {request.name} file holds a tag per word: it is read for `model.task` "
                          f"'token-classification', not for {request.kind!r} rows")
    path = locate_file(request)
    sentences = parse_conll(path)
    found = {t for _, tags in sentences for t in tags}
    if request.label_names is not None:
        names = given_tag_names(request.label_names, found, where=str(path))
    else:
        names = tag_names([found])
    if len(names) < 2:
        raise DataError(f"{path}: every word is tagged {OUTSIDE!r}; a tagger needs entities to learn "
                        f"(B-<type>/I-<type> tags)")
    return SourceData(
        name=request.name,
        kind=TOKEN_CLASSIFICATION,
        train=sentences_to_dataset(sentences, names),
        test=None,
        label_names=names,
        natural_column=None,
    )
