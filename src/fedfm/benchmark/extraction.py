"""Reading the answer out of a generated text: an option letter, or yes / no / maybe.

FlowerTune LLM's medical evaluation (``benchmarks/flowertune-llm/evaluation/
medical/utils.py::format_answer`` in https://github.com/adap/flower) lowercases
the generation, keeps the line after a ``"\\n##"`` marker when there is one,
turns every character other than a letter or digit into a space, and then
takes the first character for a multiple-choice question (or the whole text,
``yes`` / ``no``, for PubMedQA). Anything else is compared with the gold
answer as it is, so it counts as wrong. Its generations are one or two tokens
long (``max_new_tokens`` is the gold answer's length), so the first
character is the answer.

fedfm lets the model say a few more tokens, so the rules here are the same
idea made safe for a sentence:

* multiple choice: the text's first token, when it is a bare letter
  (``B``, ``B.``, ``(B)``, ``b)``; never the article of ``A patient ...``);
  else the letter after ``answer is`` / ``answer:`` / ``option`` / ``choice``
  (``The answer is (B)``, ``Answer: C``); else a letter in parentheses when
  the text names exactly one. Only the question's own letters count: ``E``
  for a four-option question is not an answer.
* PubMedQA: the first word when it is ``yes``, ``no`` or ``maybe`` (``No, the
  study ...``; FlowerTune's ``yesyes`` collapses the same way), else the word
  after ``answer is`` / ``answer:``. ``maybe`` is an answer here; FlowerTune's
  list omits it, which only its exact-match fallback makes up for.

Every function returns ``None`` for a text it cannot read; the caller counts
that as a wrong answer and reports how many there were.
"""

from __future__ import annotations

import re

__all__ = ["DECISIONS", "extract_decision", "extract_letter"]

#: PubMedQA's answers, in fedfm's label order (:data:`fedfm.data.qa.PUBMEDQA_OPTIONS`).
DECISIONS = ("yes", "no", "maybe")

# A bare letter opening the text: optionally bracketed, then punctuation, a line end or the text's end.
# A following space alone is not enough ("A patient ...", "a lot"), unless a line end comes right after.
_LEADING_LETTER = re.compile(r"^[\s*\"'`]*[(\[]?([A-Za-z])(?:[)\].:,;*]|\s*$|\s*\n)")
# "... answer is (B)", "Answer: C", "the correct option is D", "choice B"; the letter upper case or bracketed.
_PHRASE_LETTER = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|will\s+be))?\s*[:=]?\s*(?i:option\s+)?"
    r"(?:\(([A-Za-z])\)|\b([A-Z])\b(?!['’]))"
)
_BRACKETED_LETTER = re.compile(r"\(([A-Za-z])\)")
_PHRASE_DECISION = re.compile(r"\banswer(?:\s+(?:is|would\s+be|will\s+be))?\s*[:=]?\s*[\"'(]?(yes|no|maybe)\b")


def _focus(text: str) -> str:
    """The part of a generation that holds the answer: the line after FlowerTune's ``"\\n##"`` marker, if any."""
    if "\n##" in text:
        line = text.split("\n##", 1)[1].split("\n", 1)[0]
        return line.lstrip("#").strip()
    return text.strip()


def extract_letter(text: str, n_options: int) -> str | None:
    """The option letter a generated answer names, or ``None``.

    Parameters
    ----------
    text : str
        The model's generation (special tokens already removed).
    n_options : int
        How many options the question has; only ``A`` .. its last letter count.

    Returns
    -------
    str or None
        An upper-case letter, or ``None`` when the text names no letter of the question.

    Examples
    --------
    >>> extract_letter("B. Venturi mask", 4), extract_letter("The answer is (c)", 4)
    ('B', 'C')
    >>> extract_letter("A patient with fever", 4) is None, extract_letter("E", 4) is None
    (True, True)
    """
    valid = {chr(ord("A") + k) for k in range(n_options)}
    focus = _focus(text)
    leading = _LEADING_LETTER.match(focus)
    if leading:
        letter = leading.group(1).upper()
        return letter if letter in valid else None
    phrase = _PHRASE_LETTER.search(focus)
    if phrase:
        letter = (phrase.group(1) or phrase.group(2)).upper()
        return letter if letter in valid else None
    bracketed = {m.upper() for m in _BRACKETED_LETTER.findall(focus)}
    if len(bracketed) == 1:
        letter = bracketed.pop()
        return letter if letter in valid else None
    return None


def extract_decision(text: str) -> str | None:
    """PubMedQA's ``yes`` / ``no`` / ``maybe`` in a generated answer, or ``None``.

    Parameters
    ----------
    text : str
        The model's generation.

    Returns
    -------
    str or None
        One of :data:`DECISIONS`, or ``None`` when the text gives none of them first or after "answer is".

    Examples
    --------
    >>> extract_decision("No, the study shows ..."), extract_decision("The answer is: maybe.")
    ('no', 'maybe')
    >>> extract_decision("The results are not equal") is None
    True
    """
    plain = re.sub(r"\s+", " ", re.sub(r"[^a-z0-9:]", " ", _focus(text).lower())).strip()
    first = plain.split(" ", 1)[0].rstrip(":") if plain else ""
    for decision in DECISIONS:
        if first == decision or first == decision * 2:  # "yesyes": a word repeated without a space
            return decision
    phrase = _PHRASE_DECISION.search(plain)
    return phrase.group(1) if phrase else None
