"""Download cp312 x86-64 wheels of some requirements and of every dependency a GPU machine lacks.

Usage: ``[IMAGE_GRPCIO=1.84] python benchmarks/device/wheel_closure.py OUT_DIR REQUIREMENT [REQUIREMENT ...]``

The packages the GPU machines already have are read from the device tool's
KINDS.md (its "Python packages already there" list); torch is there, and uv
(Flower's runtime dependency installer, switched off) is never needed.

grpcio is one of them (``IMAGE_GRPCIO``, default 1.84), so it is never shipped.
The packages generated against grpcio and protobuf (``grpcio-health-checking``,
``grpcio-status``) are shipped at the version this venv runs with flwr, and only
if the image's grpcio takes it: their generated code refuses, at import, a
grpcio older than the one it was generated with (an unpinned 1.85.1 refused the
image's 1.84), and each release also needs a protobuf from its own generation
(1.84.x needs protobuf >= 7.35, which flwr 1.42's protobuf < 7 excludes; the
venv's 1.81.1 runs with protobuf 6.33). A pin the requirements cannot take, that
the image's grpcio refuses, or that the registry cannot meet stops the script
with a message saying which.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

KINDS = Path("/work/.library/device/KINDS.md")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
SKIP = {"uv", "torch"}
#: The image's grpcio; what is built on grpcio's generated code must not be newer.
IMAGE_GRPCIO = os.environ.get("IMAGE_GRPCIO", "1.84")
GRPC_COMPANIONS = {"grpcio-health-checking", "grpcio-status", "grpcio-tools", "grpcio-reflection"}


class PinError(SystemExit):
    """A pin the requirements or the registry cannot meet: the script's one-line failure."""

    def __init__(self, message: str) -> None:
        super().__init__(f"wheel_closure: {message}")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:3])


def _pinned(req: Requirement, required_by: str) -> str:
    """The requirement to download for ``req``: grpcio's companions at this venv's version, checked against the image."""
    name = _norm(req.name)
    if name == "grpcio" and not req.specifier.contains(IMAGE_GRPCIO, prereleases=True):
        raise PinError(f"{required_by} requires {req} but the GPU image has grpcio {IMAGE_GRPCIO}; pick a version "
                       f"of {required_by} that accepts it, or set IMAGE_GRPCIO to the image's grpcio")
    if name not in GRPC_COMPANIONS:
        return f"{req.name}{req.specifier}"
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        raise PinError(f"{required_by} requires {req}, which this venv lacks: install the version that runs "
                       f"with flwr here first, so the GPU machine gets the same") from None
    if _release(version) > _release(IMAGE_GRPCIO):
        raise PinError(f"this venv's {req.name} {version} was generated with grpcio {version}, newer than the "
                       f"image's grpcio {IMAGE_GRPCIO}, which refuses it at import; install {req.name}<="
                       f"{IMAGE_GRPCIO} here (with a protobuf flwr accepts), or set IMAGE_GRPCIO")
    if not req.specifier.contains(version, prereleases=True):
        raise PinError(f"{required_by} requires {req}, but this venv has {req.name} {version}")
    return f"{req.name}=={version}"


def _download(out: str, requirements: list[str]) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", out, *requirements],
                       check=True)
    except subprocess.CalledProcessError:
        raise PinError(f"pip could not download cp312 wheels for {' '.join(requirements)} (see pip's message "
                       f"above); for a grpcio companion, the registry may have no release for grpcio "
                       f"{IMAGE_GRPCIO}: set IMAGE_GRPCIO to the image's grpcio") from None


def main(out: str, requirements: list[str]) -> None:
    there = {_norm(x.strip().rstrip(".")) for x in KINDS.read_text().split("Packages: ", 1)[1].split("\n")[0].split(",")}
    _download(out, [_pinned(Requirement(r), "the command line") for r in requirements])
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
                pinned = _pinned(req, Path(wheel).name)  # also checks a requirement on the image's grpcio
                if _norm(req.name) in there | have | SKIP:
                    continue
                need.add(pinned)
        need -= asked
        if not need:
            return
        asked |= need
        _download(out, sorted(need))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
