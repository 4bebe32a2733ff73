"""Input formats: how a row of a colleague's file becomes a model's input, and how a label cell becomes a class id.

An exported folder records its format's :attr:`InputFormat.name` in
``fedfm.json`` (``input_format``); ``fedfm predict`` looks the format up by
that name (:func:`input_format`) and applies it to each row. A data source
declares its format when it is registered
(:func:`fedfm.data.register_source`), so the special cases of a dataset (the
UCI heart-disease record, PubMedQA's fixed options) are written once, beside
the dataset's loader, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedfm.data.base import CLASSIFICATION
from fedfm.errors import ConfigError


@dataclass(frozen=True)
class InputFormat:
    """Rows of a text column: the model reads one text per row (the default of classification sources).

    Attributes
    ----------
    name : str
        The value of ``fedfm.json``'s ``input_format``.
    kind : str
        ``"classification"`` (a text per row) or ``"multiple-choice"`` (question, context, options).
    label_column : str or None
        The label column an exported folder records; ``None``: the run's own (``data.label-column``).
    """

    name: str = "text"
    kind: str = CLASSIFICATION
    label_column: str | None = None

    #: Columns a row's record is written as text from, when the file has no text column (none here).
    record_columns: tuple[str, ...] = ()
    #: What such a record is, for the error naming its missing columns.
    record_name: str = ""
    #: The text column a record format reads instead when the file has its rows as text already.
    text_column: str | None = None
    #: Another label column to read when the recorded one is absent (none here).
    fallback_label_column: str | None = None

    def describe(self, *, text_column: str, context: str, fixed_options: list[str]) -> str:
        """The model card's description of the input (its ``Input:`` line, before the token limit).

        Parameters
        ----------
        text_column : str
            The folder's text column.
        context : str
            The ``data.context`` the model was trained with (``none``: the sentence alone).
        fixed_options : list of str
            Options every row shares (multiple choice).

        Returns
        -------
        str
        """
        if context != "none":
            return (f"the text column `{text_column}` (one sentence per row) paired with its context "
                    f"`{context}` (`fedfm.data.piboso.context_text`): rows need `abstract_id`, sentences in "
                    f"their abstract's order")
        return f"the text column `{text_column}`"

    def example_text(self) -> str:
        """One row's model text, for the model card's snippet.

        Returns
        -------
        str
        """
        return "Patient reports chest pain on exertion."

    def record_text(self, record: Mapping[str, Any]) -> str:
        """One row's :attr:`record_columns` written as the model's text.

        Parameters
        ----------
        record : Mapping[str, Any]
            The row's values by column.

        Returns
        -------
        str
        """
        raise NotImplementedError(f"the input format {self.name!r} reads a text column, not a record")

    def fixed_options(self, label_names: list[str]) -> list[str]:
        """The options every row shares (multiple choice), given the source's classes; ``[]``: each row has its own.

        Parameters
        ----------
        label_names : list of str
            The classes in id order (multiple choice: the option names).

        Returns
        -------
        list of str
        """
        return []

    def graded_labels(self, column: str, values: list[Any], where: str) -> list[int] | None:
        """Class ids of a label column that grades rather than names the class; ``None``: not such a column.

        Parameters
        ----------
        column : str
            The label column's name.
        values : list
            The column's cells.
        where : str
            Names the file and column in an error.

        Returns
        -------
        list of int or None
        """
        return None


#: Rows of a text column.
TEXT_INPUT = InputFormat()

_FORMATS: dict[str, InputFormat] = {}


def register_input_format(fmt: InputFormat) -> None:
    """Make ``fmt`` readable from ``fedfm.json`` under its name.

    Parameters
    ----------
    fmt : InputFormat
        The format; a name registered already is refused unless it is the very same format.

    Raises
    ------
    ConfigError
        Another format has that name.
    """
    known = _FORMATS.get(fmt.name)
    if known is not None and known != fmt:
        raise ConfigError(f"an input format named {fmt.name!r} is registered already: choose another name")
    _FORMATS[fmt.name] = fmt


def known_input_formats() -> tuple[str, ...]:
    """The names :func:`input_format` accepts, in the order they were registered.

    Returns
    -------
    tuple of str
    """
    return tuple(_FORMATS)


def input_format(name: str) -> InputFormat:
    """The registered format named ``name`` (a ``fedfm.json``'s ``input_format``).

    Parameters
    ----------
    name : str
        The format's name.

    Returns
    -------
    InputFormat

    Raises
    ------
    ConfigError
        No format has that name (the known ones listed).
    """
    if name not in _FORMATS:
        raise ConfigError(f"unknown input format {name!r}; known formats: {list(_FORMATS)}")
    return _FORMATS[name]


register_input_format(TEXT_INPUT)
