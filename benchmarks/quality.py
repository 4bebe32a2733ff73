"""Does federating pay? Federated vs centralized vs local-only fine-tuning, side by side.

Three arms train the same model with the same LoRA shape and optimizer settings
on the same total number of training examples, and are scored on the same
global test set:

``federated``
    :func:`fedfm.run` with FedAvg: R rounds of E local epochs in every hospital.
``centralized``
    One model trained in this process on every hospital's training rows pooled,
    for R x E epochs: the upper bound federation tries to reach.
``local-only``
    Each hospital alone, R x E epochs on its own rows: what a hospital gets
    without the federation. Reported per hospital and as the mean.

The figures that matter are ``federated macro-F1 / centralized macro-F1``
(target >= 0.90) and ``federated macro-F1 - mean local-only macro-F1``
(target > 0).

Usage::

    python benchmarks/quality.py --dataset heart
    python benchmarks/quality.py --quick                  # smoke test, both datasets
    python benchmarks/quality.py --dataset nicta --set train.learning-rate=1e-3
    python benchmarks/quality.py --dataset ncbi --arms centralized   # NER: entity-level F1 too
    python benchmarks/quality.py --dataset pneumonia --validation   # X-rays: choose settings on the official val split
    python benchmarks/quality.py --dataset pneumonia                # then score the chosen settings on test

Writes ``<out>/quality-<dataset>.json`` (default ``benchmarks/results/``) and
prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEART_TOML = ROOT / "examples" / "quickstart" / "heart.toml"
#: NCBI-disease NER (``--dataset ncbi``): the example as it is; arms compare entity-level F1 too.
NCBI_TOML = ROOT / "examples" / "ncbi_disease.toml"
#: PneumoniaMNIST chest X-rays (``--dataset pneumonia``): the example as it is; arms compare accuracy (MedMNIST's
#: metric; its ResNet-18 at 28 px scored 0.854 on the official split) and AUC too.
PNEUMONIA_TOML = ROOT / "examples" / "pneumoniamnist.toml"
#: The metric and target of ``federated / centralized`` per dataset (macro-F1 and 0.90 where not named).
RATIO_METRIC = {"pneumonia": ("accuracy", 0.95)}
DEFAULT_OUT = ROOT / "benchmarks" / "results"

#: Settings of the NICTA-PIBOSO benchmark. Sentences are short (99th percentile
#: 72 MiniLM tokens), so 96 tokens truncates almost nothing while dynamic
#: padding keeps batches small. Eight passes over the 4,885 training sentences per
#: arm (about an hour for the three arms on two cores). With BERT's CLS pooler
#: federated macro-F1 reached 0.60 of centralized after four rounds and 0.80
#: after eight (benchmarks/results/tuning/); with mean pooling (the default for
#: MiniLM) 1.11. Of the learning rates tried with the CLS pooler (1e-3, 2e-3,
#: 3e-3), 2e-3 gave the best centralized reference; with mean pooling the
#: centralized arm overfits by its eighth pass (test loss 1.07 vs 0.78).
NICTA_SETTINGS: dict[str, Any] = {
    "model.name": "minilm",
    "model.task": "sequence-classification",
    "model.max-length": 96,
    "lora.r": 8,
    "lora.alpha": 16.0,
    "lora.dropout": 0.05,
    "data.dataset": "nicta_piboso",
    "data.partitioner": "dirichlet",
    "data.num-hospitals": 5,
    "data.alpha": 0.5,
    "train.batch-size": 16,
    "train.learning-rate": 2e-3,
    "train.local-epochs": 1,
    "federation.num-rounds": 8,
    "federation.min-hospitals": 5,
    # The hospitals' local test splits are not part of the comparison; scoring
    # them every round would cost a third of a round's time.
    "federation.fraction-evaluate": 0.0,
}

#: ``--quick`` caps: a smoke test of the whole program in a few minutes, not a result.
QUICK_SETTINGS: dict[str, dict[str, Any]] = {
    "heart": {"data.max-train-per-hospital": 32, "data.max-test": 96, "federation.num-rounds": 2},
    "nicta": {"data.max-train-per-hospital": 48, "data.max-test": 150, "federation.num-rounds": 2},
    "ncbi": {"data.max-train-per-hospital": 48, "data.max-test": 100, "federation.num-rounds": 2},
    "pneumonia": {"data.max-train-per-hospital": 32, "data.max-test": 64, "federation.num-rounds": 2,
                  "model.image-size": 56},
}

DATASETS = ("heart", "nicta")
#: Run only when named (``--dataset ncbi``), not by ``--dataset all``.
OTHER_DATASETS = ("ncbi", "pneumonia")
ARMS = ("federated", "centralized", "local")


def _environment() -> None:
    # Before torch, transformers or Ray are imported: nothing may download, and
    # Ray should not phone home. OpenMP's default busy-waiting made two torch
    # threads 6-10x slower than one on a shared two-core machine (measured here
    # with other jobs running); passive waiting keeps two threads on par or better.
    # Ray's workers inherit this environment.
    for key, value in {
        "OMP_WAIT_POLICY": "PASSIVE",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def base_config(dataset: str, *, quick: bool, overrides: list[str]) -> Any:
    """The configuration every arm of one dataset uses.

    Parameters
    ----------
    dataset : str
        ``heart`` (the quickstart TOML as it is now), ``nicta`` (:data:`NICTA_SETTINGS`) or
        ``ncbi`` (``examples/ncbi_disease.toml`` as it is now).
    quick : bool
        Apply the :data:`QUICK_SETTINGS` caps.
    overrides : list of str
        ``section.key=value`` strings applied last, so they win over everything.

    Returns
    -------
    RunConfig
        The validated configuration.
    """
    from fedfm.config import RunConfig, load_config, parse_override

    if dataset == "heart":
        if HEART_TOML.is_file():
            config = load_config(HEART_TOML)
        else:
            print(f"note: {HEART_TOML} not found; using fedfm's defaults for heart_disease_uci", flush=True)
            config = RunConfig().replace(**{"data.dataset": "heart_disease_uci", "data.partitioner": "natural"})
    elif dataset == "ncbi":
        config = load_config(NCBI_TOML)
    elif dataset == "pneumonia":
        config = load_config(PNEUMONIA_TOML)
    else:
        config = RunConfig().replace(**NICTA_SETTINGS)
    flat: dict[str, Any] = {}
    if quick:
        flat.update(QUICK_SETTINGS[dataset])
    flat.update(dict(parse_override(text) for text in overrides))
    return config.replace(**flat) if flat else config


def device_info(device: Any) -> dict[str, Any]:
    """Where the figures were measured: these machines are shared and noisy, so record it."""
    import torch

    from fedfm.config import available_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "torch_device": str(device),
        "cpu": cpu,
        "cores_available": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None and str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _examples_per_arm(config: Any, train_rows: list[int]) -> dict[str, Any]:
    """The in-process arms' training budget that matches the federation's."""
    rounds = config.federation.num_rounds
    if config.train.local_steps > 0:
        # Every hospital takes the same number of steps per round, whatever its size.
        return {"steps_each_hospital": rounds * config.train.local_steps,
                "steps_pooled": rounds * config.train.local_steps * len(train_rows)}
    return {"epochs": rounds * config.train.local_epochs}


def _train_spec(config: Any, budget: dict[str, Any], *, pooled: bool) -> Any:
    if "epochs" in budget:
        return dataclasses.replace(config.train, local_epochs=budget["epochs"], local_steps=0)
    steps = budget["steps_pooled"] if pooled else budget["steps_each_hospital"]
    return dataclasses.replace(config.train, local_steps=steps)


def _evaluate(workspace: Any, config: Any) -> dict[str, float]:
    from fedfm.train import autocast

    loaded = workspace.loaded
    with autocast(loaded.device, config.model.dtype):
        scores = workspace.task.evaluate(
            loaded.model,
            workspace.hospital_rows("test", -1),
            loaded.tokenizer,
            batch_size=config.train.eval_batch_size,
            device=loaded.device,
        )
    return {k: float(v) for k, v in scores.items()}


def _phases(config: Any, spec: Any) -> list[tuple[Any, bool]]:
    """``spec`` as (spec, head only) phases: federation.head-first-rounds' share of the budget trains the head alone."""
    head, rounds = min(config.federation.head_first_rounds, config.federation.num_rounds), config.federation.num_rounds
    if head == 0:
        return [(spec, False)]
    if spec.local_steps > 0:
        first = spec.local_steps * head // rounds
        split = [dataclasses.replace(spec, local_steps=first), dataclasses.replace(spec, local_steps=spec.local_steps - first)]
    else:
        first = spec.local_epochs * head // rounds
        split = [dataclasses.replace(spec, local_epochs=first), dataclasses.replace(spec, local_epochs=spec.local_epochs - first)]
    return [(part, index == 0) for index, part in enumerate(split) if part.local_steps > 0 or part.local_epochs > 0]


def _train_and_score(workspace: Any, config: Any, rows: Any, spec: Any, seed: int) -> dict[str, Any]:
    """Train from the initial adapter on ``rows`` and score on the global test set (the head alone first, for
    the share of the budget federation.head-first-rounds gives the federation's head rounds)."""
    from fedfm.adapters import set_adapter_state
    from fedfm.strategies import ClientPlan
    from fedfm.train import train_local

    loaded = workspace.loaded
    # Each arm starts where the federation starts, whatever ran before in this process.
    set_adapter_state(loaded.model, loaded.initial_state)
    started = time.perf_counter()
    results = [
        train_local(
            loaded.model, workspace.task, rows, loaded.tokenizer, spec=part, device=loaded.device,
            dtype=config.model.dtype, seed=seed + phase, plan=ClientPlan().head_only() if head_only else None,
        )
        for phase, (part, head_only) in enumerate(_phases(config, spec))
    ]
    train_seconds = time.perf_counter() - started
    metrics = _evaluate(workspace, config)
    set_adapter_state(loaded.model, loaded.initial_state)
    return {
        "global": metrics,
        "train_rows": len(rows),
        "examples_seen": sum(r.examples for r in results),
        "steps": sum(r.steps for r in results),
        "train_loss": results[-1].loss,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def run_centralized(config: Any) -> dict[str, Any]:
    """All hospitals' training rows pooled, trained in this process for the federation's budget."""
    from datasets import concatenate_datasets

    from fedfm.workspace import workspace_for

    workspace = workspace_for(config)
    n = len(workspace.federation.hospitals)
    rows = concatenate_datasets([workspace.hospital_rows("train", i) for i in range(n)])
    budget = _examples_per_arm(config, [len(workspace.hospital_rows("train", i)) for i in range(n)])
    print(f"[centralized] {len(rows)} pooled rows, {budget}", flush=True)
    arm = _train_and_score(workspace, config, rows, _train_spec(config, budget, pooled=True), seed=config.train.seed)
    arm["budget"] = budget
    print(f"[centralized] {_fmt(arm['global'])}  {arm['wall_seconds']:.0f} s", flush=True)
    return arm


def run_local(config: Any) -> dict[str, Any]:
    """Each hospital alone on its own rows, each scored on the global test set."""
    from fedfm.workspace import workspace_for

    workspace = workspace_for(config)
    hospitals = workspace.federation.hospitals
    budget = _examples_per_arm(config, [len(h.train) for h in hospitals])
    spec = _train_spec(config, budget, pooled=False)
    started = time.perf_counter()
    per_hospital: dict[str, Any] = {}
    for index, hospital in enumerate(hospitals):
        rows = workspace.hospital_rows("train", index)
        # A hospital-specific seed, so two equally sized hospitals do not shuffle alike.
        arm = _train_and_score(workspace, config, rows, spec, seed=config.train.seed * 1_000_003 + index)
        per_hospital[hospital.name] = arm
        print(
            f"[local-only] {hospital.name} ({len(rows)} rows): {_fmt(arm['global'])}  {arm['wall_seconds']:.0f} s",
            flush=True,
        )
    names = [k for k in ("accuracy", "macro-f1", "weighted-f1", "auc", *ENTITY_METRICS, "loss")
             if all(k in a["global"] for a in per_hospital.values())]
    mean = {k: sum(a["global"][k] for a in per_hospital.values()) / len(per_hospital) for k in names}
    return {
        "global": mean,
        "per_hospital": per_hospital,
        "examples_seen": sum(a["examples_seen"] for a in per_hospital.values()),
        "budget": budget,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def run_federated(config: Any, *, verbose: bool, engine: str = "simulation", logs: Path | None = None) -> dict[str, Any]:
    """FedAvg through Flower's simulation engine, or its Deployment Engine on this machine; the run directory is temporary."""
    import fedfm

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedfm-quality-") as tmp:
        if engine in ("deployment", "deployment-warm"):
            from deployment_engine import LocalFederation

            run_dir = Path(tmp) / "run"
            flat = {**config.to_flat(), "output.dir": str(run_dir)}
            with LocalFederation(Path(tmp) / "network", config.data.num_hospitals, keep_logs=logs,
                                 warm=engine == "deployment-warm") as federation:
                federation.run(flat, timeout=3 * 3600)
                if not (run_dir / "summary.json").is_file():  # `flwr run` exits 0 even when the ServerApp failed
                    raise RuntimeError(f"the run wrote no summary; flwr run said:\n{federation.log('flwr-run')[-4000:]}")
            result = fedfm.RunResult.load(run_dir)
        else:
            result = fedfm.run(config, out=Path(tmp) / "run", verbose=verbose)
    wall = time.perf_counter() - started
    return _federated_arm(config, result, wall, engine)


def _federated_arm(config: Any, result: Any, wall: float, engine: str) -> dict[str, Any]:
    from fedfm import keys

    examples = 0
    for entry in result.history:
        for hospital in entry.get("per_hospital", {}).values():
            trained = hospital.get("train", {})
            if config.train.local_steps > 0:
                examples += int(trained.get("train-steps", 0)) * config.train.batch_size
            else:
                examples += int(trained.get(keys.NUM_EXAMPLES, 0)) * config.train.local_epochs
    return {
        "engine": engine,
        "global": {k: float(v) for k, v in result.final_global.items()},
        "initial_global": (result.summary.get("initial") or {}).get("global"),
        "per_round_global": [
            {
                "round": e["round"],
                **{k: e["global"].get(k) for k in ("accuracy", "macro-f1", "weighted-f1", "auc", "loss") if k in e["global"]},
                "seconds": e["seconds"],
            }
            for e in result.history
        ],
        # Upper bound when the last batch of an epoch is short (local-steps mode only).
        "examples_seen": examples,
        "rounds": result.summary.get("rounds"),
        # With federation.select-best = "validation" the exported adapter may be
        # an earlier round than "global" (the last): its test scores are here.
        "exported": _exported(result.summary.get("selection") or {}),
        "server_wall_seconds": result.summary.get("wall_seconds"),
        "wall_seconds": round(wall, 2),
        "bytes": result.summary.get("bytes"),
    }


def _exported(selection: dict[str, Any]) -> dict[str, Any] | None:
    """The exported round and its global test scores, when validation chose it; None otherwise."""
    if selection.get("select_best") != "validation" or selection.get("exported_round") is None:
        return None
    chosen = selection["best"] if selection["exported_round"] == selection.get("best_round") else selection["last"]
    return {
        "round": selection["exported_round"],
        "validation_metric": selection.get("metric"),
        "global": {k: float(v) for k, v in ((chosen or {}).get("global") or {}).items()},
    }


#: What token classification (NCBI-disease) reports beyond the classification metrics.
ENTITY_METRICS = ("entity-precision", "entity-recall", "entity-f1")


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "macro-f1", "weighted-f1", "auc", "entity-f1")
                     if k in metrics)


def use_validation_split() -> None:
    """Score every arm on PneumoniaMNIST's official validation split instead of its test split.

    Settings are chosen here (``--validation``), never on the test split. The built-in source is
    registered again in this process with ``val`` as its global held-out set; the in-process
    simulation backend, which ``fedfm.run`` uses on this machine, reads this registry.
    """
    from fedfm.data import register_source
    from fedfm.data.images import IMAGE_INPUT, PNEUMONIAMNIST, load_pneumoniamnist, pneumoniamnist_split

    def with_validation_as_test(request: Any) -> Any:
        source = load_pneumoniamnist(request)
        val = pneumoniamnist_split(request.data_dir, "val", request.data_dir_origin)
        return dataclasses.replace(source, test=val)

    register_source(PNEUMONIAMNIST, with_validation_as_test, input_format=IMAGE_INPUT, force=True)


def comparison(arms: dict[str, Any], *, metric: str = "macro-f1", target: float = 0.90) -> dict[str, Any]:
    """The ratios the benchmark exists for, with whether each target is met.

    ``federated / centralized`` uses ``metric`` (macro-F1 unless the dataset names another, e.g. accuracy for
    PneumoniaMNIST) against ``target``; the local-only gains are reported in macro-F1 and in ``metric``.
    """
    out: dict[str, Any] = {}
    fed = arms.get("federated")
    cen = arms.get("centralized")
    loc = arms.get("local")
    if fed and cen:
        ratio = fed["global"]["macro-f1"] / cen["global"]["macro-f1"] if cen["global"]["macro-f1"] > 0 else float("nan")
        out["federated_over_centralized_macro_f1"] = round(ratio, 4)
        if metric != "macro-f1":
            ratio = fed["global"][metric] / cen["global"][metric] if cen["global"][metric] > 0 else float("nan")
            out[f"federated_over_centralized_{metric}"] = round(ratio, 4)
        out["ratio_metric"] = metric
        out["target_federated_over_centralized"] = target
        out["met_federated_over_centralized"] = bool(ratio >= target)
        if "entity-f1" in fed["global"] and "entity-f1" in cen["global"]:
            f, c = fed["global"]["entity-f1"], cen["global"]["entity-f1"]
            out["federated_over_centralized_entity_f1"] = round(f / c, 4) if c > 0 else float("nan")
    if fed and loc:
        gain = fed["global"]["macro-f1"] - loc["global"]["macro-f1"]
        out["federated_minus_local_mean_macro_f1"] = round(gain, 4)
        out["target_federated_minus_local_mean"] = 0.0
        out["met_federated_minus_local_mean"] = bool(gain > 0)
        best = max(a["global"]["macro-f1"] for a in loc["per_hospital"].values())
        out["federated_minus_best_local_macro_f1"] = round(fed["global"]["macro-f1"] - best, 4)
        if metric != "macro-f1":
            best = max(a["global"][metric] for a in loc["per_hospital"].values())
            out[f"federated_minus_best_local_{metric}"] = round(fed["global"][metric] - best, 4)
            out[f"met_federated_beats_every_local_{metric}"] = bool(fed["global"][metric] > best)
    return out


def table(report: dict[str, Any]) -> str:
    """The arms as a plain-text table, then the two ratios."""
    arms = report["arms"]
    rows: list[tuple[str, dict[str, Any]]] = []
    if "federated" in arms:
        rows.append(("federated (FedAvg)", arms["federated"]))
    if "centralized" in arms:
        rows.append(("centralized (pooled)", arms["centralized"]))
    if "local" in arms:
        for name, arm in arms["local"]["per_hospital"].items():
            rows.append((f"local-only {name}", arm))
        rows.append(("local-only mean", arms["local"]))
    width = max([len(name) for name, _ in rows] + [10])
    head = (
        f"{'arm':{width}}  {'accuracy':>8}  {'macro-f1':>8}  {'weighted-f1':>11}  "
        f"{'loss':>6}  {'examples':>8}  {'seconds':>7}"
    )
    lines = [
        (f"{report['dataset']}: global test set of {report['global_test_rows']} rows, "
         f"{len(report['hospitals'])} hospitals"),
        head,
        "-" * len(head),
    ]
    for name, arm in rows:
        m = arm["global"]
        lines.append(
            f"{name:{width}}  {m['accuracy']:8.3f}  {m['macro-f1']:8.3f}  {m['weighted-f1']:11.3f}  "
            f"{m['loss']:6.3f}  {arm.get('examples_seen', 0):8d}  {arm['wall_seconds']:7.0f}"
        )
    c = report["comparison"]
    if "federated_over_centralized_macro_f1" in c:
        ok = "met" if c["met_federated_over_centralized"] else "NOT met"
        metric = c.get("ratio_metric", "macro-f1")
        ratio = c[f"federated_over_centralized_{metric.replace('macro-f1', 'macro_f1')}"]
        lines.append(f"federated / centralized {metric}:     {ratio:.3f}  "
                     f"(target >= {c['target_federated_over_centralized']:.2f}: {ok})")
    if "federated_over_centralized_entity_f1" in c:
        lines.append(f"federated / centralized entity-F1:    {c['federated_over_centralized_entity_f1']:.3f}")
    for name, arm in rows:
        if "entity-f1" in arm["global"]:
            m = arm["global"]
            lines.append(f"{name:{width}}  entity P {m['entity-precision']:.3f}  R {m['entity-recall']:.3f}  "
                         f"F1 {m['entity-f1']:.3f}")
    if "federated_minus_local_mean_macro_f1" in c:
        ok = "met" if c["met_federated_minus_local_mean"] else "NOT met"
        gain = c["federated_minus_local_mean_macro_f1"]
        lines.append(f"federated - mean local-only macro-F1: {gain:+.3f}  (target > 0: {ok})")
    for key, value in c.items():
        if key.startswith("federated_minus_best_local_"):
            lines.append(f"federated - best local-only {key.removeprefix('federated_minus_best_local_')}: {value:+.3f}")
    for name, arm in rows:
        if "auc" in arm["global"]:
            lines.append(f"{name:{width}}  AUC {arm['global']['auc']:.3f}")
    return "\n".join(lines)


def benchmark(
    dataset: str, *, quick: bool, overrides: list[str], arms: list[str], out: Path, verbose: bool,
    engine: str = "simulation", tag: str = "", validation: bool = False,
) -> dict[str, Any]:
    """Run the chosen arms of one dataset one after another, print the table, write the JSON.

    Parameters
    ----------
    dataset : str
        ``heart`` or ``nicta``.
    quick : bool
        Smoke-test caps (:data:`QUICK_SETTINGS`); the file is named ``quality-<dataset>-quick.json``.
    overrides : list of str
        ``section.key=value`` strings applied to every arm.
    arms : list of str
        Which of ``federated``, ``centralized``, ``local`` to run.
    out : Path
        Folder of the JSON file.
    verbose : bool
        Show Flower's and Ray's own logs.
    engine : str
        ``simulation`` (Flower's simulation engine) or ``deployment`` (a SuperLink and one
        SuperNode per hospital on this machine, :mod:`deployment_engine`) for the federated arm.
    tag : str
        Appended to the JSON file's name (``quality-nicta-<tag>.json``), so a run on
        another machine does not overwrite the reference figures.
    validation : bool
        Score on the official validation split (PneumoniaMNIST only; :func:`use_validation_split`);
        the file is named ``quality-<dataset>-validation.json``.

    Returns
    -------
    dict
        The report also written as JSON.
    """
    import torch

    from fedfm.config import available_cores
    from fedfm.workspace import workspace_for

    config = base_config(dataset, quick=quick, overrides=overrides)
    if validation:
        use_validation_split()
    fed = config.federation
    if fed.fraction_train < 1.0:
        print("note: federation.fraction-train < 1: the federated arm sees fewer examples than the others", flush=True)
    print(f"== {config.data.dataset}: arms {', '.join(arms)}{' (quick)' if quick else ''}", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    # The federated arm goes first: it is the likeliest to fail, and Ray has
    # shut down before the in-process arms take the cores.
    if "federated" in arms:
        results["federated"] = run_federated(config, verbose=verbose, engine=engine, logs=out / "deployment-logs")
        arm = results["federated"]
        print(f"[federated] {_fmt(arm['global'])}  {arm['wall_seconds']:.0f} s", flush=True)
        if arm["exported"]:
            print(f"[federated] exported round {arm['exported']['round']}: {_fmt(arm['exported']['global'])}", flush=True)
    # fedfm.run sets the driver's threads for its worker layout; the in-process
    # arms get every core, and the same seeds whatever ran before.
    torch.set_num_threads(available_cores())
    if "centralized" in arms:
        results["centralized"] = run_centralized(config)
    if "local" in arms:
        results["local"] = run_local(config)
    workspace = workspace_for(config)
    report = {
        "benchmark": "quality",
        "dataset": config.data.dataset,
        "quick": quick,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "hospitals": {
            h.name: {"train_rows": len(h.train), "test_rows": len(h.test)} for h in workspace.federation.hospitals
        },
        "global_test_rows": len(workspace.federation.global_test),
        "arms": results,
        "comparison": comparison(results, **dict(zip(("metric", "target"), RATIO_METRIC.get(dataset, ()), strict=False))),
        "scored_on": "validation" if validation else "test",
        "settings": config.to_flat(),
        "overrides": overrides,
        "device": device_info(workspace.loaded.device),
        "total_wall_seconds": round(time.perf_counter() - started, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    short = dataset
    path = out / f"quality-{short}{'-validation' if validation else ''}{'-quick' if quick else ''}{'-' + tag if tag else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    print()
    print(table(report))
    print(f"written: {path}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Federated vs centralized vs local-only LoRA fine-tuning on the same examples and test set.",
    )
    parser.add_argument("--dataset", choices=(*DATASETS, *OTHER_DATASETS, "all"), default="all",
                        help="heart (UCI heart disease, 4 natural hospitals), "
                        "nicta (NICTA-PIBOSO, 5 Dirichlet hospitals), all (these two), "
                        "ncbi (NCBI-disease NER, examples/ncbi_disease.toml) "
                        "or pneumonia (PneumoniaMNIST X-rays, examples/pneumoniamnist.toml)")
    parser.add_argument("--quick", action="store_true",
                        help="cap rows and rounds for a smoke test of a few minutes (figures are not meaningful)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for quality-<dataset>.json (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="configuration override applied to every arm; repeatable")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="comma-separated subset of federated,centralized,local (default: all three)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    parser.add_argument("--engine", choices=("simulation", "deployment", "deployment-warm"), default="simulation",
                        help="federated arm in Flower's simulation engine (Ray) or on its Deployment Engine, "
                        "a SuperLink and one SuperNode per hospital on this machine (no Ray needed); "
                        "deployment-warm: each SuperNode beside one `fedfm hospital` process")
    parser.add_argument("--tag", default="", help="suffix of the JSON file's name, e.g. the machine (default: none)")
    parser.add_argument("--validation", action="store_true",
                        help="pneumonia: score every arm on the official validation split (choose settings there)")
    args = parser.parse_args(argv)
    if args.validation and args.dataset != "pneumonia":
        parser.error("--validation needs --dataset pneumonia (the other datasets choose on data.validation-fraction)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        parser.error(f"--arms must name some of {list(ARMS)}, got {args.arms!r}")

    _environment()
    from fedfm.errors import ConfigError

    datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    try:
        # Every configuration is checked before the first arm spends minutes.
        for name in datasets:
            base_config(name, quick=args.quick, overrides=args.overrides)
        for name in datasets:
            benchmark(name, quick=args.quick, overrides=args.overrides, arms=arms, out=args.out, verbose=args.verbose,
                      engine=args.engine, tag=args.tag, validation=args.validation)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
