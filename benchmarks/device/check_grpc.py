"""Check, before a device run, that the image's grpcio takes the shipped grpcio-health-checking.

Usage: ``PYTHONPATH=SITE python benchmarks/device/check_grpc.py`` (exit 0 with one line saying the
versions, or exit 1 with one line saying what to rebuild).

grpcio-health-checking's generated code refuses, at import, a grpcio older than the one it was
generated with (1.85.1 refused the image's 1.84), which would otherwise surface minutes later as a
SuperLink that never starts. ``prepare.sh`` pins it (``IMAGE_GRPCIO``); this says when the pin and
the image disagree.
"""

from __future__ import annotations

import sys
from importlib import metadata


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def main() -> int:
    """Print the versions and return 0, or print what to do and return 1."""
    try:
        grpcio, health = metadata.version("grpcio"), metadata.version("grpcio-health-checking")
    except metadata.PackageNotFoundError as err:
        print(f"check_grpc: {err.name} is not installed: the image should have grpcio and .device/whl "
              f"grpcio-health-checking (bash benchmarks/device/prepare.sh)", file=sys.stderr)
        return 1
    protobuf = metadata.version("protobuf")
    rebuild = (f"rebuild .device with a grpcio-health-checking generated for grpcio <= {grpcio} and protobuf "
               f"{protobuf} (prepare.sh ships the venv's: IMAGE_GRPCIO={grpcio} bash benchmarks/device/prepare.sh)")
    if _release(health) > _release(grpcio):
        print(f"check_grpc: grpcio {grpcio} here, but grpcio-health-checking {health} needs grpcio >= {health}; "
              f"{rebuild}", file=sys.stderr)
        return 1
    try:
        import grpc_health.v1.health_pb2_grpc  # noqa: F401  # the import is what refuses a mismatch
    except Exception as err:  # noqa: BLE001  # grpc's check raises RuntimeError, protobuf's VersionError
        print(f"check_grpc: grpc_health does not import with grpcio {grpcio} ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); {rebuild}", file=sys.stderr)
        return 1
    print(f"grpcio {grpcio}, grpcio-health-checking {health}, protobuf {protobuf}: compatible")
    return 0


if __name__ == "__main__":
    sys.exit(main())
