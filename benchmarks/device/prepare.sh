#!/usr/bin/env bash
# Make .device/ (git-ignored) for benchmarks/device/gpu_quality.sh: what a GPU machine
# lacks, small enough to travel (a device call carries at most 64 MiB).
#   .device/whl/          flwr 1.42, datasets, peft and their dependencies missing there (cp312 wheels)
#   .device/site.tar.xz   transformers 5.24 without the model families fedfm and peft never import
#   .device/model/        MiniLM's folder with its weights as float16 (model.safetensors.xz)
#   .device/data.tar.xz   the NICTA-PIBOSO files
# Run from the repository root with fedfm's venv active (needs the package registry).
# IMAGE_GRPCIO (default 1.84) is the GPU image's grpcio: it is not shipped, and
# grpcio-health-checking goes at this venv's version only if that grpcio takes it
# (wheel_closure.py says what to do otherwise; gpu_quality.sh checks again there).
set -euo pipefail
cd "$(dirname "$0")/../.."
export IMAGE_GRPCIO="${IMAGE_GRPCIO:-1.84}"
rm -rf .device && mkdir -p .device/whl .device/model /tmp/fedfm-prepare
python benchmarks/device/wheel_closure.py .device/whl \
    "flwr==$(python -c 'import flwr; print(flwr.__version__)')" \
    "datasets==$(python -c 'import datasets; print(datasets.__version__)')" \
    "peft==$(python -c 'import peft; print(peft.__version__)')" \
    "flwr-datasets==$(python -c 'import importlib.metadata as m; print(m.version("flwr-datasets"))')"
tf="transformers==$(python -c 'import transformers; print(transformers.__version__)')"
python -m pip download -q --no-deps --only-binary=:all: -d /tmp/fedfm-prepare "$tf"
rm -rf /tmp/fedfm-prepare/site && mkdir -p /tmp/fedfm-prepare/site
(cd /tmp/fedfm-prepare/site && unzip -q -o ../transformers-*.whl)
# Keep only the model families imported on fedfm's path (auto, BERT, Llama) and the ones peft
# imports at module level (found by importing until nothing was missing).
(cd /tmp/fedfm-prepare/site/transformers/models && for d in */; do
    case ${d%/} in auto|bert|llama|encoder_decoder|bloom|align) ;; *) rm -rf "$d" ;; esac; done)
tar cJf .device/site.tar.xz -C /tmp/fedfm-prepare/site .
tar cJf .device/data.tar.xz -C "${FEDFM_DATA_DIR:-../shared/data}" nicta_piboso
python - <<'PY'
import shutil
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from fedfm.config import ModelSpec
from fedfm.adapters import resolve_model_path
src, dst = Path(resolve_model_path(ModelSpec().name)), Path(".device/model")
for f in src.rglob("*.json"):
    (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(f, dst / f.relative_to(src))
weights = load_file(src / "model.safetensors")
save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
PY
xz -T0 -6 .device/model/model.safetensors
du -sb .device
