"""What a simulated hospital costs: framework overhead, memory as hospitals grow, bytes per round.

Three parts, each compared side by side in one run:

``overhead``
    Wall time of a whole simulated run (5 NICTA hospitals, 3 rounds, fixed
    local steps, no evaluation between rounds) divided by the time the same
    local steps take in a plain peft + torch loop run back to back in this
    process (same model, rows, batch size and batching; the adapter swapped
    per hospital, averaged per round). Target: at most 1.15x. Timed on each
    of ``--backends`` (default: fedfm's in-process backend, then Flower's Ray
    backend), one after the other in the same process.
``memory``
    Peak resident memory of the whole process tree (the run and every worker
    it starts) for 2, 20 and 100 simulated hospitals, 1 round, the same 200
    training steps in all at every size (100 hospitals x 2 steps, 2 x 100),
    each size in a fresh process, on each of ``--backends``. Target: 100
    hospitals use at most 1.5x the memory of 2.
``communication``
    Bytes per hospital per round, measured on the messages, for LoRA r=8
    as float32 and with each ``[compression] method``, beside the computed
    bytes of exchanging the full model; and the final macro-F1 on
    NICTA-PIBOSO (5 Dirichlet(0.5) hospitals) for each. Target: int8 within
    0.5 points of uncompressed at about a quarter of its bytes.

Usage::

    python benchmarks/scale.py                      # all three parts
    python benchmarks/scale.py --parts memory --hospitals 2,20,100
    python benchmarks/scale.py --quick              # smoke test

Writes ``<out>/scale.json`` (``scale-quick.json`` with ``--quick``), keeping the parts of an
earlier file that this run did not redo, and prints tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from quality import DEFAULT_OUT, NICTA_SETTINGS, _environment, device_info
from strategies import QUICK

#: The overhead run: fixed local steps so both sides do exactly the same work.
OVERHEAD: dict[str, Any] = {
    **NICTA_SETTINGS,
    "train.local-steps": 30,
    "federation.num-rounds": 3,
    "federation.central-evaluation": False,
    "federation.fraction-evaluate": 0.0,
    "federation.evaluate-every": 3,
}

#: The memory runs: many small hospitals, one round, nothing evaluated (local steps: see memory()).
MEMORY: dict[str, Any] = {
    **NICTA_SETTINGS,
    "data.partitioner": "iid",
    "train.local-steps": 2,
    "federation.num-rounds": 1,
    "federation.central-evaluation": False,
    "federation.fraction-evaluate": 0.0,
}

#: The communication runs: the privacy benchmark's NICTA federation (4 rounds x 1 epoch, bf16).
COMMUNICATION: dict[str, Any] = {
    **NICTA_SETTINGS,
    "model.dtype": "bfloat16",
    "federation.num-rounds": 4,
    "federation.evaluate-every": 4,
}
METHODS = ("none", "float16", "int8", "topk")


def _run(settings: dict[str, Any]) -> tuple[Any, float]:
    import fedfm
    from fedfm.config import RunConfig

    config = RunConfig().replace(**settings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedfm-scale-") as tmp:
        result = fedfm.run(config, out=Path(tmp) / "run")
    return result, time.perf_counter() - started


def plain_loop(settings: dict[str, Any]) -> dict[str, Any]:
    """The same local steps as the simulated run, in one process with a plain peft + torch loop."""
    import numpy as np
    import torch

    from fedfm.adapters import get_adapter_state, set_adapter_state
    from fedfm.config import RunConfig
    from fedfm.train import autocast, bucketed_batches
    from fedfm.workspace import workspace_for

    config = RunConfig().replace(**settings)
    workspace = workspace_for(config)  # model load and tokenization are not timed (the run loads once too)
    model, task, tokenizer = workspace.loaded.model, workspace.task, workspace.loaded.tokenizer
    device, spec = workspace.loaded.device, config.train
    hospitals = [workspace.hospital_rows("train", i) for i in range(len(workspace.hospital_names))]
    collate = task.collate(tokenizer)
    global_state = {k: v.clone() for k, v in workspace.loaded.initial_state.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    steps = 0
    started = time.perf_counter()
    for server_round in range(config.federation.num_rounds):
        states = []
        for index, rows in enumerate(hospitals):
            set_adapter_state(model, global_state)
            optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
            rng = np.random.default_rng(server_round * 1009 + index)
            lengths = [len(ids) for ids in rows["input_ids"]]
            batches: list[list[int]] = []
            while len(batches) < spec.local_steps:
                batches.extend(bucketed_batches(lengths, spec.batch_size, rng))
            model.train()
            for batch_rows in batches[: spec.local_steps]:
                batch = {k: v.to(device) for k, v in collate([rows[i] for i in batch_rows]).items()}
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, config.model.dtype):
                    loss = task.loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                steps += 1
            model.eval()
            states.append(get_adapter_state(model))
        global_state = {k: torch.stack([s[k] for s in states]).mean(0) for k in global_state}
    return {"seconds": time.perf_counter() - started, "steps": steps}


def overhead(quick: bool, backends: list[str]) -> dict[str, Any]:
    """The plain loop, then the same federation on each backend (the first one is the figure against the target)."""
    settings = {**OVERHEAD, **(QUICK if quick else {})}
    settings["federation.evaluate-every"] = settings["federation.num-rounds"]
    plain = plain_loop(settings)
    report: dict[str, Any] = {
        "settings": settings,
        "plain_loop_seconds": round(plain["seconds"], 2),
        "plain_loop_steps": plain["steps"],
        "target": 1.15,
        "backends": {},
    }
    for backend in backends:
        result, wall = _run({**settings, "federation.backend": backend})
        steps = sum(
            h.get("train", {}).get("train-steps", 0) for line in result.history for h in line["per_hospital"].values()
        )
        report["backends"][backend] = {"wall_seconds": round(wall, 2), "steps": steps, "overhead": wall / plain["seconds"]}
        print(f"[overhead] {backend}: simulated {wall:.1f} s for {steps} steps; plain loop {plain['seconds']:.1f} s "
              f"for {plain['steps']} steps: {wall / plain['seconds']:.2f}x", flush=True)
    first = report["backends"][backends[0]]
    report.update(backend=backends[0], simulated_wall_seconds=first["wall_seconds"], simulated_steps=first["steps"],
                  overhead=first["overhead"])
    return report


def _peak_tree_rss(command: list[str], interval: float = 0.2) -> tuple[int, float, int]:
    """Run ``command``; the peak summed RSS of it and all its descendants, its wall time, its exit code."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(process.pid)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    while process.poll() is None:
        total = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(interval)
    reader.join(timeout=5)
    if process.returncode != 0:
        print("".join(output[-40:]), file=sys.stderr)
    return peak, time.perf_counter() - started, process.returncode


#: One memory run, in a fresh process whose tree is measured.
_MEMORY_RUN = (
    "import json, sys, tempfile, pathlib, fedfm\n"
    "from fedfm.config import RunConfig\n"
    "config = RunConfig().replace(**json.loads(sys.argv[1]))\n"
    "with tempfile.TemporaryDirectory() as tmp:\n"
    "    result = fedfm.run(config, out=pathlib.Path(tmp) / 'run')\n"
    "    assert result.history and result.history[-1]['aggregated'], result.history\n"
)


def memory(sizes: list[int], quick: bool, backends: list[str]) -> dict[str, Any]:
    """Peak tree memory per federation size, the same total training steps at every size, on each backend.

    A training step's activations (MiniLM, 16 sentences of up to 96 tokens: up to
    ~500 MiB with dropout's masks) dwarf a hospital's own state, and the longest
    batch a run meets grows with the number of batches it draws. So every size
    trains the same ``2 x max(sizes)`` steps in all (2 hospitals x 100 steps ...
    100 hospitals x 2 steps): the ratio then measures what hospitals cost, not
    how many batches were drawn.
    """
    total_steps = 2 * max(sizes)
    by_backend: dict[str, Any] = {}
    for backend in backends:
        rows = []
        for hospitals in sizes:
            settings = {**MEMORY,
                        **({k: QUICK[k] for k in ("data.max-test", "data.max-train-per-hospital")} if quick else {}),
                        "data.num-hospitals": hospitals, "federation.min-hospitals": hospitals,
                        "train.local-steps": max(1, total_steps // hospitals), "federation.backend": backend}
            peak, wall, code_rc = _peak_tree_rss([sys.executable, "-c", _MEMORY_RUN, json.dumps(settings)])
            if code_rc != 0:
                raise RuntimeError(f"the {hospitals}-hospital run on {backend} failed (exit {code_rc})")
            rows.append({"hospitals": hospitals, "local_steps": settings["train.local-steps"], "peak_rss_bytes": peak,
                         "wall_seconds": round(wall, 1)})
            print(f"[memory] {backend}, {hospitals} hospitals x {settings['train.local-steps']} steps: peak "
                  f"{peak / 2**20:.0f} MiB (process tree), {wall:.0f} s", flush=True)
        first = rows[0]["peak_rss_bytes"]
        by_backend[backend] = {"runs": rows, "ratio_last_to_first": rows[-1]["peak_rss_bytes"] / first if first else None}
    main = by_backend[backends[0]]
    return {**main, "backend": backends[0], "total_steps": total_steps, "by_backend": by_backend, "target": 1.5}


def communication(methods: list[str], quick: bool) -> dict[str, Any]:
    arms = []
    for method in methods:
        settings = {**COMMUNICATION, **(QUICK if quick else {}), "compression.method": method}
        result, wall = _run(settings)
        rounds = max(1, len(result.history))
        hospitals = max(1, len(result.history[0]["per_hospital"]))
        full_model = 4 * (result.summary["base_parameters"] + result.summary["adapter_parameters"])
        arm = {
            "method": method,
            "bytes_up_per_hospital_round": result.summary["bytes"]["up"] / rounds / hospitals,
            "bytes_down_per_hospital_round": result.summary["bytes"]["down"] / rounds / hospitals,
            "full_model_bytes": full_model,
            "global": result.final_global,
            "wall_seconds": round(wall, 1),
        }
        arms.append(arm)
        print(f"[communication] {method}: {arm['bytes_up_per_hospital_round'] / 1e6:.3f} MB up per hospital and round "
              f"(full model {full_model / 1e6:.1f} MB); macro-F1 {arm['global'].get('macro-f1', float('nan')):.3f}",
              flush=True)
    return {"arms": arms}


def _merged(path: Path, report: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """Keep the parts of an earlier report at ``path`` that this run did not redo.

    Each part carries the date and command that produced it, so a file
    assembled from several runs still says where every figure came from.
    """
    for part in parts:
        report[part] = {**report[part], "date": report["date"], "command": report["command"]}
    if not path.is_file():
        return report
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return report
    kept = {part: earlier[part] for part in ("overhead", "memory", "communication")
            if part in earlier and part not in parts}
    return {**report, **kept}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Framework overhead, memory scaling and communication, side by side.")
    parser.add_argument("--parts", default="overhead,memory,communication")
    parser.add_argument("--hospitals", default="2,20,100", help="memory part: comma-separated federation sizes")
    parser.add_argument("--methods", default=",".join(METHODS), help="communication part: compression methods")
    parser.add_argument("--backends", default="in-process,ray",
                        help="overhead and memory parts: simulation backends to measure, the first against the target")
    parser.add_argument("--quick", action="store_true", help="tiny caps: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"overhead", "memory", "communication"}:
        parser.error(f"--parts must name some of overhead, memory, communication; got {args.parts!r}")
    _environment()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "scale",
        "quick": args.quick,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "overhead" in parts:
        report["overhead"] = overhead(args.quick, backends)
    if "memory" in parts:
        report["memory"] = memory([int(n) for n in args.hospitals.split(",")], args.quick, backends)
    if "communication" in parts:
        report["communication"] = communication([m.strip() for m in args.methods.split(",") if m.strip()], args.quick)
    import torch

    report["device"] = device_info(torch.device("cpu"))
    report["total_wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale{'-quick' if args.quick else ''}.json"
    report = _merged(path, report, parts)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"written: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
