"""Download cp312 x86-64 wheels of some requirements and of every dependency a GPU machine lacks.

Usage: ``python benchmarks/device/wheel_closure.py OUT_DIR REQUIREMENT [REQUIREMENT ...]``

The packages the GPU machines already have are read from the device tool's
KINDS.md (its "Python packages already there" list); torch is there, and uv
(Flower's runtime dependency installer, switched off) is never needed.
"""

from __future__ import annotations

import glob
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

KINDS = Path("/work/.library/device/KINDS.md")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
SKIP = {"uv", "torch"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _download(out: str, requirements: list[str]) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", out, *requirements],
                   check=True)


def main(out: str, requirements: list[str]) -> None:
    there = {_norm(x.strip().rstrip(".")) for x in KINDS.read_text().split("Packages: ", 1)[1].split("\n")[0].split(",")}
    _download(out, requirements)
    asked: set[str] = set()
    while True:
        have = {_norm(re.split(r"-\d", Path(w).name)[0]) for w in glob.glob(f"{out}/*.whl")}
        need = set()
        for wheel in glob.glob(f"{out}/*.whl"):
            with zipfile.ZipFile(wheel) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                lines = z.read(meta).decode().splitlines()
            for line in lines:
                if not line.startswith("Requires-Dist:"):
                    continue
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker and not req.marker.evaluate(MARKERS):
                    continue
                if _norm(req.name) in there | have | SKIP:
                    continue
                need.add(f"{req.name}{req.specifier}")
        need -= asked
        if not need:
            return
        asked |= need
        _download(out, sorted(need))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
