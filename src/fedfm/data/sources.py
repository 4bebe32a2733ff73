"""The registry of data sources and :func:`load_source`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from datasets import Dataset

from fedfm.data._cache import LruCache
from fedfm.data.base import CLASSIFICATION, IMAGE, INSTRUCTION, MULTIPLE_CHOICE, SourceData, SourceRequest
from fedfm.data.choice_files import choice_file
from fedfm.data.conll import load_conll
from fedfm.data.files import FILE_FORMATS, load_file, register_file_kind
from fedfm.data.formats import TEXT_INPUT, InputFormat, register_input_format
from fedfm.data.heart import HEART_RECORD_INPUT, load_heart_disease
from fedfm.data.images import (
    IMAGE_FOLDER,
    IMAGE_INPUT,
    PNEUMONIAMNIST,
    image_table,
    load_image_folder,
    load_pneumoniamnist,
)
from fedfm.data.instruction import MEDICAL_MEADOW, instruction_file, load_medical_meadow
from fedfm.data.ncbi import load_ncbi_disease
from fedfm.data.paths import resolve_data_dir_with_origin
from fedfm.data.piboso import load_piboso
from fedfm.data.qa import MULTIPLE_CHOICE_INPUT, PUBMEDQA_INPUT, load_medmcqa, load_medqa, load_pubmedqa
from fedfm.errors import ConfigError, DataError

SourceLoader = Callable[[SourceRequest], SourceData]

_SOURCES: dict[str, SourceLoader] = {}
_INPUTS: dict[str, InputFormat] = {}
_CACHE: LruCache[SourceData] = LruCache(maxsize=16)


def register_source(
    name: str, loader: SourceLoader, *, input_format: InputFormat = TEXT_INPUT, force: bool = False
) -> None:
    """Make ``loader`` available to :func:`load_source` under ``name``.

    A name taken by another loader is refused unless ``force`` is true; then
    the loader is replaced (and what was cached for it is forgotten).

    Parameters
    ----------
    name : str
        The source name, e.g. ``"heart_disease_uci"``.
    loader : Callable[[SourceRequest], SourceData]
        Builds the source from a :class:`SourceRequest`.
    input_format : InputFormat
        How a colleague's file of this source's rows becomes a model's input
        (what an exported model records in ``fedfm.json``); default: a text column.
    force : bool
        Replace a source already registered under ``name``.
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"a source name must be a non-empty string, got {name!r}")
    if not force and _SOURCES.get(name, loader) is not loader:
        raise ConfigError(f"data source {name!r} is registered already; pass force=True to replace it")
    _SOURCES[name] = loader
    _INPUTS[name] = input_format
    _CACHE.discard_if(lambda key: isinstance(key, tuple) and key[0] == name)


def known_sources() -> list[str]:
    """Return the sorted names :func:`load_source` accepts.

    Returns
    -------
    list[str]
        The registered names.
    """
    return sorted(_SOURCES)


def source_input_format(name: str) -> InputFormat:
    """The input format the source ``name`` was registered with (a text column for a name not registered here).

    Parameters
    ----------
    name : str
        The source name (``data.dataset``).

    Returns
    -------
    InputFormat
    """
    return _INPUTS.get(name, TEXT_INPUT)


def load_source(
    name: str,
    *,
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    max_rows: int | None = None,
    kind: str = CLASSIFICATION,
) -> SourceData:
    """Load a registered dataset into fedfm's standard columns.

    Results are cached per process, keyed by the arguments and the resolved data
    directory, so every simulated hospital can call this cheaply.

    Parameters
    ----------
    name : str
        ``heart_disease_uci``, ``nicta_piboso``, ``pubmedqa``, ``medmcqa``, ``medqa``,
        ``ncbi_disease``, a
        generic file format (``csv``, ``jsonl``, ``json``, ``parquet``), ``conll``
        (a word-tagged file, :mod:`fedfm.data.conll`) or a name
        added with :func:`register_source`.
    data_dir : str or Path or None
        The shared data directory; see :func:`resolve_data_dir` for the default.
    path : str or Path or None
        The file for the generic formats (absolute, or relative to the working
        directory or the data directory).
    text_column, label_column : str
        The columns of a generic file holding the text and the label.
    label_names : Sequence[str] or None
        Class names in id order for a generic file; by default string labels are
        numbered in sorted order.
    max_rows : int or None
        Keep only the first ``max_rows`` rows of each split (for quick runs).
    kind : str
        The rows the task reads (its :attr:`~fedfm.tasks.Task.data_kind`): the
        generic file formats read a file of that kind; built-in sources have
        one kind and ignore it.

    Returns
    -------
    SourceData
        The loaded source; shared with other callers, so treat it as read-only.
    """
    if name not in _SOURCES:
        raise ConfigError(f"unknown data source {name!r}; known sources: {known_sources()}")
    if max_rows is not None and (isinstance(max_rows, bool) or max_rows < 1):
        raise ConfigError(f"`max_rows` must be a positive integer or None, got {max_rows!r}")
    resolved, origin = resolve_data_dir_with_origin(data_dir)
    if resolved is not None:
        resolved = resolved.resolve()
    request = SourceRequest(
        name=name,
        data_dir=resolved,
        data_dir_origin=origin,
        path=Path(path) if path is not None else None,
        text_column=text_column,
        label_column=label_column,
        label_names=tuple(label_names) if label_names is not None else None,
        kind=kind,
    )
    file_key = _file_key(request.path)
    key = (name, str(resolved), file_key, text_column, label_column, request.label_names, max_rows, kind)
    return _CACHE.get_or_build(key, lambda: _load(request, max_rows))


def _file_key(path: Path | None) -> tuple[str, int] | None:
    # The modification time is part of the key so that an edited file is re-read.
    if path is None:
        return None
    resolved = path.expanduser().resolve()
    return str(resolved), resolved.stat().st_mtime_ns if resolved.is_file() else -1


def _load(request: SourceRequest, max_rows: int | None) -> SourceData:
    source = _SOURCES[request.name](request)
    if not isinstance(source, SourceData):
        raise DataError(f"the loader for {request.name!r} returned {type(source).__name__}, not SourceData")
    if max_rows is None:
        return source
    return replace(source, train=_head(source.train, max_rows), test=_head(source.test, max_rows))


def _head(split: Dataset | None, max_rows: int) -> Dataset | None:
    # The first rows, not a sample: quick runs should see the same rows every time.
    if split is None or len(split) <= max_rows:
        return split
    return split.select(range(max_rows))


# fedfm.json names these formats; the order is the one its error message lists them in.
register_input_format(HEART_RECORD_INPUT)
register_input_format(MULTIPLE_CHOICE_INPUT)
register_input_format(IMAGE_INPUT)
register_source("heart_disease_uci", load_heart_disease, input_format=HEART_RECORD_INPUT)
register_source("nicta_piboso", load_piboso)
register_source("pubmedqa", load_pubmedqa, input_format=PUBMEDQA_INPUT)
register_source("medmcqa", load_medmcqa, input_format=MULTIPLE_CHOICE_INPUT)
register_source("medqa", load_medqa, input_format=MULTIPLE_CHOICE_INPUT)
register_source("ncbi_disease", load_ncbi_disease)
register_source("conll", load_conll)
register_source(MEDICAL_MEADOW, load_medical_meadow)
register_source(PNEUMONIAMNIST, load_pneumoniamnist, input_format=IMAGE_INPUT)
register_source(IMAGE_FOLDER, load_image_folder, input_format=IMAGE_INPUT)
register_file_kind(IMAGE, image_table)
register_file_kind(INSTRUCTION, instruction_file)
register_file_kind(MULTIPLE_CHOICE, choice_file)
for _format in FILE_FORMATS:
    register_source(_format, load_file)
