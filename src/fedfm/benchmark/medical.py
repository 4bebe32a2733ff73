"""The three medical question sets of FlowerTune LLM's medical track, and their zero-shot prompts.

FlowerTune LLM (https://flower.ai/benchmarks/llm-leaderboard, code in
https://github.com/adap/flower, ``benchmarks/flowertune-llm/evaluation/medical/``)
scores a model by greedy zero-shot answers on PubMedQA, MedMCQA and MedQA
(and CareQA, not available offline). Its prompt (``benchmarks.py``) is an
instruction taken from Meditron's evaluation, then the question, then
``The answer is:``; multiple-choice questions are written by
``utils.py::format_example`` as ``Question: ...?`` and one ``A. option`` line
per option. The instructions below are FlowerTune's, word for word (they are
the benchmark's definition, as a dataset's questions are).

The questions come from fedfm's own loaders (:mod:`fedfm.data.qa`):

* PubMedQA: the official 500-question test split (PQA-L, reasoning-required:
  the abstract without its conclusion). FlowerTune reads bigbio's
  ``pubmed_qa_labeled_fold0_source`` test split, the same 500 PMIDs, and
  joins the abstract's sections with line breaks; fedfm's loader joins them
  with spaces.
* MedMCQA: the 4,183-question validation set, as FlowerTune.
* MedQA: the US test set. Only the 5-option variant (1,273 questions, A-E)
  is available offline; FlowerTune uses the 4-option one, whose dropped
  distractor cannot be rebuilt from it, so the figures are not comparable
  (chance: 20 % against 25 %). FlowerTune's MedQA instruction already says
  "from A to E".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedfm.data import load_source
from fedfm.errors import FedfmError

__all__ = [
    "BENCHMARKS", "SUITES", "Benchmark", "BenchmarkError", "Question", "build_prompt", "load_questions",
    "suite_benchmarks",
]


class BenchmarkError(FedfmError, ValueError):
    """A benchmark run was asked for something it cannot do (an unknown suite, a limit below 1, a wrong model)."""


@dataclass(frozen=True)
class Benchmark:
    """One question set and how FlowerTune asks it.

    Attributes
    ----------
    name : str
        ``pubmedqa``, ``medmcqa`` or ``medqa`` (also the fedfm data source).
    split : str
        The :class:`~fedfm.data.SourceData` split holding the questions (``test`` or ``train``).
    answer : str
        ``decision`` (yes / no / maybe) or ``letter`` (an option letter).
    instruction : str
        The sentence put before every question.
    description : str
        What the questions are, for the table and the JSON.
    """

    name: str
    split: Literal["train", "test"]
    answer: Literal["decision", "letter"]
    instruction: str
    description: str


@dataclass(frozen=True)
class Question:
    """One question in fedfm's multiple-choice columns.

    Attributes
    ----------
    question : str
        The question text.
    context : str
        The abstract (PubMedQA), else ``""``.
    options : tuple of str
        The answers (PubMedQA: ``yes``, ``no``, ``maybe``).
    label : int
        The index of the right option.
    """

    question: str
    context: str
    options: tuple[str, ...]
    label: int


_MEDICAL_SCIENCE = (
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, "
    "patient care, and modes of therapy"
)
_GUIDELINES = "Base your answer on the current and standard practices referenced in medical guidelines."

#: The medical suite, in FlowerTune's order.
BENCHMARKS: dict[str, Benchmark] = {
    "pubmedqa": Benchmark(
        name="pubmedqa",
        split="test",
        answer="decision",
        instruction="As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
                    "statement is correct? Answer yes, no, or maybe.",
        description="PubMedQA PQA-L official test split (yes/no/maybe)",
    ),
    "medmcqa": Benchmark(
        name="medmcqa",
        split="train",
        answer="letter",
        instruction="You are a medical doctor answering realworld medical entrance exam questions. Based on your "
                    f"{_MEDICAL_SCIENCE}, answer the following multiple-choice question. Select one correct answer "
                    f"from A to D. {_GUIDELINES}",
        description="MedMCQA validation set (4 options)",
    ),
    "medqa": Benchmark(
        name="medqa",
        split="train",
        answer="letter",
        instruction="You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate "
                    f"your {_MEDICAL_SCIENCE}. Show your ability to apply the knowledge essential for medical "
                    "practice. For the following multiple-choice question, select one correct answer from A to E. "
                    f"{_GUIDELINES}",
        description="MedQA USMLE test set (5 options; FlowerTune: 4)",
    ),
}

#: Suites ``fedfm evaluate --benchmark`` knows, and their question sets.
SUITES: dict[str, tuple[str, ...]] = {"medical": tuple(BENCHMARKS)}


def suite_benchmarks(suite: str) -> list[Benchmark]:
    """The question sets of a suite.

    Raises
    ------
    BenchmarkError
        An unknown suite, answered with the known ones.
    """
    if suite not in SUITES:
        raise BenchmarkError(f"--benchmark must be one of {sorted(SUITES)}, got {suite!r}")
    return [BENCHMARKS[name] for name in SUITES[suite]]


def load_questions(benchmark: Benchmark, *, limit: int | None = None, data_dir: str | None = None) -> list[Question]:
    """A benchmark's questions, in file order; with ``limit``, the first ``limit`` of them.

    Parameters
    ----------
    benchmark : Benchmark
        One of :data:`BENCHMARKS`.
    limit : int, optional
        Keep the first questions only (a subset, the same every time).
    data_dir : str, optional
        The shared data directory (see :func:`fedfm.data.resolve_data_dir`).

    Returns
    -------
    list of Question
    """
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise BenchmarkError(f"--limit must be an integer >= 1 (questions per benchmark), got {limit!r}")
    rows = getattr(load_source(benchmark.name, data_dir=data_dir), benchmark.split)
    if limit is not None and limit < len(rows):
        rows = rows.select(range(limit))
    return [
        Question(question=str(q), context=str(c or ""), options=tuple(o), label=int(label))
        for q, c, o, label in zip(rows["question"], rows["context"], rows["options"], rows["label"])
    ]


def _lettered(question: str, options: tuple[str, ...]) -> str:
    """``Question: ...?`` and one ``A. option`` line per option, as FlowerTune writes a multiple-choice question."""
    text = question.strip()
    if not text.endswith(("?", ".")):
        text += "?"
    listed = "\n".join(f"{chr(ord('A') + k)}. {option}" for k, option in enumerate(options))
    return f"Question: {text}\n\nOptions:\n{listed}"


def build_prompt(benchmark: Benchmark, question: Question) -> str:
    """FlowerTune's prompt for one question: instruction, question, ``The answer is:``.

    The text is the user's message of a chat (see
    :func:`fedfm.benchmark.generation.chat_texts`); PubMedQA's question follows its abstract.

    Parameters
    ----------
    benchmark : Benchmark
        Whose instruction and question layout to use.
    question : Question
        The question.

    Returns
    -------
    str
    """
    if benchmark.answer == "decision":
        body = f"{question.context.strip()}\n{question.question.strip()}"
    else:
        body = _lettered(question.question, question.options)
    return f"{benchmark.instruction}\n{body}\nThe answer is:\n"
