"""The private linear probe (``fedfm.privacy.probe``) on fedfm's federations: what it reaches at ε = 8, 3, 1.

For heart (4 natural hospitals) and NICTA-PIBOSO (5 Dirichlet(0.5) hospitals,
500 test sentences), with each hospital's training rows split 80/20 into
train and validation (``data.validation-fraction = 0.2``):

1. features: the input of MiniLM's classification head for every row, once
   (:func:`fedfm.privacy.probe.extract_features`), cached under ``--cache``;
   the public centring vectors (generic sentences, random vocabulary, heart
   records from the UCI codebook) likewise;
2. a simulated federation of the head: R rounds, each hospital takes S
   full-batch DP-GD steps from the global head, the server takes the mean of
   the hospitals' heads **weighted by their row counts** (fedfm's FedAvg);
   σ is calibrated so each hospital's R·S steps spend exactly ε at δ = 1e-5
   (:func:`fedfm.privacy.accounting.default_delta` gives 1e-5 for these sizes);
3. selection on validation: centring, scaling, C, lr and (R, S) are chosen by
   the mean validation score over seeds (accuracy for heart, macro-F1 for
   NICTA) at ε = 8, the test split unseen. The chosen setting is then run at
   ε = 8, 3, 1 on train + validation rows and scored on the test set, over
   fresh seeds.

Validation rows are hospitals' private rows: each configuration tried on
them leaks a little, and a deployment that tunes this way must pay for it
(e.g. Papernot & Steinke 2022, https://arxiv.org/abs/2110.03620). Here the
selection is a benchmark's, done once, and its settings become defaults that
a deployment uses without tuning.

References measured in the same run: the probe without DP (clipping and noise
off), and for NICTA each hospital alone without DP (a non-DP linear probe on
its own rows; fedfm's LoRA figures per hospital are in
``benchmarks/results/quality-nicta.json``, arm ``local``).

Usage::

    python benchmarks/dp_probe.py                    # both datasets
    python benchmarks/dp_probe.py --dataset heart --seeds 5

Writes ``benchmarks/results/dp-probe.json`` after every stage and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality import DEFAULT_OUT, HEART_TOML, NICTA_SETTINGS, _environment

DELTA = 1e-5
EPSILONS = (8.0, 3.0, 1.0)
VALIDATION_FRACTION = 0.2
NICTA: dict[str, Any] = {**NICTA_SETTINGS, "data.max-test": 500}


#: ``--pooling`` and ``--max-test`` (NICTA), set once in ``main``: which features, scored on how many test rows.
OPTIONS: dict[str, Any] = {"pooling": "", "max_test": None, "model": ""}


def config_for(dataset: str) -> Any:
    from fedfm.config import RunConfig, load_config

    if dataset == "heart":
        config = load_config(HEART_TOML)
    else:
        config = RunConfig().replace(**NICTA)
        if OPTIONS["max_test"] is not None:
            config = config.replace(**{"data.max-test": OPTIONS["max_test"]})
    if OPTIONS["pooling"]:
        config = config.replace(**{"model.pooling": OPTIONS["pooling"]})
    if OPTIONS["model"]:
        config = config.replace(**{"model.name": OPTIONS["model"]})
    # Features are read in float32 whatever the training dtype.
    return config.replace(**{"data.validation-fraction": VALIDATION_FRACTION, "model.dtype": "float32"})


def cache_name(dataset: str) -> str:
    """The feature file of ``dataset`` under the chosen model, pooling and test size."""
    suffix = (f"-{Path(OPTIONS['model']).name}" if OPTIONS["model"] else "") + (
        f"-{OPTIONS['pooling']}" if OPTIONS["pooling"] else "") + (
        f"-test{OPTIONS['max_test']}" if OPTIONS["max_test"] is not None and dataset != "heart" else "")
    return f"{dataset}{suffix}.npz"


# --------------------------------------------------------------------------- features


def features(dataset: str, cache: Path) -> dict[str, Any]:
    """Every split's features and labels, and the public centres (computed once, then read from ``cache``)."""
    path = cache / cache_name(dataset)
    if path.is_file():
        data = dict(np.load(path, allow_pickle=False))
        return _unpack(data)
    import torch

    from fedfm.privacy import probe
    from fedfm.workspace import workspace_for

    torch.set_num_threads(max(1, int(os.environ.get("FEDFM_THREADS", "1"))))
    config = config_for(dataset)
    workspace = workspace_for(config)
    loaded, task = workspace.loaded, workspace.task
    arrays: dict[str, np.ndarray] = {}
    names = workspace.hospital_names
    started = time.perf_counter()
    for index, name in enumerate(names):
        for split in ("train", "validation"):
            rows = workspace.hospital_rows(split, index)
            x, y = probe.extract_features(loaded.model, task, rows, loaded.tokenizer, device=loaded.device)
            arrays[f"{split}/{index}/x"], arrays[f"{split}/{index}/y"] = x, y
            print(f"[{dataset}] {name} {split}: {len(y)} rows  {time.perf_counter() - started:.0f} s", flush=True)
    x, y = probe.extract_features(loaded.model, task, workspace.hospital_rows("test", -1), loaded.tokenizer,
                                  device=loaded.device)
    arrays["test/x"], arrays["test/y"] = x, y
    print(f"[{dataset}] global test: {len(y)} rows  {time.perf_counter() - started:.0f} s", flush=True)
    kinds = ["generic", "vocabulary"] + (["heart-codebook"] if dataset == "heart" else [])
    for kind in kinds:
        texts = probe.public_texts(kind, tokenizer=loaded.tokenizer)
        _, public = probe.public_centre(loaded.model, task, loaded.tokenizer, texts,
                                        max_length=config.model.max_length, device=loaded.device)
        arrays[f"public/{kind}"] = public
    arrays["names"] = np.array(names)
    arrays["num_labels"] = np.array(workspace.num_labels)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    return _unpack(arrays)


def _unpack(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    names = [str(n) for n in arrays["names"]]
    return {
        "names": names,
        "num_labels": int(arrays["num_labels"]),
        "train": [(arrays[f"train/{i}/x"], arrays[f"train/{i}/y"]) for i in range(len(names))],
        "validation": [(arrays[f"validation/{i}/x"], arrays[f"validation/{i}/y"]) for i in range(len(names))],
        "test": (arrays["test/x"], arrays["test/y"]),
        "public": {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("public/")},
    }


def cosine(x: np.ndarray) -> float:
    """Mean pairwise cosine of rows (a sample of at most 2,000)."""
    x = x[:2000] / np.linalg.norm(x[:2000], axis=1, keepdims=True)
    n = len(x)
    return float(((x @ x.T).sum() - n) / (n * (n - 1)))


# --------------------------------------------------------------------------- the simulated federation


def score(head: Any, x: np.ndarray, y: np.ndarray, num_labels: int) -> dict[str, float]:
    from fedfm.tasks.metrics import classification_metrics

    logits = head.logits(x)
    return {k: float(v) for k, v in classification_metrics(y, logits.argmax(1), num_labels, 0.0).items()
            if k in ("accuracy", "macro-f1", "weighted-f1")}


def transform_for(data: dict[str, Any], centring: str, scaling: str) -> Any:
    """The feature transform of one centring option (``none``: no centring, public scale of raw generic text)."""
    from fedfm.privacy.probe import FeatureTransform, public_scale

    public = data["public"]["generic" if centring == "none" else centring]
    centre = np.zeros(public.shape[1], np.float32) if centring == "none" else public.mean(axis=0)
    return FeatureTransform(centre, public_scale(public, centre), scaling)


def federate(
    hospitals: list[tuple[np.ndarray, np.ndarray]], num_labels: int, *, rounds: int, steps: int,
    learning_rate: float, max_grad_norm: float, noise_multiplier: float, seed: int,
) -> Any:
    """``rounds`` rounds: every hospital takes ``steps`` DP-GD steps from the global head; row-weighted mean."""
    from fedfm.privacy import probe

    rng = np.random.default_rng(seed)
    width = hospitals[0][0].shape[1]
    head = probe.zero_head(num_labels, width)
    sizes = [len(y) for _, y in hospitals]
    for _ in range(rounds):
        local = [probe.dp_gd(x, y, head=head, steps=steps, learning_rate=learning_rate, max_grad_norm=max_grad_norm,
                             noise_multiplier=noise_multiplier, rng=rng)[0] for x, y in hospitals]
        head = probe.federated_average(local, sizes)
    return head


def evaluate_setting(
    data: dict[str, Any], setting: dict[str, Any], *, epsilon: float | None, seeds: list[int], final: bool,
) -> dict[str, Any]:
    """Mean ± std over seeds of one setting: on validation (train rows only) or, with ``final``, on test (train + validation rows)."""
    from fedfm.privacy import probe
    from fedfm.privacy.accounting import epsilon_of

    spec = transform_for(data, setting["centring"], setting["scaling"])
    hospitals = []
    for (xt, yt), (xv, yv) in zip(data["train"], data["validation"], strict=True):
        x, y = (np.concatenate([xt, xv]), np.concatenate([yt, yv])) if final else (xt, yt)
        hospitals.append((probe.transform(x, spec), y))
    if final:
        eval_x, eval_y = data["test"]
    else:
        eval_x = np.concatenate([x for x, _ in data["validation"]])
        eval_y = np.concatenate([y for _, y in data["validation"]])
    eval_z = probe.transform(eval_x, spec)
    total = setting["rounds"] * setting["steps"]
    if epsilon is None:  # no DP: no noise and a bound no gradient reaches
        sigma, clip = 0.0, 1e9
    else:
        sigma, clip = probe.probe_noise(epsilon, DELTA, total), setting["max_grad_norm"]
    runs = []
    for seed in seeds:
        head = federate(hospitals, data["num_labels"], rounds=setting["rounds"], steps=setting["steps"],
                        learning_rate=setting["learning_rate"], max_grad_norm=clip, noise_multiplier=sigma, seed=seed)
        runs.append(score(head, eval_z, eval_y, data["num_labels"]))
    out: dict[str, Any] = {"setting": setting, "epsilon": epsilon, "noise_multiplier": sigma, "seeds": seeds,
                           "rows": [len(y) for _, y in hospitals], "eval_rows": len(eval_y)}
    for key in runs[0]:
        values = np.array([r[key] for r in runs])
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "runs": values.round(4).tolist()}
    if epsilon is not None:
        out["epsilon_spent"] = epsilon_of(probe.probe_history(sigma, total), DELTA)
    return out


#: The no-DP references' own small grid (learning rate × total full-batch GD steps), chosen on validation too.
REFERENCE_LRS = (2.0, 8.0, 32.0, 128.0)
REFERENCE_STEPS = (200, 500, 1000)


def _plain_gd(x: np.ndarray, y: np.ndarray, num_labels: int, *, learning_rate: float, steps: int) -> Any:
    from fedfm.privacy import probe

    return probe.dp_gd(x, y, head=probe.zero_head(num_labels, x.shape[1]), steps=steps, learning_rate=learning_rate,
                       max_grad_norm=1e9, noise_multiplier=0.0)[0]


def local_alone(data: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """Each hospital alone, no DP: the probe (same features) by plain full-batch GD.

    Its learning rate and step count are chosen on that hospital's own validation
    rows (all it would have), then it trains on train + validation rows and is
    scored on the global test set.
    """
    from fedfm.privacy import probe

    metric = METRIC[data["dataset"]]
    spec = transform_for(data, setting["centring"], setting["scaling"])
    test_z = probe.transform(data["test"][0], spec)
    out = {}
    for name, (xt, yt), (xv, yv) in zip(data["names"], data["train"], data["validation"], strict=True):
        zt, zv = probe.transform(xt, spec), probe.transform(xv, spec)
        tried = {(lr, n): score(_plain_gd(zt, yt, data["num_labels"], learning_rate=lr, steps=n), zv, yv,
                                data["num_labels"])[metric]
                 for lr, n in itertools.product(REFERENCE_LRS, REFERENCE_STEPS)}
        lr, n = max(tried, key=lambda k: tried[k])
        head = _plain_gd(np.concatenate([zt, zv]), np.concatenate([yt, yv]), data["num_labels"], learning_rate=lr,
                         steps=n)
        out[name] = {"rows": len(yt) + len(yv), "learning_rate": lr, "steps": n, f"validation_{metric}": tried[(lr, n)],
                     **score(head, test_z, data["test"][1], data["num_labels"])}
    return out


def no_dp_setting(data: dict[str, Any], setting: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The federated probe without DP, its learning rate and rounds × steps chosen on validation (deterministic: one run each)."""
    metric = METRIC[data["dataset"]]
    trials = []
    for lr, (rounds, steps) in itertools.product(REFERENCE_LRS, [(10, 20), (20, 25), (20, 50)]):
        candidate = {**setting, "learning_rate": lr, "rounds": rounds, "steps": steps}
        trials.append(evaluate_setting(data, candidate, epsilon=None, seeds=[0], final=False))
    best = max(trials, key=lambda t: t[metric]["mean"])
    return best["setting"], trials


# --------------------------------------------------------------------------- selection on validation

METRIC = {"heart": "accuracy", "nicta": "macro-f1"}
START = {"centring": "generic", "scaling": "global", "max_grad_norm": 1.0, "learning_rate": 2.0, "rounds": 10,
         "steps": 20}


def grid(dataset: str, stage: str, best: dict[str, Any]) -> list[dict[str, Any]]:
    """Settings of one stage of a coordinate search, each changing the current best in the stage's keys."""
    if stage == "features":
        centrings = ["generic", "vocabulary", "none"] + (["heart-codebook"] if dataset == "heart" else [])
        pairs = list(itertools.product(centrings, ["global", "row"]))
        return [{**best, "centring": c, "scaling": s} for c, s in pairs]
    if stage == "optimizer":
        return [{**best, "max_grad_norm": c, "learning_rate": lr}
                for c, lr in itertools.product([0.1, 0.3, 1.0, 3.0], [0.5, 2.0, 8.0, 32.0, 128.0])]
    if stage == "schedule":
        return [{**best, "rounds": r, "steps": s} for r, s in [(1, 200), (4, 50), (10, 20), (10, 50), (20, 10),
                                                                 (20, 25), (40, 10), (20, 50), (50, 10), (10, 100),
                                                                 (40, 25)]]
    raise ValueError(stage)


def select(
    dataset: str, data: dict[str, Any], seeds: list[int], report: dict[str, Any], save: Any, *,
    epsilon: float = 8.0, start: dict[str, Any] | None = None,
    stages: tuple[str, ...] = ("features", "optimizer", "schedule", "features"),
) -> dict[str, Any]:
    """Coordinate search on validation at ``epsilon``: each stage keeps the best of its grid around the current best.

    At ε = 8 from :data:`START`: feature transform, then (C, lr), then (rounds, steps), then the
    feature transform again. At ε = 3 and 1 from the ε = 8 choice: (C, lr), then (rounds, steps).
    """
    metric = METRIC[dataset]
    best = dict(start or START)
    trials = report.setdefault("validation", [])
    for stage in stages:
        scored = []
        for setting in grid(dataset, stage, best):
            result = evaluate_setting(data, setting, epsilon=epsilon, seeds=seeds, final=False)
            trials.append({"stage": stage, **result})
            scored.append((result[metric]["mean"], result))
            print(f"[{dataset} validation ε {epsilon:g} {stage}] {_setting(setting)}: {metric} "
                  f"{result[metric]['mean']:.3f} ± {result[metric]['std']:.3f}", flush=True)
        best = max(scored, key=lambda item: item[0])[1]["setting"]
        print(f"[{dataset}] ε {epsilon:g} after {stage}: {_setting(best)}", flush=True)
        save()
    if epsilon == 8.0 and start is None:
        report["chosen"] = best
        # Is the foldable global scale within noise of per-row normalization?
        rows = {s: next((t for t in trials[::-1] if t["setting"] == {**best, "scaling": s} and t["epsilon"] == epsilon),
                        None) for s in ("global", "row")}
        report["global_vs_row"] = {s: (r[metric] if r else None) for s, r in rows.items()}
    return best


def _setting(s: dict[str, Any]) -> str:
    return (f"{s['centring']}/{s['scaling']} C {s['max_grad_norm']:g} lr {s['learning_rate']:g} "
            f"{s['rounds']}x{s['steps']}")


def prefer_foldable(dataset: str, report: dict[str, Any], data: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The chosen setting with a global scale when per-row normalization is not better by more than its noise."""
    metric = METRIC[dataset]
    best = report["chosen"]
    if best["scaling"] == "global":
        return best
    folded = {**best, "scaling": "global"}
    row = report["global_vs_row"]["row"]
    glob = evaluate_setting(data, folded, epsilon=8.0, seeds=seeds, final=False)
    report["validation"].append({"stage": "foldable", **glob})
    margin = np.hypot(row["std"], glob[metric]["std"]) / np.sqrt(len(seeds))
    print(f"[{dataset}] row {row['mean']:.3f} vs global {glob[metric]['mean']:.3f} (noise of the difference "
          f"{margin:.3f})", flush=True)
    if row["mean"] - glob[metric]["mean"] <= 2 * margin:
        report["chosen"] = folded
        return folded
    return best


# --------------------------------------------------------------------------- report


def table(report: dict[str, Any]) -> str:
    lines = ["| dataset | arm | setting | ε | σ | accuracy | macro-F1 | target |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for dataset, part in report["datasets"].items():
        for arm in part.get("test", []):
            eps = arm["epsilon"]
            target = TARGETS.get(dataset, "") if eps == 8.0 else ""
            lines.append(
                f"| {dataset} | {arm['arm']} | {_setting(arm['setting'])} | {'-' if eps is None else f'{eps:g}'} | {arm['noise_multiplier']:.3f} "
                f"| {arm['accuracy']['mean']:.3f} ± {arm['accuracy']['std']:.3f} "
                f"| {arm['macro-f1']['mean']:.3f} ± {arm['macro-f1']['std']:.3f} | {target} |"
            )
        for name, row in part.get("alone_no_dp", {}).items():
            lines.append(f"| {dataset} | probe alone, no DP: {name} ({row['rows']} rows) | lr {row['learning_rate']:g} "
                         f"{row['steps']} steps | - | - | {row['accuracy']:.3f} "
                         f"| {row['macro-f1']:.3f} | |")
        ceiling = part.get("centralized_converged_no_dp")
        if ceiling:
            lines.append(f"| {dataset} | probe pooled, L-BFGS to convergence, no DP (ceiling) | "
                         f"{ceiling['setting']['centring']}/{ceiling['setting']['scaling']} | - | - "
                         f"| {ceiling['accuracy']:.3f} | {ceiling['macro-f1']:.3f} | |")
        lora = part.get("lora_alone_no_dp") or {}
        for name, row in lora.get("hospitals", {}).items():
            lines.append(f"| {dataset} | LoRA alone, no DP ({lora['test_rows']} test rows): {name} | quality.py | - | - "
                         f"| {row['accuracy']:.3f} | {row['macro-f1']:.3f} | |")
    return "\n".join(lines)


TARGETS = {"heart": "accuracy ≥ 0.77", "nicta": "macro-F1 ≥ 0.45 and > best hospital alone"}


def run(dataset: str, *, cache: Path, seeds: int, report: dict[str, Any], save: Any) -> None:
    data = features(dataset, cache)
    data["dataset"] = dataset
    part = report["datasets"][dataset] = {}
    part["hospitals"] = {n: len(y) for n, (_, y) in zip(data["names"], data["train"], strict=True)}
    part["validation_rows"] = {n: len(y) for n, (_, y) in zip(data["names"], data["validation"], strict=True)}
    part["mean_pairwise_cosine_raw"] = cosine(np.concatenate([x for x, _ in data["train"]]))
    part["metric"] = METRIC[dataset]
    selection_seeds = list(range(seeds))
    best = select(dataset, data, selection_seeds, part, save)
    best = prefer_foldable(dataset, part, data, selection_seeds)
    print(f"[{dataset}] chosen on validation: {_setting(best)}", flush=True)
    save()
    # ε = 3 and 1 get their own optimizer and schedule, chosen on validation at that ε.
    chosen = {8.0: best}
    for epsilon in EPSILONS[1:]:
        chosen[epsilon] = select(dataset, data, selection_seeds, part, save, epsilon=epsilon, start=best,
                                 stages=("optimizer", "schedule"))
    part["chosen_by_epsilon"] = {f"{e:g}": c for e, c in chosen.items()}
    reference, part["no_dp_validation"] = no_dp_setting(data, best)
    print(f"[{dataset}] no-DP reference chosen on validation: {_setting(reference)}", flush=True)
    save()
    # Fresh seeds for the test figures, so selection noise does not carry over.
    test_seeds = list(range(1000, 1000 + seeds))
    part["test"] = []
    arms: list[tuple[str, float | None, dict[str, Any], list[int]]] = [
        *(("federated probe, DP-GD", e, chosen[e], test_seeds) for e in EPSILONS),
        ("federated probe, no DP", None, reference, test_seeds[:1]),
        *(("federated probe, DP-GD, the ε 8 setting", e, best, test_seeds) for e in EPSILONS[1:]),
    ]
    for label, epsilon, setting, run_seeds in arms:
        result = evaluate_setting(data, setting, epsilon=epsilon, seeds=run_seeds, final=True)
        result["arm"] = label
        part["test"].append(result)
        print(f"[{dataset} test] {label} ε {epsilon}: accuracy {result['accuracy']['mean']:.3f} ± "
              f"{result['accuracy']['std']:.3f}, macro-F1 {result['macro-f1']['mean']:.3f} ± "
              f"{result['macro-f1']['std']:.3f}  ({_setting(setting)})", flush=True)
        save()
    part["alone_no_dp"] = local_alone(data, best)
    part["lora_alone_no_dp"] = lora_alone(dataset)
    part["centralized_converged_no_dp"] = converged_ceiling(data, best)
    save()


def converged_ceiling(data: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """The linear probe's ceiling without DP: all hospitals' rows pooled, multinomial logistic regression run to
    convergence (L-BFGS, no penalty), scored on test. Not federated, not private: what no DP probe can beat."""
    import torch

    from fedfm.privacy import probe

    spec = transform_for(data, setting["centring"], setting["scaling"])
    x = torch.tensor(probe.transform(np.concatenate([np.concatenate([xt, xv]) for (xt, _), (xv, _)
                                                     in zip(data["train"], data["validation"], strict=True)]), spec))
    y = torch.tensor(np.concatenate([np.concatenate([yt, yv]) for (_, yt), (_, yv)
                                     in zip(data["train"], data["validation"], strict=True)]))
    weight = torch.zeros(data["num_labels"], x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(data["num_labels"], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    head = probe.Head(weight.detach().numpy(), bias.detach().numpy())
    return {"setting": setting, "rows": len(y),
            **score(head, probe.transform(data["test"][0], spec), data["test"][1], data["num_labels"])}


def lora_alone(dataset: str) -> dict[str, Any] | None:
    """fedfm's own LoRA training in each hospital alone, no DP, as ``benchmarks/quality.py`` measured it (read, not rerun).

    Same hospitals and seed, but its global test set is not capped (``test_rows``), so it is indicative only.
    """
    path = DEFAULT_OUT / f"quality-{dataset}.json"
    if not path.is_file():
        return None
    quality = json.loads(path.read_text())
    local = quality.get("arms", {}).get("local", {}).get("per_hospital", {})
    return {"source": str(path.relative_to(DEFAULT_OUT.parents[1])), "date": quality.get("date"),
            "test_rows": quality.get("global_test_rows"),
            "hospitals": {n: {"rows": a.get("train_rows"), **{k: a["global"][k] for k in ("accuracy", "macro-f1")}}
                          for n, a in local.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The private linear probe at ε = 8, 3, 1, settings chosen on validation.")
    parser.add_argument("--dataset", choices=("heart", "nicta", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FEDFM_PROBE_CACHE", "/tmp/fedfm-dp-probe")))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "dp-probe.json")
    parser.add_argument("--pooling", default="", choices=("", "mean", "layer-mean", "cls"),
                        help="model.pooling of the features (default: the model's own, mean for MiniLM)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="NICTA test rows (default 500; 0: all 1,991 official test sentences)")
    parser.add_argument("--model", default="",
                        help="model.name of the features (default minilm), e.g. an encoder from public_encoder.py")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only add the pooled, converged no-DP probe to an existing --out (at its chosen setting)")
    args = parser.parse_args(argv)
    _environment()
    OPTIONS.update(pooling=args.pooling, max_test=args.max_test, model=args.model)
    if args.ceiling_only:
        report = json.loads(args.out.read_text())
        for dataset, part in report["datasets"].items():
            data = features(dataset, args.cache)
            part["centralized_converged_no_dp"] = converged_ceiling(data, part["chosen"])
            print(f"[{dataset}] pooled converged probe, no DP: {part['centralized_converged_no_dp']}", flush=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(table(report))
        return 0
    report: dict[str, Any] = {"delta": DELTA, "validation_fraction": VALIDATION_FRACTION, "seeds": args.seeds,
                              "pooling": args.pooling or "model default", "max_test": args.max_test,
                              "model": args.model or "minilm",
                              "aggregation": "FedAvg weighted by hospital row counts", "datasets": {}}
    if args.out.is_file():
        report = json.loads(args.out.read_text()) | {"seeds": args.seeds}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(report, indent=1) + "\n")
        partial.replace(args.out)

    for dataset in (("heart", "nicta") if args.dataset == "all" else (args.dataset,)):
        started = time.perf_counter()
        run(dataset, cache=args.cache, seeds=args.seeds, report=report, save=save)
        report["datasets"][dataset]["wall_seconds"] = round(time.perf_counter() - started, 1)
        save()
    print(table(report))
    return 0


if __name__ == "__main__":
    _environment()
    if "--features-only" in sys.argv:
        cache_dir = Path(os.environ.get("FEDFM_PROBE_CACHE", "/tmp/fedfm-dp-probe"))
        for ds in sys.argv[sys.argv.index("--features-only") + 1:]:
            features(ds, cache_dir)
        sys.exit(0)
    sys.exit(main())
