"""Benchmarks that score a causal LM as public leaderboards do.

``medical``: FlowerTune LLM's medical track (zero-shot greedy answers on
PubMedQA, MedMCQA and MedQA, accuracy), beside fedfm's option-likelihood
accuracy on the same questions. ``fedfm evaluate --benchmark medical`` runs it.
"""

from __future__ import annotations

from fedfm.benchmark.evaluation import (
    DEFAULT_MODEL,
    MAX_NEW_TOKENS,
    AnswerRecord,
    BenchmarkScore,
    SuiteReport,
    evaluate_suite,
    score_benchmark,
)
from fedfm.benchmark.extraction import DECISIONS, extract_decision, extract_letter
from fedfm.benchmark.generation import chat_texts, generate_answers
from fedfm.benchmark.medical import (
    BENCHMARKS,
    SUITES,
    Benchmark,
    BenchmarkError,
    Question,
    build_prompt,
    load_questions,
    suite_benchmarks,
)
from fedfm.benchmark.models import ScoredModel, check_model, load_model

__all__ = [
    "BENCHMARKS", "DECISIONS", "DEFAULT_MODEL", "MAX_NEW_TOKENS", "SUITES", "AnswerRecord", "Benchmark",
    "BenchmarkError", "BenchmarkScore", "Question", "ScoredModel", "SuiteReport", "build_prompt", "chat_texts",
    "check_model", "evaluate_suite", "extract_decision", "extract_letter", "generate_answers", "load_model",
    "load_questions", "score_benchmark", "suite_benchmarks",
]
