"""Rewrite `[tool.flwr.app.config]` in pyproject.toml from examples/quickstart/heart.toml.

Flower's run config must list every key `flwr run .` may pass; fedfm's config
gains keys over time, and tests/test_flower_app.py checks the two agree.

    python scripts/sync_flower_config.py
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.config import load_config, to_flat

ROOT = Path(__file__).resolve().parents[1]
HEADER = "[tool.flwr.app.config]\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def main() -> None:
    flat = to_flat(load_config(ROOT / "examples" / "quickstart" / "heart.toml"))
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    start = text.index(HEADER) + len(HEADER)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    body = "".join(f'"{key}" = {_toml(value)}\n' for key, value in flat.items())
    path.write_text(text[:start] + body + text[end:])
    print(f"{path}: {len(flat)} keys")


if __name__ == "__main__":
    main()
