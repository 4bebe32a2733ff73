"""On a CUDA GPU (issue 27): a quantized base's memory and speed, the chip's share, hospitals sharing one GPU.

Three parts, each measured side by side in one run:

``quantization``
    SmolLM2-135M-Instruct instruction tuning (Medical Meadow's WikiDoc pairs,
    hospital 0's training rows), the same local LoRA epochs through
    ``fedfm.train.train_local`` with the base stored in 4 bit (QLoRA: NF4,
    double quantization, bf16 compute; ``model.quantization = "4bit"``) and
    unquantized (float32 weights under bf16 autocast: ``model.dtype =
    "bfloat16"``, fedfm's frozen base is always float32): peak GPU memory
    (``torch.cuda.max_memory_allocated``), the memory the loaded model holds,
    and training tokens per second (after a warm-up epoch).
``utilization``
    The unquantized arm's tokens per second as a share of the chip's dense
    bf16 peak (:data:`PEAK_BF16`, by ``torch.cuda.get_device_name()``),
    counting 6 x parameters x tokens FLOPs a step: the usual dense-training
    approximation (2N forward, 4N backward), which ignores attention's
    sequence-squared term and overcounts LoRA's backward (a frozen base needs
    no weight gradients: 4N is closer), so the share is an upper-bound style
    figure; both are written.
``hospitals``
    Peak GPU memory of a whole ``fedfm.run`` with 8 simulated IID hospitals
    sharing the GPU against 1 hospital, in-process backend (one process; the
    base is loaded once per process and side, and hospitals swap adapters),
    each size in a fresh process. Target: 8 hospitals <= 1.5x the memory of 1.

On a machine without CUDA it refuses with one line; ``--dry-run`` runs the
same code paths on the CPU with a small model and a few rows (no GPU figures:
memory and the chip's share are null), for tests.

Usage::

    python benchmarks/gpu_scale.py                      # all three parts (a few minutes on an H100/H200)
    python benchmarks/gpu_scale.py --parts quantization,utilization --epochs 3
    python benchmarks/gpu_scale.py --dry-run --set model.name=<tiny causal LM folder>

Writes ``<out>/gpu-scale.json`` (``gpu-scale-dry-run.json`` with ``--dry-run``) and prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _environment, device_info  # benchmarks/ is not a package: found through sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
PARTS = ("quantization", "utilization", "hospitals")

#: Dense (no sparsity) bf16 tensor-core peak FLOP/s by a fragment of ``torch.cuda.get_device_name()``;
#: the first fragment found wins (so "H100 PCIe" before "H100", "GH200" before "H200"). NVIDIA's data sheets.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("GH200", 989e12), ("H200", 989e12), ("A100", 312e12),
)

#: The measured federation: SmolLM2 instruction tuning, batches large enough to give a GPU work.
SETTINGS: dict[str, Any] = {
    "model.name": "smollm2-135m",
    "model.task": "instruction-tuning",
    "model.max-length": 512,
    "model.dtype": "bfloat16",
    "lora.r": 8,
    "data.dataset": "medical_meadow_wikidoc_patient",
    "data.partitioner": "iid",
    "data.num-hospitals": 1,
    "data.max-train-per-hospital": 256,
    "data.max-test": 16,
    "train.batch-size": 16,
    "train.local-steps": 0,
    "train.local-epochs": 1,
    "federation.min-hospitals": 1,
    "federation.backend": "in-process",
}
#: The ``hospitals`` runs: one round of a few steps, nothing scored (memory is the figure).
HOSPITAL_RUN: dict[str, Any] = {
    "data.max-train-per-hospital": 32,
    "train.local-steps": 2,
    "federation.num-rounds": 1,
    "federation.central-evaluation": False,
    "federation.fraction-evaluate": 0.0,
}
#: --dry-run: a few rows and steps, on the CPU.
DRY_RUN: dict[str, Any] = {
    "model.device": "cpu",
    "model.dtype": "float32",
    "model.max-length": 64,
    "data.max-train-per-hospital": 8,
    "train.batch-size": 4,
}

REASONS = [
    "a 135M-parameter model: 576-wide matrices leave most of an H100/H200's tensor cores idle per kernel",
    "per-layer kernel launches and Python dispatch (30 layers, LoRA adds small matmuls beside q and v)",
    "the frozen base is stored float32 and cast to bf16 inside every autocast matmul",
    "padding inside length-bucketed batches, and the AdamW step and gradient clipping of each step",
    "6N counts weight gradients a frozen base never computes (4N would be the closer count for LoRA)",
]


def peak_flops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (:data:`PEAK_BF16`), or None for one not in the table."""
    return next((flops for fragment, flops in PEAK_BF16 if fragment in name), None)


def _config(overrides: dict[str, Any], dry_run: bool) -> Any:
    from fedfm.config import RunConfig

    return RunConfig().replace(**{**SETTINGS, **(DRY_RUN if dry_run else {}), **overrides})


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def local_epochs(config: Any, epochs: int) -> dict[str, Any]:
    """Peak memory, model memory and tokens per second of ``epochs`` local epochs on hospital 0's rows."""
    import torch

    from fedfm.adapters import set_adapter_state
    from fedfm.train import train_local
    from fedfm.workspace import release, workspace_for

    cuda = config.model.device != "cpu"
    release()  # the previous arm's model, rows and caches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    workspace = workspace_for(config)
    loaded = workspace.loaded
    load_seconds = time.perf_counter() - started
    model_bytes = torch.cuda.memory_allocated() - before if cuda else None
    rows = workspace.hospital_rows("train", 0)
    spec = dataclasses.replace(config.train, local_steps=0, local_epochs=1)

    def run(epochs_: int) -> tuple[float, Any]:
        set_adapter_state(loaded.model, loaded.initial_state)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = train_local(loaded.model, workspace.task, rows, loaded.tokenizer,
                             spec=dataclasses.replace(spec, local_epochs=epochs_), device=loaded.device,
                             dtype=config.model.dtype, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, result

    run(1)  # warm-up: allocator, kernels, autotuning
    seconds, result = run(epochs)
    # Every row once per epoch: the tokens are exact (padding not counted).
    tokens = epochs * sum(len(ids) for ids in rows["input_ids"])
    return {
        "quantization": config.model.quantization,
        "dtype": config.model.dtype,
        "rows": len(rows), "epochs": epochs, "steps": result.steps, "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "train_loss": result.loss,
        "load_seconds": round(load_seconds, 1),
        "base_parameters": loaded.base_parameters,
        "model_gib": _gib(model_bytes) if model_bytes is not None else None,
        "peak_gib": _gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "device": str(loaded.device),
    }


def quantization(config: Any, epochs: int, dry_run: bool) -> dict[str, Any]:
    """The 4-bit and the unquantized base, one after the other in this process (the 4-bit arm only on a GPU)."""
    arms = {"bf16": local_epochs(config.replace(**{"model.quantization": "none"}), epochs)}
    if not dry_run:
        arms["4bit"] = local_epochs(config.replace(**{"model.quantization": "4bit"}), epochs)
    for name, arm in arms.items():
        print(f"[quantization] {name:5} peak {arm['peak_gib']} GiB (model {arm['model_gib']} GiB), "
              f"{arm['tokens_per_second']} tokens/s over {arm['tokens']} tokens", flush=True)
    result: dict[str, Any] = {"arms": arms}
    if "4bit" in arms:
        result["4bit_over_bf16_peak_memory"] = round(arms["4bit"]["peak_gib"] / arms["bf16"]["peak_gib"], 3)
        result["4bit_over_bf16_tokens_per_second"] = round(
            arms["4bit"]["tokens_per_second"] / arms["bf16"]["tokens_per_second"], 3)
    return result


def utilization(arm: dict[str, Any], gpu: str | None) -> dict[str, Any]:
    """The unquantized arm's training FLOP/s as a share of the chip's dense bf16 peak."""
    peak = peak_flops(gpu) if gpu else None
    per_second = {f"{n}N": n * arm["base_parameters"] * arm["tokens_per_second"] for n in (6, 4)}
    result = {
        "gpu": gpu,
        "peak_bf16_flops": peak,
        "parameters": arm["base_parameters"],
        "tokens_per_second": arm["tokens_per_second"],
        "flops_per_second": per_second,
        "share_of_peak": {k: round(v / peak, 4) for k, v in per_second.items()} if peak else None,
        "approximation": "FLOPs = 6 x parameters x tokens (2N forward + 4N backward, attention's L^2 term "
                         "ignored); 4N is the closer count when the base is frozen",
        "reasons_not_higher": REASONS,
    }
    share = result["share_of_peak"]
    print(f"[utilization] {gpu or 'no GPU'}: {arm['tokens_per_second']} tokens/s x 6N = "
          f"{per_second['6N'] / 1e12:.2f} TFLOP/s" + (f", {share['6N']:.1%} of the {peak / 1e12:.0f} TFLOP/s "
                                                        f"bf16 peak (4N: {share['4N']:.1%})" if share else ""),
          flush=True)
    return result


def hospital_run(config: Any) -> dict[str, Any]:
    """One ``fedfm.run`` in this process; its peak GPU memory (called in a fresh process per size)."""
    import torch

    import fedfm

    cuda = config.model.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedfm-gpu-scale-") as tmp:
        result = fedfm.run(config, out=Path(tmp) / "run", progress=False)
        rounds = len(result.history)
    return {"hospitals": config.data.num_hospitals, "rounds": rounds,
            "seconds": round(time.perf_counter() - started, 1),
            "peak_gib": _gib(torch.cuda.max_memory_allocated()) if cuda else None}


def hospitals(overrides: dict[str, Any], sizes: list[int], dry_run: bool) -> dict[str, Any]:
    """Peak GPU memory of a run with each number of hospitals, each in a fresh process."""
    runs = {}
    for n in sizes:
        settings = {**overrides, **HOSPITAL_RUN, "data.num-hospitals": n, "federation.min-hospitals": n}
        argv = [sys.executable, __file__, "--hospital-run", json.dumps(settings)] + (["--dry-run"] if dry_run else [])
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the {n}-hospital run failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        runs[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[hospitals] {n}: peak {runs[str(n)]['peak_gib']} GiB, {runs[str(n)]['seconds']} s", flush=True)
    result: dict[str, Any] = {"runs": runs, "backend": "in-process"}
    first, last = runs[str(sizes[0])]["peak_gib"], runs[str(sizes[-1])]["peak_gib"]
    if first and last:
        result[f"memory_{sizes[-1]}_over_{sizes[0]}"] = round(last / first, 3)
        result["target"] = f"<= 1.5 ({sizes[-1]} hospitals against {sizes[0]})"
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="GPU memory and speed: 4-bit vs bf16, share of peak, hospitals per GPU.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--epochs", type=int, default=2, help="timed local epochs per arm (after one warm-up epoch)")
    parser.add_argument("--hospitals", default="1,8", help="hospital counts of the memory part (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="run the code paths on the CPU (no GPU figures)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--hospital-run", help=argparse.SUPPRESS)  # internal: one run of the hospitals part
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        parser.error(f"--parts must name some of {list(PARTS)}, got {args.parts!r}")
    _environment()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_scale.py: error: torch sees no CUDA GPU: this benchmark measures GPU memory and speed; run it "
              "on a GPU machine (bash scripts/install.sh --gpu), or with --dry-run to check its code on the CPU",
              file=sys.stderr)
        return 2
    from fedfm.config import parse_override

    overrides = dict(parse_override(text) for text in args.overrides)
    if args.hospital_run:
        print(json.dumps(hospital_run(_config(json.loads(args.hospital_run), args.dry_run))))
        return 0
    config = _config(overrides, args.dry_run)
    gpu = torch.cuda.get_device_name(0) if not args.dry_run else None
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "gpu-scale",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "dry_run": args.dry_run,
        "settings": config.to_flat(),
    }
    if "quantization" in parts or "utilization" in parts:
        report["quantization"] = quantization(config, args.epochs, args.dry_run)
    if "utilization" in parts:
        report["utilization"] = utilization(report["quantization"]["arms"]["bf16"], gpu)
    if "hospitals" in parts:
        sizes = [int(n) for n in args.hospitals.split(",")]
        report["hospitals"] = hospitals(overrides, sizes, args.dry_run)
    report["device"] = device_info(torch.device("cuda") if gpu else torch.device("cpu"))
    report["total_wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-scale{'-dry-run' if args.dry_run else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
