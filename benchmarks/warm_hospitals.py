"""A round on Flower's Deployment Engine with warm hospitals, beside the same round in the in-process simulation.

The same federation (NICTA-PIBOSO, 5 Dirichlet(0.5) hospitals, MiniLM, fixed
local steps, no evaluation between rounds), run on this machine by:

``simulation``
    ``fedfm run`` with the in-process backend: every hospital in one process,
    one after the other.
``warm``
    A SuperLink and one SuperNode per hospital (``--isolation process``), each
    beside one ``fedfm hospital`` process that runs all its instructions
    (benchmarks/deployment_engine.py, ``warm=True``).
``cold``
    The same network with Flower's default ``--isolation subprocess``: a fresh
    ``flwr-clientapp`` process per instruction (reference only, ``--arms``).

Each arm's round times come from its run directory's ``metrics.jsonl``
(``seconds``: the server's wall time of the round, from sending the
instructions to the recorded round). Round 1 loads the model in every process,
so "once warm" is the median of rounds 2 and later. The arms alternate
``--repeats`` times so that the machine's noise falls on both. Target (issue 27):
warm median <= 1.2x the simulation's.

Usage::

    python benchmarks/warm_hospitals.py                      # simulation and warm, 2 repeats
    python benchmarks/warm_hospitals.py --arms simulation,warm,cold --repeats 1
    python benchmarks/warm_hospitals.py --quick              # smoke test (2 rounds, 2 steps)

Writes ``<out>/warm-hospitals.json`` (``warm-hospitals-quick.json`` with ``--quick``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from deployment_engine import LocalFederation, _executable
from quality import DEFAULT_OUT, NICTA_SETTINGS, _environment, device_info

from fedfm.config import parse_override

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("simulation", "warm", "cold")

#: Fixed local steps and no evaluation until after the last round, so every round does the same work.
SETTINGS: dict[str, Any] = {
    **NICTA_SETTINGS,
    "train.local-steps": 20,
    "federation.num-rounds": 5,
    "federation.central-evaluation": False,
    "federation.fraction-evaluate": 0.0,
    "federation.evaluate-every": 5,
    "federation.backend": "in-process",
}
QUICK: dict[str, Any] = {"train.local-steps": 2, "federation.num-rounds": 2, "federation.evaluate-every": 2,
                         "data.max-train-per-hospital": 40}


def _round_seconds(run_dir: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_arm(arm: str, settings: dict[str, Any], folder: Path, *, threads: int, logs: Path | None = None
            ) -> dict[str, Any]:
    """One run of ``arm``; its round seconds and what each hospital process loaded."""
    run_dir = folder / "run"
    flat = {**settings, "output.dir": str(run_dir)}
    if arm == "simulation":
        command = [_executable("fedfm"), "run", "--no-progress", "--out", str(run_dir),
                   *[arg for key, value in flat.items() for arg in ("--set", f"{key}={json.dumps(value)}")]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fedfm run exited with {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        loads = {"server": done.stdout.count("loaded base model")}
    else:
        with LocalFederation(folder / "network", hospitals=settings["data.num-hospitals"], warm=arm == "warm",
                             threads=threads, keep_logs=logs) as federation:
            federation.run(flat, timeout=3600)
            loads = {name: federation.log(name).count("loaded base model")
                     for name in federation.processes if name.startswith("hospital-")}
    seconds = _round_seconds(run_dir)
    return {"arm": arm, "round_seconds": seconds, "warm_median": statistics.median(seconds[1:] or seconds),
            "base_model_loads": loads}


def main(argv: list[str] | None = None) -> int:
    _environment()
    parser = argparse.ArgumentParser(description="Deployment Engine rounds with warm hospitals vs the simulation.")
    parser.add_argument("--arms", default="simulation,warm", help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--repeats", type=int, default=2, help="times the arms alternate (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of each warm hospital process (0: what the run derives from the cores)")
    parser.add_argument("--quick", action="store_true", help="tiny run: a smoke test, not a result")
    parser.add_argument("--logs", type=Path, help="keep each network's process logs in LOGS/<arm>-<repeat>/")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        print(f"error: --arms {unknown} not among {list(ARMS)}", file=sys.stderr)
        return 2
    settings = {**SETTINGS, **(QUICK if args.quick else {})}
    settings.update(parse_override(text) for text in args.overrides)
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for arm in arms:
            with tempfile.TemporaryDirectory(prefix=f"fedfm-{arm}-") as tmp:
                result = run_arm(arm, settings, Path(tmp), threads=args.threads,
                                 logs=args.logs / f"{arm}-{repeat}" if args.logs else None)
            result["repeat"] = repeat
            runs.append(result)
            print(f"{arm:10} repeat {repeat}: rounds {[round(s, 1) for s in result['round_seconds']]} s, "
                  f"median from round 2 {result['warm_median']:.1f} s, base model loads {result['base_model_loads']}",
                  flush=True)
    medians = {arm: statistics.median(r["warm_median"] for r in runs if r["arm"] == arm) for arm in arms}
    ratios = {arm: medians[arm] / medians["simulation"] for arm in arms if "simulation" in medians}
    import torch

    report = {
        "benchmark": "warm-hospitals", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings, "threads_per_hospital_process": args.threads, "device": device_info(torch.device("cpu")),
        "runs": runs, "median_round_seconds_from_round_2": medians, "ratio_to_simulation": ratios,
        "target": "warm <= 1.2x simulation",
    }
    print("\narm          median round (s, rounds 2+)   x simulation")
    for arm in arms:
        print(f"{arm:12} {medians[arm]:10.1f}                   {ratios.get(arm, float('nan')):.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("warm-hospitals-quick.json" if args.quick else "warm-hospitals.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
