"""Instruction/response rows for generative fine-tuning: Medical Meadow, and files of one's own.

Every row becomes one conversation in the ``messages`` column, a list of
``{"role": ..., "content": ...}`` turns as the tokenizers' chat templates take
them (roles ``system``, ``user``, ``assistant``; the last turn the assistant's).
Two ways of writing such data are read, the two the ecosystem uses:

- Alpaca rows: ``instruction``, ``input`` (may be empty or absent) and
  ``output``. The user's turn is the instruction, then a blank line and the
  input when there is one; the assistant's turn is the output.
- Chat rows: ``messages``, a list of turns (in a CSV cell, as a JSON string).

The ``label`` column is a topic id (for stratified splits and the Dirichlet
partitioner): the file's ``data.label-column`` when it has one, else one topic
for every row. A ``group`` column, when present, keeps rows together: rows of
one group never straddle a hospital's train and held-out rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from fedfm.data.base import INSTRUCTION, SourceData, SourceRequest
from fedfm.data.files import check_utf8, encode_labels, read_json
from fedfm.data.paths import data_file
from fedfm.errors import DataError

#: Roles a turn may have.
ROLES = ("system", "user", "assistant")
#: The column that keeps rows together in every split (a file's own; the built-in set's condition).
GROUP_COLUMN = "group"
#: Alpaca columns (``input`` optional).
ALPACA_COLUMNS = ("instruction", "input", "output")
#: Rows named in a message before "and N more".
_SHOWN = 5

MEDICAL_MEADOW = "medical_meadow_wikidoc_patient"
_MEDICAL_MEADOW_FILE = "medical_meadow_small.json"
#: What a WikiDoc patient-information question asks, by its wording; the topics of the built-in set.
_QUESTION_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("symptoms", re.compile(r"^what are (?:the )?symptoms of (?P<c>.+?)\s*\?*$", re.IGNORECASE)),
    ("causes", re.compile(r"^what (?:causes|are (?:the )?causes(?: of)?) (?P<c>.+?)\s*\?*$", re.IGNORECASE)),
    ("urgent-care", re.compile(r"^when to seek urgent medical care when I have (?P<c>.+?)\s*\?*$", re.IGNORECASE)),
    ("outlook", re.compile(r"^what to expect if I have (?P<c>.+?)\s*\(outlook/prognosis\)\s*\?*$", re.IGNORECASE)),
    ("risk", re.compile(r"^who is at (?:highest )?risk (?:for|of) (?P<c>.+?)\s*\?*$", re.IGNORECASE)),
)
MEDICAL_MEADOW_TOPICS = [kind for kind, _ in _QUESTION_KINDS] + ["other"]
#: One condition in this many (by a hash of its name, so the split never moves) is the held-out test set.
_TEST_EVERY = 10


def alpaca_messages(instruction: str, input_text: str | None, output: str) -> list[dict[str, str]]:
    """One Alpaca row as a user turn and an assistant turn.

    Parameters
    ----------
    instruction : str
        The task (``"Answer this question truthfully"``).
    input_text : str or None
        The input it applies to (the question), or empty/None.
    output : str
        The response.

    Returns
    -------
    list of dict
        ``[{"role": "user", ...}, {"role": "assistant", ...}]``.
    """
    prompt = instruction.strip()
    if input_text and input_text.strip():
        prompt = f"{prompt}\n\n{input_text.strip()}" if prompt else input_text.strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}]


def messages_cell(value: Any, where: str) -> list[Any]:
    """A ``messages`` cell as a list: JSON lines give lists, Parquet arrays, a CSV cell JSON text.

    Raises
    ------
    DataError
        Text that is not JSON, or anything but a list.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: `messages` is text that is not JSON ({exc.msg}); write a JSON list of "
                            f'{{"role": ..., "content": ...}} turns') from exc
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return list(value)
    raise DataError(f"{where}: `messages` must be a list of {{\"role\", \"content\"}} turns, got "
                    f"{type(value).__name__}")


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation checked and normalized: a list of ``{role, content}`` turns ending with the assistant's.

    Parameters
    ----------
    value : Any
        A list of turns, or its JSON text.
    where : str
        Names the file and row in an error.

    Returns
    -------
    list of dict
        The turns with only ``role`` and ``content``.

    Raises
    ------
    DataError
        Not a list of turns; a role other than system/user/assistant; an empty
        content; no user turn; the last turn not the assistant's.
    """
    value = messages_cell(value, where)
    if not value:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{\"role\", \"content\"}} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping) or turn.get("role") not in ROLES:
            role = turn.get("role") if isinstance(turn, Mapping) else turn
            raise DataError(f"{where}: turn {i} must have a `role` in {list(ROLES)}, got {role!r}")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {i} ({turn['role']}) has no text in `content`")
        turns.append({"role": str(turn["role"]), "content": content})
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn must be the assistant's (the response to learn), got "
                        f"{turns[-1]['role']!r}")
    if not any(t["role"] == "user" for t in turns):
        raise DataError(f"{where}: a conversation needs a user turn")
    return turns


def instruction_file(request: SourceRequest, table: datasets.Dataset, path: Path) -> SourceData:
    """A file's table of Alpaca or chat rows as instruction rows (the reader of ``data.dataset = csv|jsonl|parquet``).

    Parameters
    ----------
    request : SourceRequest
        ``label_column`` names an optional topic column; ``label_names`` its topics in id order.
    table : datasets.Dataset
        The file's rows.
    path : Path
        The file, for messages.

    Returns
    -------
    SourceData
        Instruction rows (``messages``, ``label``; ``group`` when the file has one), without a test split.
    """
    present = table.column_names
    if len(table) == 0:
        raise DataError(f"{path} has no rows")
    if "messages" in present:
        conversations = [check_messages(m, f"{path} row {i}") for i, m in enumerate(table["messages"])]
    elif "instruction" in present and "output" in present:
        inputs = table["input"] if "input" in present else [""] * len(table)
        conversations = []
        for i, (instruction, input_text, output) in enumerate(zip(table["instruction"], inputs, table["output"])):
            where = f"{path} row {i}"
            for column, value in (("instruction", instruction), ("output", output)):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: `{column}` must be non-empty text, got {value!r}")
            if input_text is not None and not isinstance(input_text, str):
                raise DataError(f"{where}: `input` must be text (or empty), got {type(input_text).__name__}")
            conversations.append(alpaca_messages(instruction, input_text, output))
    else:
        raise DataError(f"{path} has neither a `messages` column (chat turns) nor `instruction` and `output` "
                        f"columns (Alpaca rows, `input` optional); columns present: {present}")
    if request.label_column in present:
        labels, topics = encode_labels(list(table[request.label_column]), request.label_names,
                                       where=f"{path} column {request.label_column!r}")
    else:
        labels, topics = [0] * len(table), ["all"]
    columns: dict[str, list[Any]] = {"messages": conversations, "label": labels}
    if GROUP_COLUMN in present:
        columns[GROUP_COLUMN] = [str(g) for g in table[GROUP_COLUMN]]
    # Other columns stay (a site column to partition by: `data.partitioner = "natural"`, `data.partition-column`).
    read = {"messages", *ALPACA_COLUMNS, "label", request.label_column, GROUP_COLUMN}
    columns.update({c: list(table[c]) for c in present if c not in read})
    return SourceData(
        name=request.name,
        kind=INSTRUCTION,
        train=datasets.Dataset.from_dict(columns),
        test=None,
        label_names=topics,
        group_column=GROUP_COLUMN if GROUP_COLUMN in present else None,
    )


def question_kind(question: str) -> tuple[str, str | None]:
    """What a WikiDoc patient-information question asks, and about which condition.

    Parameters
    ----------
    question : str
        The question, e.g. ``"What causes Allergy?"``.

    Returns
    -------
    tuple
        ``(topic, condition)``: a topic of :data:`MEDICAL_MEADOW_TOPICS` and the
        condition's name in lower case, or ``("other", None)`` for a wording
        not recognized.
    """
    text = " ".join(question.split())
    for kind, pattern in _QUESTION_KINDS:
        match = pattern.match(text)
        if match:
            return kind, " ".join(match.group("c").replace("%27", "'").split()).lower()
    return "other", None


def load_medical_meadow(request: SourceRequest) -> SourceData:
    """Medical Meadow's WikiDoc patient-information pairs (5,942, Alpaca format), split by condition.

    The questions come in runs about one condition ("What are the symptoms of
    Asthma?", "What causes Asthma?", "When to seek urgent medical care when I
    have Asthma?", ...); a row whose wording names no condition belongs to the
    run it sits in. Each run is one ``group``: near-duplicate questions about
    one condition stay on one side of every split. The test split (the global
    held-out set) is every condition whose name hashes to 0 modulo 10 (about a
    tenth of the rows), so it is the same on every machine and for every seed.
    ``label`` is what the question asks (:data:`MEDICAL_MEADOW_TOPICS`), the
    topic the Dirichlet partitioner skews.

    Parameters
    ----------
    request : SourceRequest
        Its data directory holds ``medical_meadow_wikidoc_patient/medical_meadow_small.json``.

    Returns
    -------
    SourceData
        Instruction rows with ``messages``, ``label``, ``group`` (the condition run) and ``question``.
    """
    path = data_file(request.data_dir, request.data_dir_origin, f"{MEDICAL_MEADOW}/{_MEDICAL_MEADOW_FILE}")
    check_utf8(path)
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must hold a JSON list of Alpaca rows")
    columns: dict[str, dict[str, list[Any]]] = {
        side: {"messages": [], "label": [], "group": [], "question": []} for side in ("train", "test")
    }
    condition, run = "", 0
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or not all(isinstance(record.get(k), str) for k in ALPACA_COLUMNS):
            raise DataError(f"{path} row {i}: expected an object with text `instruction`, `input` and `output`")
        kind, named = question_kind(record["input"])
        if named is not None and named != condition:
            condition, run = named, run + 1
        side = "test" if _held_out(condition) else "train"
        target = columns[side]
        target["messages"].append(alpaca_messages(record["instruction"], record["input"], record["output"]))
        target["label"].append(MEDICAL_MEADOW_TOPICS.index(kind))
        target["group"].append(f"{run:04d} {condition}")
        target["question"].append(record["input"].strip())
    return SourceData(
        name=request.name,
        kind=INSTRUCTION,
        train=datasets.Dataset.from_dict(columns["train"]),
        test=datasets.Dataset.from_dict(columns["test"]),
        label_names=list(MEDICAL_MEADOW_TOPICS),
        group_column=GROUP_COLUMN,
    )


def _held_out(condition: str) -> bool:
    digest = hashlib.sha256(condition.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % _TEST_EVERY == 0

