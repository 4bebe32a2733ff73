"""Scoring a causal LM on the medical suite: generative accuracy beside option-likelihood accuracy.

For every question the model answers once, greedily, from FlowerTune's
prompt (:mod:`fedfm.benchmark.medical`, :mod:`fedfm.benchmark.generation`);
the letter or yes/no/maybe read from the answer (:mod:`fedfm.benchmark.extraction`)
is right or wrong, and an answer nothing can be read from is wrong and
counted as ``unparsed``. Accuracy is right answers over questions, as
FlowerTune's ``accuracy_score`` over all rows.

The same questions are also scored as fedfm scores multiple choice in
training and ``fedfm evaluate`` (:meth:`fedfm.tasks.CausalQA.evaluate`): the
option whose text the model finds most likely after fedfm's plain prompt.
That figure needs no parsing, so it is the model's knowledge without its
answer format; the generative one is what FlowerTune's leaderboard reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from fedfm.benchmark.counter import QuestionCounter
from fedfm.benchmark.extraction import extract_decision, extract_letter
from fedfm.benchmark.generation import chat_texts, generate_answers
from fedfm.benchmark.medical import BENCHMARKS, Benchmark, Question, build_prompt, load_questions, suite_benchmarks
from fedfm.benchmark.models import ScoredModel, check_model, load_model

__all__ = ["DEFAULT_MODEL", "MAX_NEW_TOKENS", "AnswerRecord", "BenchmarkScore", "SuiteReport", "evaluate_suite", "score_benchmark"]

#: The model scored when none is named.
DEFAULT_MODEL = "smollm2-135m"
#: Tokens generated per answer: room for "The answer is (B)" or "No, ...", a fraction of a prompt's cost.
MAX_NEW_TOKENS = 8
#: Prompt + option tokens option-likelihood scoring keeps: every abstract whole, as in the generative prompt.
LIKELIHOOD_MAX_LENGTH = 2048
#: Questions per option-likelihood call (each prompt runs on its own; the chunks only pace the counter).
_LIKELIHOOD_CHUNK = 16


@dataclass(frozen=True)
class AnswerRecord:
    """One generated answer.

    Attributes
    ----------
    gold : str
        The right answer (a letter, or PubMedQA's word).
    generation : str
        What the model said.
    extracted : str or None
        What was read from it (``None``: unparsed).
    """

    gold: str
    generation: str
    extracted: str | None

    @property
    def correct(self) -> bool:
        return self.extracted == self.gold


@dataclass(frozen=True)
class BenchmarkScore:
    """One benchmark's figures.

    Attributes
    ----------
    benchmark : str
        ``pubmedqa``, ``medmcqa`` or ``medqa``.
    description : str
        The question set.
    questions : int
        Questions scored.
    available : int
        Questions in the whole set (more than ``questions`` under ``--limit``).
    generative_correct : int
        Generated answers whose letter or word is the right one.
    unparsed : int
        Generated answers nothing could be read from (counted wrong).
    likelihood_correct : int
        Questions whose most likely option is the right one.
    generate_seconds, likelihood_seconds : float
        Wall time of each way of scoring.
    answers : list of AnswerRecord
        Every generated answer, in question order.
    """

    benchmark: str
    description: str
    questions: int
    available: int
    generative_correct: int
    unparsed: int
    likelihood_correct: int
    generate_seconds: float
    likelihood_seconds: float
    answers: list[AnswerRecord] = field(default_factory=list)

    @property
    def generative_accuracy(self) -> float:
        return self.generative_correct / self.questions if self.questions else 0.0

    @property
    def likelihood_accuracy(self) -> float:
        return self.likelihood_correct / self.questions if self.questions else 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON form: counts, accuracies, questions per second, and the answers."""
        data = asdict(self)
        data["answers"] = [{**asdict(a), "correct": a.correct} for a in self.answers]
        data["subset"] = self.questions < self.available
        data["generative_accuracy"] = self.generative_accuracy
        data["likelihood_accuracy"] = self.likelihood_accuracy
        data["generate_questions_per_second"] = self.questions / self.generate_seconds if self.generate_seconds else 0.0
        data["likelihood_questions_per_second"] = (
            self.questions / self.likelihood_seconds if self.likelihood_seconds else 0.0
        )
        return data


@dataclass(frozen=True)
class SuiteReport:
    """A suite's scores and how they were obtained.

    Attributes
    ----------
    suite : str
        ``medical``.
    model : str
        The model as named (alias, folder, exported folder).
    model_kind : str
        ``base`` or ``exported``.
    limit : int or None
        ``--limit``: the first questions of each benchmark only.
    max_new_tokens : int
        Tokens generated per answer.
    batch_size : int
        Prompts per ``generate`` call.
    scores : list of BenchmarkScore
        In FlowerTune's order.
    """

    suite: str
    model: str
    model_kind: str
    limit: int | None
    max_new_tokens: int
    batch_size: int
    scores: list[BenchmarkScore]

    def table(self) -> str:
        """The figures as a plain-text table, accuracies in percent, with the mean of the benchmarks."""
        header = f"{'benchmark':10} {'questions':>13} {'generative':>11} {'unparsed':>9} {'option-likelihood':>18}"
        lines = [f"{self.suite} benchmark, model {self.model} ({self.model_kind})", header, "-" * len(header)]
        for s in self.scores:
            asked = f"{s.questions} of {s.available}" if s.questions < s.available else str(s.questions)
            lines.append(f"{s.benchmark:10} {asked:>13} {100 * s.generative_accuracy:>10.1f}% {s.unparsed:>9} "
                         f"{100 * s.likelihood_accuracy:>17.1f}%")
        if self.scores:
            n = len(self.scores)
            lines.append(f"{'mean':10} {'':>13} {100 * sum(s.generative_accuracy for s in self.scores) / n:>10.1f}% "
                         f"{'':>9} {100 * sum(s.likelihood_accuracy for s in self.scores) / n:>17.1f}%")
        if any(s.questions < s.available for s in self.scores):
            lines.append(f"subset: the first {self.limit} questions of each benchmark (--limit), not the full sets")
        lines.append("generative: greedy zero-shot answer, FlowerTune's prompt, unparsed answers count as wrong; "
                     "option-likelihood: fedfm's most likely option")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The JSON written by ``--out``."""
        return {
            "suite": self.suite, "model": self.model, "model_kind": self.model_kind, "limit": self.limit,
            "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
            "benchmarks": {s.benchmark: s.to_json() for s in self.scores},
        }


def _gold(benchmark: Benchmark, question: Question) -> str:
    return question.options[question.label] if benchmark.answer == "decision" else chr(ord("A") + question.label)


def _extract(benchmark: Benchmark, question: Question, text: str) -> str | None:
    return extract_decision(text) if benchmark.answer == "decision" else extract_letter(text, len(question.options))


def _likelihood_correct(
    scored: ScoredModel, questions: list[Question], *, batch_size: int, counter: QuestionCounter
) -> int:
    """Questions whose most likely option (fedfm's :meth:`CausalQA.evaluate`) is the right one."""
    import datasets

    from fedfm.tasks import CausalQA

    datasets.disable_progress_bars()
    task = CausalQA(length_normalize=scored.length_normalize)
    rows = datasets.Dataset.from_dict({
        "question": [q.question for q in questions], "context": [q.context for q in questions],
        "options": [list(q.options) for q in questions], "label": [q.label for q in questions],
    })
    tokenized = task.tokenize(rows, scored.tokenizer, max_length=LIKELIHOOD_MAX_LENGTH)
    correct = 0
    for start in range(0, len(tokenized), _LIKELIHOOD_CHUNK):
        chunk = tokenized.select(range(start, min(start + _LIKELIHOOD_CHUNK, len(tokenized))))
        metrics = task.evaluate(scored.model, chunk, scored.tokenizer, batch_size=batch_size, device=scored.device)
        correct += round(metrics["accuracy"] * len(chunk))
        counter.advance(len(chunk))
    return correct


def score_benchmark(
    scored: ScoredModel,
    benchmark: Benchmark,
    questions: list[Question],
    *,
    available: int,
    batch_size: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
    counter: QuestionCounter | None = None,
) -> BenchmarkScore:
    """Score one benchmark's questions both ways.

    Parameters
    ----------
    scored : ScoredModel
        From :func:`fedfm.benchmark.load_model`.
    benchmark : Benchmark
        Which set (its prompt and answer kind).
    questions : list of Question
        The questions to ask.
    available : int
        Questions in the whole set.
    batch_size : int
        Prompts per ``generate`` call; sequences per pass for option scoring without a cache.
    max_new_tokens : int
        Tokens generated per answer.
    counter : QuestionCounter, optional
        Shows the progress.

    Returns
    -------
    BenchmarkScore
    """
    counter = counter or QuestionCounter(enabled=False)
    texts = chat_texts(scored.tokenizer, [build_prompt(benchmark, q) for q in questions])
    counter.start(benchmark.name, "generate", len(questions))
    generations = generate_answers(scored.model, scored.tokenizer, texts, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, device=scored.device, on_batch=counter.advance)
    generate_seconds = counter.finish()
    answers = [AnswerRecord(gold=_gold(benchmark, q), generation=g, extracted=_extract(benchmark, q, g))
               for q, g in zip(questions, generations)]
    counter.start(benchmark.name, "likelihood", len(questions))
    likelihood_correct = _likelihood_correct(scored, questions, batch_size=batch_size, counter=counter)
    likelihood_seconds = counter.finish()
    return BenchmarkScore(
        benchmark=benchmark.name, description=benchmark.description, questions=len(questions), available=available,
        generative_correct=sum(a.correct for a in answers), unparsed=sum(a.extracted is None for a in answers),
        likelihood_correct=likelihood_correct, generate_seconds=generate_seconds,
        likelihood_seconds=likelihood_seconds, answers=answers,
    )


def evaluate_suite(
    suite: str = "medical",
    *,
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    limit: int | None = None,
    output: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    data_dir: str | None = None,
    progress: bool = True,
    stream: IO[str] | None = None,
) -> SuiteReport:
    """Score a causal LM on a benchmark suite (``fedfm evaluate --benchmark medical``).

    Everything that can be checked without the model is checked first: the
    suite, ``limit``, ``batch_size``, ``output``, the model's folder, and the
    question files (all loaded before the model).

    Parameters
    ----------
    suite : str
        ``medical``: PubMedQA, MedMCQA and MedQA as in FlowerTune LLM's medical track.
    model : str
        A fedfm alias, a transformers folder, or an exported ``adapter/`` / ``merged/`` folder of a
        causal-qa or instruction-tuning run.
    base_model : str, optional
        The base model's folder of an exported adapter, when it is not found by its name.
    limit : int, optional
        Score only the first ``limit`` questions of each benchmark.
    output : str or Path, optional
        Write :meth:`SuiteReport.to_json` to this ``.json`` file.
    batch_size : int
        Prompts per ``generate`` call.
    max_new_tokens : int
        Tokens generated per answer.
    data_dir : str, optional
        The shared data directory.
    progress : bool
        Show a question counter on ``stream``.
    stream : text stream, optional
        Where the counter goes (default ``sys.stderr``).

    Returns
    -------
    SuiteReport

    Raises
    ------
    BenchmarkError, DataError, ExportError, ModelError, PredictError
        A bad argument, data file, output path or model, before the model loads where it can be known then.
    """
    from fedfm.benchmark.medical import BenchmarkError
    from fedfm.predict import check_output
    from fedfm.predict.output import write_file
    from fedfm.predict.scoring import check_batch_size

    benchmarks = suite_benchmarks(suite)
    check_batch_size(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BenchmarkError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}")
    file = check_output(output, (".json",)) if output is not None else None
    check_model(model, base_model=base_model)
    asked = {b.name: load_questions(b, limit=limit, data_dir=data_dir) for b in benchmarks}
    available = {b.name: len(load_questions(b, data_dir=data_dir)) if limit else len(asked[b.name])
                 for b in benchmarks}
    scored = load_model(model, base_model=base_model)
    counter = QuestionCounter(stream, enabled=progress)
    scores = [score_benchmark(scored, BENCHMARKS[b.name], asked[b.name], available=available[b.name],
                              batch_size=batch_size, max_new_tokens=max_new_tokens, counter=counter)
              for b in benchmarks]
    report = SuiteReport(suite=suite, model=model, model_kind=scored.kind, limit=limit,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, scores=scores)
    if file is not None:
        text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
        write_file(file, lambda f: f.write_text(text, encoding="utf-8"))
    return report
