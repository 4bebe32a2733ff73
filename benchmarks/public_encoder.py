"""An encoder tuned on public data only, for private linear probes on sentence roles (NICTA-PIBOSO).

A DP linear probe (``privacy.recipe = "linear-probe"``) can only be as good as
the frozen features it reads. Those features may be shaped first on *public*
labelled text at no privacy cost (public pretraining: Tramèr & Boneh 2021,
https://arxiv.org/abs/2011.11660; Li et al. 2022, https://arxiv.org/abs/2110.05679).
This script does that for NICTA's task, sentence roles in medical abstracts:

1. rows: the 1,000 expert-labelled PubMedQA abstracts (``pubmedqa/ori_pqal.json``,
   MIT) come split into sections with their headings (BACKGROUND, METHODS,
   RESULTS, ...) and a conclusion. Every sentence becomes a row labelled by its
   heading, mapped onto seven public roles (:data:`ROLES`); PubMedQA shares no
   abstract (PMID) with NICTA-PIBOSO, and the few sentences that occur word for
   word in any NICTA split (boilerplate such as a study design line) are dropped;
2. training: every weight of the encoder plus a linear head on the masked
   token mean, AdamW, one epoch, dropout off; 100 abstracts held out to report the public
   task's accuracy;
3. the encoder (without the public head) and its tokenizer are saved as a
   model folder that fedfm reads with ``model.name = <folder>``.

Usage::

    python benchmarks/public_encoder.py --model-out ~/fedfm-models/minilm-pubmed-sections
    fedfm run nicta.toml --set model.name=~/fedfm-models/minilm-pubmed-sections \\
        --set model.pooling=layer-mean --set privacy.mode=dp-sgd ...

Writes ``<out>/public-encoder.json`` (``-quick`` with ``--quick``): the rows
per role, what was dropped, the public validation accuracy, the settings.
About 20 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from quality import DEFAULT_OUT, _environment, device_info

#: The public roles a PubMedQA heading maps to (a heading that fits none is skipped).
ROLES = ("background", "intervention", "methods", "other", "outcome", "population", "study design")

#: The sentence splitter: end punctuation, spaces, then a capital letter.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

#: Whole headings that are background too (their longer forms, e.g. "RATIONALE AND OBJECTIVES", stay unmapped).
_ALSO_BACKGROUND = {"STUDY OBJECTIVE", "CONTEXT", "RATIONALE", "HYPOTHESIS"}


def role_of(heading: str) -> str | None:
    """The public role of a PubMedQA section heading (``None``: no role fits, the section is skipped)."""
    h = heading.upper()
    if h.startswith(("BACKGROUND", "OBJECTIVE", "PURPOSE", "AIM", "INTRODUCTION")) or h in _ALSO_BACKGROUND:
        return "background"
    if "OUTCOME" in h or "MEASURE" in h or ("SETTING" in h and "DESIGN" not in h):
        return "other"
    if "DESIGN" in h:
        return "study design"
    if (h.startswith("PATIENT") and "METHOD" not in h) or "PARTICIPANT" in h or h == "SUBJECTS" or "POPULATION" in h:
        return "population"
    if "INTERVENTION" in h:
        return "intervention"
    if "RESULT" in h or "FINDING" in h or "CONCLUSION" in h:
        return "outcome"
    if "METHOD" in h:
        return "methods"
    return None


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def excluded_sentences(nicta_dir: Path) -> tuple[set[str], set[str]]:
    """Every NICTA-PIBOSO sentence (normalized) and abstract id, of all three splits."""
    sentences, abstracts = set(), set()
    for split in ("train", "dev", "test"):
        for line in (nicta_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            if line.startswith("###"):
                abstracts.add(line[3:].strip())
            elif "\t" in line:
                sentences.add(_key(line.split("\t", 1)[1]))
    return sentences, abstracts


def section_rows(pubmedqa: Path, nicta_dir: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """PubMedQA's section sentences as ``{"text", "label", "pmid"}`` rows, and what was left out."""
    abstracts = json.loads(pubmedqa.read_text(encoding="utf-8"))
    nicta_sentences, nicta_abstracts = excluded_sentences(nicta_dir)
    shared = sorted(set(abstracts) & nicta_abstracts)
    rows, unmapped, duplicates = [], Counter(), 0
    for pmid, entry in abstracts.items():
        if pmid in nicta_abstracts:
            continue
        sections = [*zip(entry["CONTEXTS"], entry["LABELS"], strict=True), (entry["LONG_ANSWER"], "CONCLUSIONS")]
        for text, heading in sections:
            role = role_of(heading)
            if role is None:
                unmapped[heading] += 1
                continue
            for sentence in _SENTENCE_END.split(text):
                if len(sentence) < 15:
                    continue
                if _key(sentence) in nicta_sentences:
                    duplicates += 1
                    continue
                rows.append({"text": sentence, "label": role, "pmid": pmid})
    dropped = {"abstracts_shared_with_nicta": shared, "sentences_in_nicta": duplicates,
               "unmapped_sections": dict(unmapped.most_common())}
    return rows, dropped


def train_encoder(rows: list[dict[str, str]], *, model: str, epochs: int, seed: int, out: Path,
                  validation_abstracts: int = 100) -> dict[str, Any]:
    """Tune every weight of ``model`` on ``rows``; save the encoder to ``out``; the public validation accuracy."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fedfm.adapters import resolve_model_path

    random.seed(seed)
    torch.manual_seed(seed)
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
    index = {role: i for i, role in enumerate(ROLES)}
    pmids = sorted({r["pmid"] for r in rows})
    random.shuffle(pmids)
    held = set(pmids[:validation_abstracts])
    train = [r for r in rows if r["pmid"] not in held]
    validation = [r for r in rows if r["pmid"] in held]
    head = torch.nn.Linear(encoder.config.hidden_size, len(ROLES))
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    batch = 32
    total = epochs * -(-len(train) // batch)
    # 50 steps of linear warm-up, then linear decay to 0.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / total))

    def pooled(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
        hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    started, step = time.perf_counter(), 0
    # Dropout stays off (the model loads in eval mode): the encoder measured in docs/privacy.md was tuned so.
    encoder.eval()
    for _ in range(epochs):
        random.shuffle(train)
        for i in range(0, len(train), batch):
            part = train[i:i + batch]
            loss = torch.nn.functional.cross_entropy(head(pooled([r["text"] for r in part])),
                                                     torch.tensor([index[r["label"]] for r in part]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{total}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s", flush=True)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(validation), 64):
            part = validation[i:i + 64]
            predicted = head(pooled([r["text"] for r in part])).argmax(1).tolist()
            correct += sum(p == index[r["label"]] for p, r in zip(predicted, part, strict=True))
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"train_rows": len(train), "validation_rows": len(validation), "steps": step,
            "public_validation_accuracy": correct / max(1, len(validation)),
            "train_seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Tune an encoder on PubMedQA's public section roles.")
    parser.add_argument("--model-out", type=Path, required=True, help="folder the tuned encoder is saved to")
    parser.add_argument("--model", default="minilm", help="the encoder to start from (alias or folder)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 rows: a smoke test, not an encoder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    _environment()
    from fedfm.data.paths import resolve_data_dir

    data_dir = resolve_data_dir()
    if data_dir is None:
        print("error: no data directory: set FEDFM_DATA_DIR to the folder holding pubmedqa/ and nicta_piboso/",
              file=sys.stderr)
        return 2
    if args.model_out.exists() and any(args.model_out.iterdir()):
        print(f"error: {args.model_out} is not empty: name a new folder", file=sys.stderr)
        return 2
    rows, dropped = section_rows(data_dir / "pubmedqa" / "ori_pqal.json", data_dir / "nicta_piboso")
    if args.quick:
        rows = random.Random(args.seed).sample(rows, 300)
    print(f"{len(rows)} public sentences: {dict(Counter(r['label'] for r in rows).most_common())}", flush=True)
    import torch

    trained = train_encoder(rows, model=args.model, epochs=args.epochs, seed=args.seed, out=args.model_out,
                            validation_abstracts=10 if args.quick else 100)
    report = {
        "benchmark": "public-encoder",
        "quick": args.quick,
        "command": " ".join(["public_encoder.py", *(argv if argv is not None else sys.argv[1:])]),
        "source": "pubmedqa/ori_pqal.json (PQA-L, MIT): section headings as labels",
        "model": args.model,
        "model_out": str(args.model_out),
        "roles": list(ROLES),
        "rows_per_role": dict(Counter(r["label"] for r in rows)),
        "dropped": dropped,
        "epochs": args.epochs,
        "seed": args.seed,
        **trained,
        "device": device_info(torch.device("cpu")),
    }
    (args.model_out / "fedfm-public-encoder.json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"public-encoder{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"public validation accuracy {trained['public_validation_accuracy']:.3f}; encoder in {args.model_out}; "
          f"report in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
