"""What privacy costs: DP-SGD at several ε against no DP, on the same federation, side by side.

Each arm is a real federation (Flower simulation) with the same model, data,
rounds and local epochs; only ``[privacy]`` changes. For every arm:

- the global model's accuracy, macro-F1 and weighted-F1 on the global test set;
- the ε each hospital spent (from its own Opacus accountant) and the budget;
- training throughput: examples per second of local training, summed over the
  hospitals and rounds, for the arm without DP (a DP hospital reports no
  training time, an unnoised statistic of its rows); every arm's wall time,
  and its ratio to the no-DP arm's;
- which DP recipe ran (``privacy.recipe``: the linear probe or LoRA);
- the membership-inference audit: loss-threshold attack AUC per hospital
  (members: its training rows; non-members: its held-out rows).

Anchor: DP-LoRA (Yu et al., ICLR 2022) lost 2.4 points on MNLI at ε ≈ 6.7.

Usage::

    python benchmarks/privacy.py                       # NICTA-PIBOSO: no DP, ε = 8, 3, 1
    python benchmarks/privacy.py --epsilons 8          # one DP arm against no DP
    python benchmarks/privacy.py --quick --dataset heart   # smoke test

Writes ``<out>/privacy.json`` (``privacy-<dataset>[-quick].json`` otherwise)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quality import DEFAULT_OUT, HEART_TOML, NICTA_SETTINGS, _environment, device_info

#: The quality benchmark's NICTA federation (5 hospitals, Dirichlet 0.5, one
#: local epoch per round), in bf16 and scored only after the last round. Four
#: rounds instead of eight keep the four arms near an hour on two cores.
NICTA: dict[str, Any] = {
    **NICTA_SETTINGS,
    "model.dtype": "bfloat16",
    "federation.num-rounds": 4,
    "federation.evaluate-every": 4,
}

#: Settings of the DP-SGD arms only (``--dp-set`` replaces them).
DP_RECIPE: dict[str, Any] = {}

QUICK: dict[str, Any] = {
    "data.max-train-per-hospital": 32,
    "data.max-test": 96,
    "federation.num-rounds": 2,
    "federation.evaluate-every": 2,
}


def _heart() -> dict[str, Any]:
    from fedfm.config import load_config

    return {**load_config(HEART_TOML).to_flat(), "federation.fraction-evaluate": 0.0}


def run_arm(label: str, settings: dict[str, Any], *, verbose: bool) -> dict[str, Any]:
    """One federation; its quality, ledger, throughput and audit."""
    import fedfm
    from fedfm.config import RunConfig
    from fedfm.privacy.hospital import recipe_of

    config = RunConfig().replace(**settings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedfm-privacy-") as tmp:
        result = fedfm.run(config, out=Path(tmp) / "run", verbose=verbose)
    wall = time.perf_counter() - started
    # A DP-SGD hospital sends no training time or drawn-row count (they are unnoised statistics of its rows),
    # so throughput is known for the arm without DP only; every arm has its wall time.
    examples = seconds = 0.0
    for line in result.history:
        for hospital in line["per_hospital"].values():
            train = hospital.get("train", {})
            examples += train.get("train-examples", 0.0)
            seconds += train.get("train-seconds", 0.0)
    ledger = result.summary["privacy"]["hospitals"]
    audit = result.summary["privacy"]["audit"] or {}
    arm = {
        "label": label,
        "privacy": {k: v for k, v in settings.items() if k.startswith("privacy.")},
        "recipe": recipe_of(config) if config.privacy.mode == "dp-sgd" else None,
        "global": result.final_global,
        "epsilon_spent": {name: row["epsilon"] for name, row in ledger.items()},
        "epsilon_budget": {name: row["target_epsilon"] for name, row in ledger.items()},
        "noise_multiplier": {name: row["noise_multiplier"] for name, row in ledger.items()},
        "audit_auc": {name: row["auc"] for name, row in audit.get("hospitals", {}).items()},
        "audit_mean_auc": audit.get("mean_auc"),
        "train_examples": examples,
        "train_seconds": round(seconds, 2),
        "examples_per_second": examples / seconds if seconds else float("nan"),
        "wall_seconds": round(wall, 1),
    }
    eps = max(arm["epsilon_spent"].values()) if arm["epsilon_spent"] else None
    print(
        f"[{label}] macro-F1 {arm['global'].get('macro-f1', float('nan')):.3f}  "
        f"accuracy {arm['global'].get('accuracy', float('nan')):.3f}  "
        f"max ε {'-' if eps is None else f'{eps:.2f}'}  audit AUC {arm['audit_mean_auc'] or float('nan'):.3f}  "
        f"{arm['examples_per_second']:.1f} examples/s  {wall:.0f} s wall",
        flush=True,
    )
    return arm


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one arm: the last run's record, with the global scores' mean and spread over all."""
    import statistics

    arm = dict(runs[-1])
    names = [name for name in runs[0]["global"] if all(name in run["global"] for run in runs)]
    arm["global"] = {name: statistics.mean(run["global"][name] for run in runs) for name in names}
    arm["global_std"] = {name: statistics.stdev(run["global"][name] for run in runs) for name in names}
    arm["runs"] = [run["global"] for run in runs]
    arm["wall_seconds"] = round(statistics.mean(run["wall_seconds"] for run in runs), 1)
    return arm


def _pm(spread: dict[str, float], name: str) -> str:
    return f" ± {spread[name]:.3f}" if name in spread else ""


def _rate(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"  # NaN: a DP arm reports no training time


def markdown(arms: list[dict[str, Any]]) -> str:
    """The arms as a Markdown table (throughput relative to the first, no-DP arm)."""
    reference_wall = arms[0]["wall_seconds"] if arms else float("nan")
    lines = [
        ("| arm | accuracy | macro-F1 | weighted-F1 | max ε spent | σ (max) | audit AUC (mean) "
         "| examples/s | wall vs no DP | s |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in arms:
        g = arm["global"]
        eps = max(arm["epsilon_spent"].values()) if arm["epsilon_spent"] else None
        sigma = max(arm["noise_multiplier"].values()) if arm["noise_multiplier"] else None
        auc = arm["audit_mean_auc"]
        spread = arm.get("global_std", {})
        label = f"{arm['label']} (mean of {len(arm['runs'])})" if "runs" in arm else arm["label"]
        lines.append(
            f"| {label} | {g.get('accuracy', float('nan')):.3f}{_pm(spread, 'accuracy')} "
            f"| {g.get('macro-f1', float('nan')):.3f}{_pm(spread, 'macro-f1')} "
            f"| {g.get('weighted-f1', float('nan')):.3f} | {'-' if eps is None else f'{eps:.2f}'} "
            f"| {'-' if sigma is None else f'{sigma:.3f}'} | {'-' if auc is None else f'{auc:.3f}'} "
            f"| {_rate(arm['examples_per_second'])} | {arm['wall_seconds'] / reference_wall:.2f}x "
            f"| {arm['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="DP-SGD at several ε against no DP, side by side.")
    parser.add_argument("--dataset", choices=("nicta", "heart"), default="nicta")
    parser.add_argument("--epsilons", default="8,3,1", help="comma-separated ε budgets, one DP-SGD arm each")
    parser.add_argument("--quick", action="store_true", help="tiny caps: a smoke test, not a result")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="setting applied to every arm, last; repeatable")
    parser.add_argument("--dp-set", dest="dp_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="setting applied to the DP-SGD arms only (the DP recipe, e.g. privacy.batch-size=64); "
                             f"default: {' '.join(f'{k}={v}' for k, v in DP_RECIPE.items())}")
    parser.add_argument("--no-reference", action="store_true",
                        help="run the DP arms only (no arm without DP to compare against)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each DP arm (its noise and sampling come from OS entropy, so each run differs); "
                             "the table shows their mean and spread, the JSON every run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    except ValueError:
        parser.error(f"--epsilons must be numbers, got {args.epsilons!r}")

    _environment()
    from fedfm import privacy, strategies
    from fedfm.config import RunConfig, parse_override
    from fedfm.errors import ConfigError
    from fedfm.workspace import federation_for

    base = NICTA if args.dataset == "nicta" else _heart()
    base = {**base, "privacy.audit": True}
    if args.quick:
        base.update(QUICK)
    base.update(dict(parse_override(text) for text in args.overrides))
    recipe = dict(parse_override(text) for text in args.dp_overrides) if args.dp_overrides else DP_RECIPE
    plan = [] if args.no_reference else [("no DP", {**base, "privacy.mode": "none"})]
    plan += [(f"DP-SGD ε={e:g}", {**base, **recipe, "privacy.mode": "dp-sgd", "privacy.target-epsilon": e})
             for e in epsilons]
    try:
        # Every arm is checked (strategy, DP calibration for each hospital) before the first one runs.
        for _, settings in plan:
            config = RunConfig().replace(**settings)
            strategies.check(config)
            privacy.check(config, federation_for(config.data))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    arms: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    name = "privacy" if args.dataset == "nicta" else f"privacy-{args.dataset}"
    path = args.out / f"{name}{'-quick' if args.quick else ''}.json"

    def write() -> None:
        """The report so far (after every arm, so a run cut off keeps what it measured)."""
        import torch

        reference = arms[0] if not args.no_reference else None
        report = {
            "benchmark": "privacy",
            "quick": args.quick,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "dataset": args.dataset,
            "dp_recipe": recipe,
            "repeats": args.repeats,
            "arms": arms,
            "comparison": {
                arm["label"]: {
                    "macro_f1_drop_points": 100 * (reference["global"].get("macro-f1", 0.0)
                                                   - arm["global"].get("macro-f1", 0.0)),
                    "wall_vs_no_dp": arm["wall_seconds"] / reference["wall_seconds"],
                }
                for arm in (arms[1:] if reference is not None else [])
            },
            "targets": {"macro_f1_drop_points_at_eps8": 5.0},
            "device": device_info(torch.device("cpu")),
            "total_wall_seconds": round(time.perf_counter() - started, 1),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)

    for label, settings in plan:
        runs = []
        for repeat in range(1 if settings["privacy.mode"] == "none" else max(1, args.repeats)):
            print(f"== {label}" + (f" (run {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""), flush=True)
            runs.append(run_arm(label, settings, verbose=args.verbose))
        arm = runs[-1] if len(runs) == 1 else _summarize(runs)
        arm["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
        arms.append(arm)
        write()
    print()
    print(markdown(arms))
    print(f"\nwritten: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
