"""PubMedQA by generation after federated instruction tuning on its training questions.

One route to a generative PubMedQA score above the majority class (55.2 %
"yes" on the official 500-question test set): the 500 official training
questions (PQA-L), written exactly as FlowerTune's medical evaluation asks
them (:func:`fedfm.benchmark.medical.build_prompt`: its instruction, the
abstract without its conclusion, the question, ``The answer is:``) with the
answer ``yes``, ``no`` or ``maybe`` as the assistant's turn, are instruction-
tuned across 4 hospitals (IID). The exported round is chosen by the
hospitals' validation loss (rows held out of their training rows), never by
test scores. Then the base model and the federated adapter answer the 500
test questions by greedy generation (FlowerTune's prompt and answer
extraction, ``fedfm evaluate --benchmark medical``'s code).

Usage::

    python benchmarks/pubmedqa_generative.py            # ~1 h 15 min on 2 CPU cores
    python benchmarks/pubmedqa_generative.py --limit 50 --set federation.num-rounds=1   # a smoke test

Writes ``<out>/pubmedqa-generative.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _environment, device_info  # benchmarks/ is not a package: found through sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
#: PubMedQA's majority class on the official test set ("yes": 276 of 500).
MAJORITY = 0.552

SETTINGS: dict[str, Any] = {
    "model.name": "smollm2-135m",
    "model.task": "instruction-tuning",
    "model.max-length": 512,
    "model.dtype": "bfloat16",
    "data.dataset": "jsonl",
    "data.partitioner": "iid",
    "data.num-hospitals": 4,
    "data.test-fraction": 0.1,
    "data.validation-fraction": 0.15,
    "train.batch-size": 8,
    "train.eval-batch-size": 8,
    "train.learning-rate": 5e-4,
    "train.local-epochs": 1,
    "federation.num-rounds": 2,
    "federation.min-hospitals": 4,
    "federation.select-best": "validation",
    "federation.central-evaluation": False,
}


def training_file(path: Path) -> int:
    """PubMedQA's official training questions as chat rows with FlowerTune's prompt; returns how many."""
    from fedfm.benchmark.medical import BENCHMARKS, Question, build_prompt
    from fedfm.data import load_source

    train = load_source("pubmedqa").train
    with path.open("w", encoding="utf-8") as handle:
        for row in train:
            question = Question(question=row["question"], context=row["context"], options=tuple(row["options"]),
                                label=int(row["label"]))
            messages = [{"role": "user", "content": build_prompt(BENCHMARKS["pubmedqa"], question)},
                        {"role": "assistant", "content": row["options"][row["label"]]}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return len(train)


def answer(model: str, limit: int | None, batch_size: int) -> dict[str, Any]:
    """Greedy answers of ``model`` to PubMedQA's test questions, scored as FlowerTune scores them."""
    from fedfm.benchmark.evaluation import _extract, _gold
    from fedfm.benchmark.generation import chat_texts, generate_answers
    from fedfm.benchmark.medical import BENCHMARKS, build_prompt, load_questions
    from fedfm.benchmark.models import load_model

    benchmark = BENCHMARKS["pubmedqa"]
    questions = load_questions(benchmark, limit=limit)
    scored = load_model(model)
    started = time.perf_counter()
    texts = chat_texts(scored.tokenizer, [build_prompt(benchmark, q) for q in questions])
    generations = generate_answers(scored.model, scored.tokenizer, texts, batch_size=batch_size, max_new_tokens=8,
                                   device=scored.device)
    extracted = [_extract(benchmark, q, g) for q, g in zip(questions, generations)]
    gold = [_gold(benchmark, q) for q in questions]
    correct = sum(e == g for e, g in zip(extracted, gold))
    return {
        "questions": len(questions), "accuracy": correct / len(questions),
        "unparsed": sum(e is None for e in extracted),
        "answered": dict(collections.Counter(str(e) for e in extracted)),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="PubMedQA by generation after federated SFT on its training set.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--limit", type=int, default=None, help="score the first N test questions only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfm-pubmedqa-generative"))
    parser.add_argument("--reuse", action="store_true", help="score the finished run in --work instead of training")
    args = parser.parse_args(argv)
    _environment()
    import fedfm
    from fedfm.config import RunConfig, parse_override

    args.work.mkdir(parents=True, exist_ok=True)
    rows = training_file(args.work / "pubmedqa-train-chat.jsonl")
    config = RunConfig().replace(**{**SETTINGS, "data.path": str(args.work / "pubmedqa-train-chat.jsonl"),
                                    **dict(parse_override(text) for text in args.overrides)})
    started = time.perf_counter()
    if args.reuse and (args.work / "run" / "summary.json").is_file():
        run = fedfm.RunResult.load(args.work / "run")  # score a finished run again
    else:
        run = fedfm.run(config, out=args.work / "run", overwrite=True)
    train_seconds = float(run.summary.get("wall_seconds") or 0) if args.reuse else time.perf_counter() - started
    scores = {"base (zero-shot)": answer(config.model.name, args.limit, args.batch_size),
              "federated SFT": answer(str(run.adapter_dir), args.limit, args.batch_size)}
    selection = run.summary.get("selection") or {}
    report = {
        "benchmark": "pubmedqa-generative",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "training_questions": rows,
        "exported_round": selection.get("exported_round"),
        "validation_loss_per_round": [e.get("validation", {}).get("loss") for e in run.history],
        "train_seconds": round(train_seconds, 1),
        "majority_class": MAJORITY,
        "scores": scores,
        "settings": config.to_flat(),
        "device": device_info(None),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pubmedqa-generative{'-limit' + str(args.limit) if args.limit else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"PubMedQA official test set, greedy generation ({scores['federated SFT']['questions']} questions):")
    for name, s in scores.items():
        print(f"  {name:18} accuracy {s['accuracy']:.3f}  unparsed {s['unparsed']}  answers {s['answered']}")
    print(f"  majority class      accuracy {MAJORITY:.3f}")
    print(f"written: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
