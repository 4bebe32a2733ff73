"""Register a strategy of your own and run the heart-disease quickstart with it.

    python examples/custom_strategy/run.py                       # 3 rounds
    python examples/custom_strategy/run.py federation.num-rounds=1 data.max-train-per-hospital=16

From a config file instead, name the class by its import path (the folder on
``PYTHONPATH`` or the current directory):
``federation.strategy = "norm_bounded:NormBoundedFedAvg"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import norm_bounded  # noqa: F401  # registers "norm-bounded-fedavg"

import fedfm

HERE = Path(__file__).resolve().parent


def main(overrides: list[str]) -> None:
    config = fedfm.load_config(
        HERE.parent / "quickstart" / "heart.toml",
        ["federation.strategy=norm-bounded-fedavg", "federation.num-rounds=3", *overrides],
    )
    result = fedfm.run(config, out=Path("runs") / "custom-strategy")
    print(result.table())
    print("strategy:", result.summary["strategy"], "| adapter:", result.adapter_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
