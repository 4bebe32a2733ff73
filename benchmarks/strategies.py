"""Every aggregation strategy on the same non-IID federation, side by side.

Three parts, each a series of real federations (Flower simulation) with the
same model, data, rounds and local steps; only the strategy changes:

``compare``
    Every registered strategy on NICTA-PIBOSO, 8 hospitals by Dirichlet(0.3)
    label skew: final global macro-F1 on the official test split, each
    hospital's macro-F1 on its own test split (worst and mean), bytes per round.
``ranks``
    Heterogeneous LoRA ranks 4/8/16 across the hospitals (global rank 16):
    FLoRA (stacking) and HetLoRA (sparsity-weighted) against plain zero-padded
    averaging by example counts.
``robust``
    10 hospitals, of which 2 send their update sign-flipped and scaled
    (``[attack]``): FedAvg without and with the attack, then median, trimmed
    mean, Krum and MultiKrum under it.

Usage::

    python benchmarks/strategies.py                         # all three parts
    python benchmarks/strategies.py --parts ranks,robust
    python benchmarks/strategies.py --quick --strategies fedavg,flora   # smoke test

Writes ``<out>/strategies.json`` (``strategies-quick.json`` with ``--quick``,
``--name`` for another) after every arm, so a run cut off keeps what it measured,
and prints a Markdown table per part. ``--merge`` keeps the file's arms and parts
this run does not measure (an arm measured again replaces the old one).
With ``--set data.validation-fraction=0.1`` each arm also records the hospitals'
validation scores, which is what strategy settings are chosen on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quality import DEFAULT_OUT, _environment, device_info

#: The federation every part starts from. Local steps (not epochs) so every
#: hospital does the same work per round, whatever its size; the hospitals
#: score the final adapter on their own test splits only after the last round.
#: Probes on the pooled training rows (150 steps, 500 test sentences): lr 3e-3
#: reached macro-F1 0.355, 5e-3 0.203, 1e-2 stayed at the majority class, and
#: LoRA also on the `dense` layers stayed there too; bf16 autocast trained 1.3x
#: faster to the same figures (0.357), so the benchmark uses it.
BASE: dict[str, Any] = {
    "model.name": "minilm",
    "model.task": "sequence-classification",
    "model.max-length": 96,
    "model.dtype": "bfloat16",
    "lora.r": 8,
    "lora.alpha": 16.0,
    "data.dataset": "nicta_piboso",
    "data.partitioner": "dirichlet",
    "data.num-hospitals": 8,
    "data.alpha": 0.3,
    "data.max-test": 500,
    "train.batch-size": 16,
    "train.learning-rate": 3e-3,
    "train.local-steps": 12,
    "federation.num-rounds": 8,
    "federation.min-hospitals": 8,
    "federation.evaluate-every": 8,
}

#: The same comparison on UCI heart disease: four real hospitals (the quickstart's
#: settings), where FedAvg learns within a few rounds on two cores. For the
#: robustness part the 740 patients are split IID into 10 hospitals.
HEART: dict[str, Any] = {
    "model.name": "minilm",
    "model.task": "sequence-classification",
    "model.max-length": 96,
    "model.dtype": "bfloat16",
    "lora.r": 8,
    "lora.alpha": 16.0,
    "data.dataset": "heart_disease_uci",
    "data.partitioner": "natural",
    "train.batch-size": 16,
    "train.learning-rate": 2e-3,
    "train.local-steps": 6,
    "federation.num-rounds": 5,
    "federation.min-hospitals": 4,
    "federation.evaluate-every": 5,
}
HEART_ROBUST = {"data.partitioner": "iid", "data.num-hospitals": 10}

#: Each part: settings on top of BASE, and its arms (label, strategy, extra settings).
PARTS: dict[str, dict[str, Any]] = {
    "compare": {
        # 16 rounds, not 8: at 8 every strategy was still leaving the majority-class plateau and the
        # score of the last round was a lottery (FedAvg, seed 0, rounds 6-8: 0.221, 0.125, 0.363). By
        # round 16 FedAvg and FedAvgM are both past it (0.441 and 0.406); FedAvg still swings by ~0.1
        # from round to round, so compare arms over seeds where it matters (docs/strategies.md).
        "settings": {"federation.num-rounds": 16, "federation.evaluate-every": 16},
        "arms": [(name, name, {}) for name in (
            "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg",
            "krum", "multikrum", "ffa-lora", "fedsa-lora", "hetlora", "flora",
        )],
    },
    "ranks": {
        "settings": {"lora.r": 16, "lora.alpha": 32.0, "federation.client-ranks": (4, 8, 16)},
        "arms": [
            ("flora", "flora", {}),
            ("hetlora (sparsity-weighted)", "hetlora", {}),
            ("zero-padded averaging", "hetlora", {"strategy.hetlora-weighting": "examples"}),
        ],
    },
    "robust": {
        "settings": {
            "data.num-hospitals": 10,
            "federation.min-hospitals": 10,
            "attack.hospitals": (8, 9),
            "attack.kind": "sign-flip",
            "attack.scale": 5.0,
            "strategy.byzantine": 2,
        },
        "arms": [
            ("fedavg, no attack", "fedavg", {"attack.hospitals": ()}),
            ("fedavg", "fedavg", {}),
            ("fedmedian", "fedmedian", {}),
            ("fedtrimmedavg", "fedtrimmedavg", {}),
            ("krum", "krum", {}),
            ("multikrum", "multikrum", {}),
        ],
    },
}

QUICK: dict[str, Any] = {
    "data.max-train-per-hospital": 24,
    "data.max-test": 60,
    "train.local-steps": 2,
    "federation.num-rounds": 2,
    "federation.evaluate-every": 2,
}


def run_arm(label: str, settings: dict[str, Any], *, verbose: bool) -> dict[str, Any]:
    """One federation; the figures the tables need."""
    import fedfm
    from fedfm.config import RunConfig

    config = RunConfig().replace(**settings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedfm-strategies-") as tmp:
        result = fedfm.run(config, out=Path(tmp) / "run", verbose=verbose)
    wall = time.perf_counter() - started
    # A personalized strategy's hospitals report their own model as `personalized-*`; the plain scores are the
    # shared part alone (FedSA-LoRA: A and the head with B at zero).
    per_hospital = {name: m.get("personalized-macro-f1", m.get("macro-f1", float("nan")))
                    for name, m in result.final_per_hospital.items()}
    worst = min(per_hospital, key=lambda name: per_hospital[name]) if per_hospital else ""
    rounds = max(1, len(result.history))
    left_out = sum(len(line.get("left_out", {})) for line in result.history)
    # The hospitals' validation scores of the last evaluated round (data.validation-fraction > 0):
    # what settings are chosen on; the test figures are only reported.
    validated = [line["validation"] for line in result.history if line.get("validation")]
    arm = {
        "label": label,
        "strategy": config.federation.strategy,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "global": result.final_global,
        "validation": validated[-1] if validated else {},
        "per_hospital_macro_f1": per_hospital,
        "worst_hospital": worst,
        "worst_hospital_macro_f1": per_hospital.get(worst, float("nan")),
        "mean_hospital_macro_f1": sum(per_hospital.values()) / len(per_hospital) if per_hospital else float("nan"),
        "bytes_up_per_round": result.summary["bytes"]["up"] / rounds,
        "bytes_down_per_round": result.summary["bytes"]["down"] / rounds,
        "global_adapter_bytes": result.summary.get("adapter_bytes"),
        "left_out_replies": left_out,
        "personalized": result.summary.get("personalized", False),
        "wall_seconds": round(wall, 1),
    }
    validation = f"validation macro-F1 {arm['validation']['macro-f1']:.3f}  " if "macro-f1" in arm["validation"] else ""
    print(
        f"[{label}] {validation}global macro-F1 {arm['global'].get('macro-f1', float('nan')):.3f}  "
        f"loss {arm['global'].get('loss', float('nan')):.4f}  "
        f"worst hospital {arm['worst_hospital_macro_f1']:.3f}  "
        f"up {arm['bytes_up_per_round'] / 1e6:.2f} MB/round  {wall:.0f} s",
        flush=True,
    )
    return arm


def markdown(part: str, arms: list[dict[str, Any]]) -> str:
    """One part's arms as a Markdown table."""
    lines = [
        f"**{part}**",
        "",
        ("| strategy | global acc. | global macro-F1 | global loss | worst hospital macro-F1 | mean hospital macro-F1 "
         "| MB up / round | MB down / round | s |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in arms:
        g = arm["global"]
        label = arm["label"] + (" (personalized)" if arm["personalized"] else "")
        lines.append(
            f"| {label} | {g.get('accuracy', float('nan')):.3f} | {g.get('macro-f1', float('nan')):.3f} "
            f"| {g.get('loss', float('nan')):.4f} | {arm['worst_hospital_macro_f1']:.3f} | {arm['mean_hospital_macro_f1']:.3f} "
            f"| {arm['bytes_up_per_round'] / 1e6:.2f} | {arm['bytes_down_per_round'] / 1e6:.2f} "
            f"| {arm['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="All aggregation strategies on the same federation, side by side.")
    parser.add_argument("--dataset", choices=("nicta", "heart"), default="nicta",
                        help="nicta (NICTA-PIBOSO, 8 Dirichlet(0.3) hospitals) or heart (4 real hospitals)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--strategies", default="", help="only arms whose strategy is in this comma-separated list")
    parser.add_argument("--quick", action="store_true", help="tiny caps: a smoke test, not a result")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="setting applied to every arm, last; repeatable")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="", help="file name without .json (default strategies / strategies-heart)")
    parser.add_argument("--tag", default="", help="appended to every arm's label, e.g. the settings a sweep tries")
    parser.add_argument("--merge", action="store_true",
                        help="keep the file's arms and parts this run does not measure (same dataset only)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts must name some of {list(PARTS)}, got {args.parts!r}")
    only = {s.strip() for s in args.strategies.split(",") if s.strip()}

    _environment()
    from fedfm import strategies
    from fedfm.config import RunConfig, parse_override
    from fedfm.errors import ConfigError

    overrides = dict(parse_override(text) for text in args.overrides)
    base = BASE if args.dataset == "nicta" else HEART
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for part in parts:
        for label, name, extra in PARTS[part]["arms"]:
            if only and name not in only:
                continue
            settings = {**base, **PARTS[part]["settings"], **extra, "federation.strategy": name}
            if args.dataset == "heart" and part == "robust":
                settings.update(HEART_ROBUST)
            if args.quick:
                settings.update(QUICK)
            settings.update(overrides)
            plan.append((part, f"{label} ({args.tag})" if args.tag else label, settings))
    try:
        # Every arm's configuration is checked before the first one spends minutes.
        for _, _, settings in plan:
            strategies.check(RunConfig().replace(**settings))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("strategies" if args.dataset == "nicta" else "strategies-heart")
    path = args.out / f"{name}{'-quick' if args.quick else ''}.json"
    # Arms this run measures replace the file's arms of the same part and label; the file's other
    # arms and parts stay (each arm carries its own date), so a part or a few arms can be rerun alone.
    def previous_parts() -> dict[str, Any] | None:
        # Read again before every write: another run may be merging its arms into the same file.
        if not (args.merge and path.exists()):
            return {}
        previous = json.loads(path.read_text())
        if previous.get("dataset") != args.dataset or previous.get("quick") != args.quick:
            print(f"error: {path} holds dataset {previous.get('dataset')!r} quick={previous.get('quick')}, "
                  f"not {args.dataset!r} quick={args.quick}; choose another --name", file=sys.stderr)
            return None
        return dict(previous.get("parts", {}))

    if previous_parts() is None:
        return 2

    def plain(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}

    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {part: [] for part in parts}

    def write() -> None:
        # After every arm, so a run cut off keeps what it measured.
        kept = previous_parts() or {}
        merged: dict[str, Any] = {}
        for part in [*kept, *(p for p in results if p not in kept)]:
            fresh = results.get(part, [])
            labels = {arm["label"] for arm in fresh}
            old = [arm for arm in kept.get(part, {}).get("arms", []) if arm["label"] not in labels]
            order = [label for label, _, _ in PARTS[part]["arms"]] if part in PARTS else []
            arms = sorted([*old, *fresh], key=lambda a: order.index(a["label"]) if a["label"] in order else len(order))
            merged[part] = {"settings": plain(PARTS[part]["settings"]) if part in PARTS else {}, "arms": arms}
        report = {
            "benchmark": "strategies",
            "quick": args.quick,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "dataset": args.dataset,
            "base_settings": plain(base),
            "overrides": overrides,
            "parts": merged,
            "device": device_info(torch.device("cpu")),
            "total_wall_seconds": round(time.perf_counter() - started, 1),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)

    for part, label, settings in plan:
        print(f"== {part}: {label}", flush=True)
        arm = run_arm(label, settings, verbose=args.verbose)
        arm["settings"] = plain(settings)
        results[part].append(arm)
        write()

    print()
    for part, arms in results.items():
        print(markdown(part, arms))
        print()
    print(f"written: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
