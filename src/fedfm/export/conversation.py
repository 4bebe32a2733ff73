"""The input format of an instruction-tuned model: a row of a colleague's file as a conversation to answer.

An exported instruction-tuning folder records ``input_format = "chat"``
(:data:`CHAT_INPUT`) and ``chat_template = true`` in its ``fedfm.json``: its
prompts are the conversation written with the tokenizer's chat template, the
one saved in the folder (:func:`carry_chat_template` makes sure there is one).
A row of a file for ``fedfm predict`` / ``fedfm evaluate`` is one of

- ``prompt``: one user turn;
- ``messages``: a list of ``{"role", "content"}`` turns (in a CSV cell, as
  JSON); a last assistant turn is the reference answer, the rest the prompt;
- Alpaca ``instruction`` (+ ``input``, + ``output`` as the reference answer),
  turned into turns as training turns them
  (:func:`fedfm.data.instruction.alpaca_messages`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfm.data.base import INSTRUCTION
from fedfm.data.formats import InputFormat, register_input_format
from fedfm.data.instruction import alpaca_messages, check_messages, messages_cell
from fedfm.errors import DataError

#: The columns a row may give its conversation in, in the order they are looked for.
PROMPT_COLUMNS = ("messages", "prompt", "instruction")
#: Stands in for the answer still to come, so a prompt is checked by the rules of training rows.
_ANSWER_SLOT = {"role": "assistant", "content": "(the answer to generate)"}


@dataclass(frozen=True)
class ConversationInput(InputFormat):
    """Rows as conversations written with the model's chat template (instruction tuning)."""

    name: str = "chat"
    kind: str = INSTRUCTION

    def describe(self, *, text_column: str, context: str, fixed_options: list[str]) -> str:
        return ("a conversation (`messages`: user and assistant turns; or Alpaca `instruction`/`input`) written "
                "with the tokenizer's chat template, which this folder's tokenizer carries; the model answers "
                "after the template's generation prompt")

    def example_text(self) -> str:
        return "What are the symptoms of asthma?"

    def columns_of(self, present: list[str]) -> str | None:
        """The column a file gives its conversations in (:data:`PROMPT_COLUMNS`), or None when it has none.

        Parameters
        ----------
        present : list of str
            The file's columns.

        Returns
        -------
        str or None
        """
        return next((c for c in PROMPT_COLUMNS if c in present), None)

    def conversation(self, row: Mapping[str, Any], where: str) -> tuple[list[dict[str, str]], str | None]:
        """One row as the turns to answer and, when the row has one, the reference answer.

        The row's conversation is in the first of :data:`PROMPT_COLUMNS` it
        fills (a JSON-lines file may mix the three kinds of row).

        Parameters
        ----------
        row : Mapping[str, Any]
            The row's cells by column.
        where : str
            Names the file and row in an error.

        Returns
        -------
        tuple
            ``(prompt turns, reference answer or None)``; the turns never end with the assistant's.

        Raises
        ------
        DataError
            Not a conversation by the rules training rows follow (:func:`fedfm.data.instruction.check_messages`),
            or none of the columns filled.
        """
        column = next((c for c in PROMPT_COLUMNS if not _blank(row.get(c))), None)
        if column is None:
            raise DataError(f"{where} fills none of the columns {list(PROMPT_COLUMNS)}")
        if column == "messages":
            turns = check_messages(messages_cell(row["messages"], where) + [_ANSWER_SLOT], where)[:-1]
            if turns[-1]["role"] == "assistant":
                return turns[:-1], turns[-1]["content"]
            return turns, None
        if column == "prompt":
            return check_messages([{"role": "user", "content": row["prompt"]}, _ANSWER_SLOT], where)[:-1], None
        for name in ("instruction", "input", "output"):
            value = row.get(name)
            if name != "instruction" and _blank(value):
                continue
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: `{name}` must be non-empty text, got {value!r}")
        reference = row.get("output")
        turns = alpaca_messages(row["instruction"], None if _blank(row.get("input")) else row["input"],
                                _ANSWER_SLOT["content"])
        return turns[:-1], None if _blank(reference) else str(reference)


def _blank(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)  # a cell a row of another kind left empty
    return value is None or (isinstance(value, str) and not value.strip())


#: Conversations written with the tokenizer's chat template.
CHAT_INPUT = ConversationInput()
register_input_format(CHAT_INPUT)


def carry_chat_template(folder: Path) -> bool:
    """Give an exported folder's tokenizer the chat template training used, if it has none of its own.

    Training writes conversations with the tokenizer's template, or
    :data:`fedfm.tasks.instruction_tuning.PLAIN_TEMPLATE` when it has none;
    saved into the folder, that template makes ``tokenizer.apply_chat_template``
    prompt the model as it was trained, with transformers alone.

    Parameters
    ----------
    folder : Path
        An exported ``adapter/`` or ``merged/`` folder with its tokenizer.

    Returns
    -------
    bool
        Whether the folder's tokenizer was given the plain template.
    """
    from transformers import AutoTokenizer

    from fedfm.tasks.instruction_tuning import PLAIN_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = PLAIN_TEMPLATE
    tokenizer.save_pretrained(folder)
    return True
