"""Multiple-choice files of one's own: CSV, JSON-lines or Parquet rows of a question, its options and its answer.

Read for ``model.task = "causal-qa"`` (rows of kind ``multiple-choice``) by
the generic file sources (``data.dataset = "csv"``, ``"jsonl"`` or
``"parquet"``). A row has

- ``question``: the question's text;
- its options: an ``options`` column holding a list of at least two texts (in
  a CSV, a JSON list such as ``["yes", "no"]``), or letter columns ``A``,
  ``B``, ``C``, ... (as a spreadsheet holds them; empty cells at the end
  leave a row fewer options);
- ``answer`` (else ``label``; ``data.label-column`` names another column):
  the right option's letter (``"C"``), its index from 0 (``2``) or its exact
  text; a letter that is also another option's text is refused as ambiguous;
- ``context`` (optional): text the question is asked about.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import datasets

from fedfm.data.base import MULTIPLE_CHOICE, SourceData, SourceRequest
from fedfm.data.files import ROWS_COUNTED, check_texts, normalize_label
from fedfm.errors import DataError

#: Option letters: an option's name, the column that holds it in letter layout, and an answer's letter.
LETTERS = string.ascii_uppercase
#: The answer columns read, in order, unless `data.label-column` names another.
ANSWER_COLUMNS = ("answer", "label")
#: The list-of-options column.
OPTIONS = "options"
#: How a row's answer may be written, for messages.
ANSWER_FORMS = "an option's letter (A, B, ...), its index from 0, or its exact text"


def _letter_columns(present: list[str]) -> list[str]:
    """``A``, ``B``, ... as far as the file has them without a gap."""
    columns: list[str] = []
    for letter in LETTERS:
        if letter not in present:
            break
        columns.append(letter)
    return columns


def _is_blank(value: Any) -> bool:
    return normalize_label(value) is None


def _text(value: str | float) -> str:
    # A CSV column of numbers with an empty cell is read as floats: the option written 3 arrives as 3.0.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)


def _option_texts(values: list[Any], where: str) -> list[str]:
    """A row's options as texts: strings stripped, numbers as written; at least two, none blank, none repeated."""
    if len(values) < 2:
        raise DataError(f"{where}: a question needs at least two options, got {len(values)} ({values!r})")
    if len(values) > len(LETTERS):
        raise DataError(f"{where}: at most {len(LETTERS)} options (A to Z), got {len(values)}")
    if any(_is_blank(v) for v in values):
        raise DataError(f"{where}: option {LETTERS[next(i for i, v in enumerate(values) if _is_blank(v))]} is empty "
                        f"({values!r})")
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise DataError(f"{where}: options must be texts, got {values!r}")
    texts = [_text(v) for v in values]
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise DataError(f"{where}: option(s) {repeated} appear twice; a question's options must differ")
    return texts


def _listed_options(value: Any, where: str) -> list[str]:
    """The ``options`` cell: a list, or (CSV) a JSON list in a string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where} must hold a list of options; in a CSV write it as JSON, e.g. "
                            f"[\"yes\", \"no\"], got {value[:60]!r}") from None
    if not isinstance(value, list):
        raise DataError(f"{where} must hold a list of options (in a CSV, as JSON: [\"yes\", \"no\"]), got {value!r}")
    return _option_texts(value, where)


def _lettered_options(cells: list[Any], where: str) -> list[str]:
    """A row's letter columns: empty cells at the end dropped, a gap before a filled one refused."""
    count = len(cells)
    while count and _is_blank(cells[count - 1]):
        count -= 1
    gaps = [LETTERS[i] for i in range(count) if _is_blank(cells[i])]
    if gaps:
        raise DataError(f"{where}: column(s) {gaps} are empty before a filled one; options fill the letter columns "
                        f"from A without a gap")
    return _option_texts(cells[:count], where)


def answer_index(value: Any, options: list[str], where: str) -> int:
    """The index of a row's answer among its options.

    Parameters
    ----------
    value : Any
        The answer cell: a letter (``"C"``), an index from 0 (``2``) or an option's exact text.
    options : list of str
        The row's options.
    where : str
        File, row and column, for the message.

    Returns
    -------
    int
        0 .. ``len(options) - 1``.

    Raises
    ------
    DataError
        No answer, an index out of range, a text that is no option, or a letter that is another option's text.
    """
    letters = list(LETTERS[: len(options)])
    answer = normalize_label(value)
    if answer is None:
        raise DataError(f"{where} has no answer; write {ANSWER_FORMS}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and float(answer).is_integer():
        if 0 <= int(answer) < len(options):
            return int(answer)
        raise DataError(f"{where}: answer index {answer!r} is outside 0..{len(options) - 1} (indices count the "
                        f"{len(options)} options from 0)")
    if isinstance(answer, str):
        by_letter = letters.index(answer) if answer in letters else None
        by_text = options.index(answer) if answer in options else None
        if by_letter is not None and by_text is not None and by_letter != by_text:
            raise DataError(f"{where}: answer {answer!r} is both the letter of option {by_letter} and the text of "
                            f"option {by_text}; write the index ({by_letter} or {by_text}) instead")
        found = by_letter if by_letter is not None else by_text
        if found is not None:
            return found
    raise DataError(f"{where}: answer {answer!r} is not among the options {options}; write {ANSWER_FORMS}")


def choice_file(request: SourceRequest, table: datasets.Dataset, path: Path) -> SourceData:
    """A multiple-choice file's table in the standard ``question``/``context``/``options``/``label`` columns.

    Parameters
    ----------
    request : SourceRequest
        ``label_column`` names the answer column when it is not the default ``label``.
    table : datasets.Dataset
        The file as read.
    path : Path
        The file, for messages.

    Returns
    -------
    SourceData
        Train rows only; ``label_names`` are the option letters up to the most options a row has.
        Other columns (a hospital column, ids) are kept.
    """
    present = table.column_names
    if len(table) == 0:
        raise DataError(f"{path} has no rows")
    letter_columns = _letter_columns(present)
    wanted = (request.label_column,) if request.label_column != "label" else ANSWER_COLUMNS
    answer_column = next((c for c in wanted if c in present), None)
    problems = []
    if "question" not in present:
        problems.append("no column 'question'")
    if OPTIONS in present and len(letter_columns) >= 2:
        problems.append(f"both an {OPTIONS!r} column and letter columns {letter_columns}; keep one of them")
    elif OPTIONS not in present and len(letter_columns) < 2:
        problems.append(f"no {OPTIONS!r} column (a list of the answers) nor letter columns 'A', 'B', ...")
    if answer_column is None:
        problems.append(f"no answer column {' or '.join(repr(c) for c in wanted)}")
    if problems:
        raise DataError(f"{path} has {'; '.join(problems)}; columns present: {present} (multiple-choice rows: "
                        f"question, options or A/B/C..., answer, optional context)")
    check_texts(list(table["question"]), where=f"{path} column 'question'")
    contexts = list(table["context"]) if "context" in present else [""] * len(table)
    not_text = [i for i, c in enumerate(contexts) if not _is_blank(c) and not isinstance(c, str)]
    if not_text:
        raise DataError(f"{path} column 'context': row {not_text[0]} holds {contexts[not_text[0]]!r}, not text "
                        f"({ROWS_COUNTED})")
    options: list[list[str]] = []
    labels: list[int] = []
    for row, record in enumerate(table):
        if OPTIONS in present:
            texts = _listed_options(record[OPTIONS], f"{path} row {row} column {OPTIONS!r} ({ROWS_COUNTED})")
        else:
            texts = _lettered_options([record[c] for c in letter_columns],
                                      f"{path} row {row} columns {letter_columns} ({ROWS_COUNTED})")
        options.append(texts)
        labels.append(answer_index(record[answer_column], texts,
                                   f"{path} row {row} column {answer_column!r} ({ROWS_COUNTED})"))
    rows = datasets.Dataset.from_dict({
        "question": [str(q).strip() for q in table["question"]],
        "context": ["" if _is_blank(c) else str(c).strip() for c in contexts],
        OPTIONS: options,
        "label": labels,
    })
    used = {*rows.column_names, str(answer_column), *letter_columns}
    kept = [c for c in present if c not in used]
    if kept:
        rows = datasets.concatenate_datasets([table.select_columns(kept), rows], axis=1)
    return SourceData(
        name=request.name,
        kind=MULTIPLE_CHOICE,
        train=rows,
        test=None,
        label_names=list(LETTERS[: max(len(o) for o in options)]),
        natural_column=None,
    )
