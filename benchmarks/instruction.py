"""Federated instruction tuning of a causal LM: held-out loss, perplexity and the medical benchmark, side by side.

Issue 25's targets, on SmolLM2-135M-Instruct and Medical Meadow's WikiDoc
patient-information pairs (hospitals by Dirichlet over topic; the held-out
conditions are the global test set):

``base``
    The model before any training (the LoRA adapter starts as a no-op).
``federated``
    :func:`fedfm.run` with FedAvg: R rounds of ``local-steps`` steps in every hospital.
``centralized``
    One model trained in this process on every hospital's training rows
    pooled, for as many examples as the federation saw: the upper bound.
``local``
    Each hospital alone, on its own rows, for as many steps as it took in the federation.

Every arm is scored by the same code on the same rows: the global held-out
set and each hospital's held-out split (response-token loss and perplexity).
The targets: federated loss within 5 % of centralized; every hospital's
held-out perplexity under the federated adapter below the base model's; the
federated adapter beats each local-only one on the global held-out set.

``--medical-limit N`` also scores base, federated and centralized on the
first N questions of PubMedQA, MedMCQA and MedQA (``fedfm evaluate
--benchmark medical``: greedy generation with FlowerTune's prompts, and option
likelihood). ``--speed`` times a local SFT step against plain transformers +
peft on the same batches (tokens per second, alternating, medians).

Usage::

    python benchmarks/instruction.py                       # the arms (about 25 min on 2 CPU cores)
    python benchmarks/instruction.py --speed --arms none   # the step-speed comparison alone
    python benchmarks/instruction.py --medical-limit 50    # + the medical benchmark on 50 questions each

Writes ``<out>/instruction-meadow.json`` (default ``benchmarks/results/``) and prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _environment, device_info  # benchmarks/ is not a package: found through sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
ARMS = ("base", "federated", "centralized", "local")

#: Sized for 2 CPU cores (a SmolLM2 LoRA step on 4 conversations takes ~4 s there): each hospital holds 48
#: training conversations and sees each once (4 rounds x 3 steps x 4); the arms train on the same examples.
#: lr 1e-3 with AdamW is a common choice for LoRA on a small model; it was not tuned on test scores.
SETTINGS: dict[str, Any] = {
    "model.name": "smollm2-135m",
    "model.task": "instruction-tuning",
    "model.max-length": 384,
    "model.dtype": "bfloat16",
    "lora.r": 8,
    "lora.alpha": 16.0,
    "lora.dropout": 0.05,
    "data.dataset": "medical_meadow_wikidoc_patient",
    "data.partitioner": "dirichlet",
    "data.alpha": 0.5,
    "data.num-hospitals": 4,
    "data.max-train-per-hospital": 48,
    "data.max-test": 32,
    "train.batch-size": 4,
    "train.eval-batch-size": 8,
    "train.learning-rate": 1e-3,
    "train.local-steps": 3,
    "federation.num-rounds": 4,
    "federation.min-hospitals": 4,
    # Every arm is scored here, on the same rows; the hospitals' own scoring would only repeat it each round.
    "federation.fraction-evaluate": 0.0,
}


def config_for(overrides: list[str]) -> Any:
    """The benchmark's configuration with ``section.key=value`` overrides applied last."""
    from fedfm.config import RunConfig, parse_override

    return RunConfig().replace(**{**SETTINGS, **dict(parse_override(text) for text in overrides)})


def score(workspace: Any, config: Any) -> dict[str, Any]:
    """The current adapter on the global held-out set and on each hospital's held-out split."""
    from fedfm.train import autocast

    loaded = workspace.loaded

    def evaluate(rows: Any) -> dict[str, float]:
        with autocast(loaded.device, config.model.dtype):
            metrics = workspace.task.evaluate(loaded.model, rows, loaded.tokenizer,
                                              batch_size=config.train.eval_batch_size, device=loaded.device)
        return {k: float(v) for k, v in metrics.items()}

    hospitals = workspace.federation.hospitals
    return {
        "global": evaluate(workspace.hospital_rows("test", -1)),
        "per_hospital": {h.name: evaluate(workspace.hospital_rows("test", i)) for i, h in enumerate(hospitals)},
    }


def _train(workspace: Any, config: Any, rows: Any, steps: int, seed: int) -> dict[str, Any]:
    from fedfm.train import train_local

    loaded = workspace.loaded
    spec = dataclasses.replace(config.train, local_steps=steps)
    started = time.perf_counter()
    result = train_local(loaded.model, workspace.task, rows, loaded.tokenizer, spec=spec, device=loaded.device,
                         dtype=config.model.dtype, seed=seed)
    return {"examples_seen": result.examples, "steps": result.steps, "train_loss": result.loss,
            "train_seconds": round(time.perf_counter() - started, 1)}


def run_arms(config: Any, arms: list[str], out: Path) -> dict[str, Any]:
    """The chosen arms, each scored on the same rows; adapters written under ``out/adapters``."""
    from datasets import concatenate_datasets

    import fedfm
    from fedfm.adapters import EXPORT_SETTINGS, export_adapter, get_adapter_state, set_adapter_state
    from fedfm.export.settings import export_settings
    from fedfm.rundir.checkpoint import read_checkpoint
    from fedfm.workspace import workspace_for

    workspace = workspace_for(config)
    loaded = workspace.loaded
    hospitals = workspace.federation.hospitals
    steps_each = config.federation.num_rounds * config.train.local_steps
    results: dict[str, Any] = {}
    if "base" in arms:
        set_adapter_state(loaded.model, loaded.initial_state)
        started = time.perf_counter()
        results["base"] = {**score(workspace, config), "wall_seconds": round(time.perf_counter() - started, 1)}
        print(f"[base] global loss {results['base']['global']['loss']:.4f}", flush=True)
    if "federated" in arms:
        started = time.perf_counter()
        run = fedfm.run(config, out=out / "runs" / "federated", overwrite=True)
        arrays = read_checkpoint(run.run_dir).arrays
        import torch

        set_adapter_state(loaded.model, {k: torch.from_numpy(v) for k, v in arrays.items()})
        results["federated"] = {
            **score(workspace, config),
            "examples_seen": steps_each * config.train.batch_size * len(hospitals),
            "per_round_global": [{"round": e["round"], **e["global"]} for e in run.history],
            "adapter": str(run.adapter_dir),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        print(f"[federated] global loss {results['federated']['global']['loss']:.4f}", flush=True)
    if "centralized" in arms:
        set_adapter_state(loaded.model, loaded.initial_state)
        pooled = concatenate_datasets([workspace.hospital_rows("train", i) for i in range(len(hospitals))])
        started = time.perf_counter()
        trained = _train(workspace, config, pooled, steps_each * len(hospitals), config.train.seed)
        adapter = out / "adapters" / "centralized"
        arm = {**trained, **score(workspace, config), "adapter": str(adapter)}
        export_adapter(loaded, get_adapter_state(loaded.model), adapter)
        # What `fedfm evaluate` and `fedfm predict` read of an exported folder, as a run writes it.
        settings = export_settings(config, list(workspace.federation.source.label_names))
        (adapter / EXPORT_SETTINGS).write_text(json.dumps(settings.to_json(), indent=2, sort_keys=True) + "\n")
        results["centralized"] = {**arm, "wall_seconds": round(time.perf_counter() - started, 1)}
        print(f"[centralized] global loss {arm['global']['loss']:.4f}", flush=True)
    if "local" in arms:
        per_hospital = {}
        for index, hospital in enumerate(hospitals):
            set_adapter_state(loaded.model, loaded.initial_state)
            started = time.perf_counter()
            trained = _train(workspace, config, workspace.hospital_rows("train", index), steps_each,
                             config.train.seed * 1_000_003 + index)
            global_only = score(workspace, config)
            per_hospital[hospital.name] = {**trained, "global": global_only["global"],
                                           "own": global_only["per_hospital"][hospital.name],
                                           "wall_seconds": round(time.perf_counter() - started, 1)}
            print(f"[local-only] {hospital.name}: global loss {per_hospital[hospital.name]['global']['loss']:.4f}",
                  flush=True)
        results["local"] = {"per_hospital": per_hospital}
    set_adapter_state(loaded.model, loaded.initial_state)
    return results


def comparison(arms: dict[str, Any]) -> dict[str, Any]:
    """The targets, with whether each is met."""
    out: dict[str, Any] = {}
    fed, cen, base, loc = (arms.get(k) for k in ("federated", "centralized", "base", "local"))
    if fed and cen:
        ratio = fed["global"]["loss"] / cen["global"]["loss"]
        out["federated_over_centralized_loss"] = round(ratio, 4)
        out["met_within_5_percent"] = bool(ratio <= 1.05)
    if fed and base:
        below = {name: fed["per_hospital"][name]["perplexity"] < m["perplexity"]
                 for name, m in base["per_hospital"].items()}
        out["every_hospital_perplexity_below_base"] = all(below.values())
        out["hospital_perplexity_below_base"] = below
    if fed and loc:
        beats = {name: fed["global"]["loss"] < arm["global"]["loss"] for name, arm in loc["per_hospital"].items()}
        out["federated_beats_every_local_only"] = all(beats.values())
        out["federated_beats_local_only"] = beats
    return out


def table(report: dict[str, Any]) -> str:
    """The arms on the global held-out set, then each hospital's held-out perplexity."""
    arms = report["arms"]
    rows = [(name, arms[name]) for name in ("base", "federated", "centralized") if name in arms]
    rows += [(f"local-only {h}", a) for h, a in arms.get("local", {}).get("per_hospital", {}).items()]
    width = max([len(n) for n, _ in rows] + [12])
    lines = [f"global held-out set: {report['global_test_rows']} conversations of held-out conditions",
             f"{'arm':{width}}  {'loss':>7}  {'perplexity':>10}  {'token-acc':>9}  {'examples':>8}"]
    for name, arm in rows:
        m = arm["global"]
        lines.append(f"{name:{width}}  {m['loss']:7.4f}  {m['perplexity']:10.3f}  {m['token-accuracy']:9.3f}  "
                     f"{arm.get('examples_seen', 0):8d}")
    if "base" in arms and "federated" in arms:
        lines.append("held-out perplexity per hospital: base -> federated (-> centralized)")
        for name, m in arms["base"]["per_hospital"].items():
            fed = arms["federated"]["per_hospital"][name]["perplexity"]
            cen = arms.get("centralized", {}).get("per_hospital", {}).get(name, {}).get("perplexity")
            lines.append(f"  {name}: {m['perplexity']:.3f} -> {fed:.3f}" + (f" ({cen:.3f})" if cen else ""))
    c = report["comparison"]
    if "federated_over_centralized_loss" in c:
        lines.append(f"federated / centralized held-out loss: {c['federated_over_centralized_loss']:.4f} "
                     f"(target <= 1.05: {'met' if c['met_within_5_percent'] else 'NOT met'})")
    if "every_hospital_perplexity_below_base" in c:
        lines.append(f"every hospital's perplexity below the base model's: {c['every_hospital_perplexity_below_base']}")
    if "federated_beats_every_local_only" in c:
        lines.append(f"federated beats every local-only adapter on the global set: "
                     f"{c['federated_beats_every_local_only']}")
    return "\n".join(lines)


def speed(config: Any, *, rows: int = 24, steps: int = 6, repeats: int = 3) -> dict[str, Any]:
    """Tokens per second of fedfm's local SFT step and of a plain transformers + peft loop on the same batches.

    Both train the same LoRA (fresh, same seed) under the same bf16 autocast
    on the same batches: the length-bucketed batches fedfm draws. The plain
    loop computes transformers' own loss (``labels=``); fedfm computes the
    response loss on the response positions' logits only. Runs alternate.
    """
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedfm.adapters import resolve_model_path, set_adapter_state
    from fedfm.tasks.causal_qa import pad_right, pad_token_id
    from fedfm.train import autocast, bucketed_batches, train_local
    from fedfm.workspace import workspace_for

    workspace = workspace_for(config)
    loaded = workspace.loaded
    data = workspace.hospital_rows("train", 0)
    data = data.select(range(min(rows, len(data))))
    lengths = [len(x) for x in data["input_ids"]]
    batches = bucketed_batches(lengths, config.train.batch_size, np.random.default_rng(0))[:steps]
    chosen = data.select([i for b in batches for i in b])
    tokens = sum(len(x) for x in chosen["input_ids"])
    spec = dataclasses.replace(config.train, local_steps=0, local_epochs=1)

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model.name), dtype=torch.float32)
    torch.manual_seed(0)
    plain = get_peft_model(base, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,
                                            lora_dropout=config.lora.dropout, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    pad = pad_token_id(loaded.tokenizer)

    def run_plain() -> float:
        optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=spec.learning_rate)
        plain.train()
        started = time.perf_counter()
        for batch in batches:
            inputs = pad_right([data[i]["input_ids"] for i in batch], [data[i]["labels"] for i in batch], pad)
            with autocast(torch.device("cpu"), config.model.dtype):
                loss = plain(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return time.perf_counter() - started

    def run_fedfm() -> float:
        set_adapter_state(loaded.model, loaded.initial_state)
        started = time.perf_counter()
        train_local(loaded.model, workspace.task, chosen, loaded.tokenizer, spec=spec, device=loaded.device,
                    dtype=config.model.dtype, seed=0)
        return time.perf_counter() - started

    run_plain(), run_fedfm()  # warm-up: first calls allocate
    seconds: dict[str, list[float]] = {"fedfm": [], "plain": []}
    for _ in range(repeats):
        seconds["plain"].append(run_plain())
        seconds["fedfm"].append(run_fedfm())
    set_adapter_state(loaded.model, loaded.initial_state)
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "rows": len(chosen), "steps": len(batches), "tokens": tokens, "seconds": seconds,
        "tokens_per_second": {k: round(tokens / v, 1) for k, v in medians.items()},
        "fedfm_time_over_plain": round(medians["fedfm"] / medians["plain"], 3),
    }
    print(f"[speed] {tokens} tokens in {len(batches)} steps: fedfm {result['tokens_per_second']['fedfm']} tok/s, "
          f"plain transformers+peft {result['tokens_per_second']['plain']} tok/s; time ratio "
          f"{result['fedfm_time_over_plain']} (target <= 1.15)", flush=True)
    return result


def medical(models: dict[str, str], limit: int, batch_size: int) -> dict[str, Any]:
    """``fedfm evaluate --benchmark medical`` on each model, the first ``limit`` questions of each set."""
    from fedfm.benchmark.evaluation import evaluate_suite

    out = {}
    for name, model in models.items():
        started = time.perf_counter()
        report = evaluate_suite("medical", model=model, limit=limit, batch_size=batch_size, progress=False)
        scores = report.to_json()["benchmarks"]
        out[name] = {"wall_seconds": round(time.perf_counter() - started), "benchmarks": {
            bench: {k: v for k, v in s.items() if k != "answers"} for bench, s in scores.items()}}
        print(f"[medical] {name}: " + "  ".join(
            f"{bench} gen {s['generative_accuracy']:.3f} lik {s['likelihood_accuracy']:.3f}"
            for bench, s in scores.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Federated vs centralized vs local-only instruction tuning.")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of base,federated,"
                        "centralized,local, or none (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--speed", action="store_true", help="also time a local SFT step against plain transformers+peft")
    parser.add_argument("--medical-limit", type=int, default=0,
                        help="also score base/federated/centralized on the first N questions of each medical set")
    parser.add_argument("--medical-batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix of the JSON file's name")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfm-instruction-benchmark"),
                        help="folder of the federated run and the centralized adapter (default: %(default)s)")
    args = parser.parse_args(argv)
    arms = [] if args.arms == "none" else [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(arms) - set(ARMS):
        parser.error(f"--arms must name some of {list(ARMS)} or none, got {args.arms!r}")
    _environment()
    from fedfm.workspace import workspace_for

    config = config_for(args.overrides)
    started = time.perf_counter()
    results = run_arms(config, arms, args.work) if arms else {}
    workspace = workspace_for(config)
    report: dict[str, Any] = {
        "benchmark": "instruction",
        "dataset": config.data.dataset,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "hospitals": {h.name: {"train_rows": len(h.train), "test_rows": len(h.test)}
                      for h in workspace.federation.hospitals},
        "global_test_rows": len(workspace.federation.global_test),
        "arms": results,
        "comparison": comparison(results),
        "settings": config.to_flat(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"instruction-meadow{'-' + args.tag if args.tag else ''}.json"

    def save() -> None:
        # After every stage: a later stage that fails loses nothing measured before it.
        report["device"] = device_info(workspace.loaded.device)
        report["total_wall_seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(report, indent=2) + "\n")

    save()
    if results:
        print()
        print(table(report), flush=True)
    if args.speed:
        report["speed"] = speed(config)
        save()
    if args.medical_limit > 0:
        models = {"base (zero-shot)": config.model.name}
        for arm in ("federated", "centralized"):
            if arm in results:
                models[f"{arm} SFT"] = results[arm]["adapter"]
        report["medical"] = {"limit": args.medical_limit,
                             "scores": medical(models, args.medical_limit, args.medical_batch_size)}
        save()
    print(f"written: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
