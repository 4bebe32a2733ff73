"""Run a federated fine-tune from Python and look at the result.

    python examples/python_api.py            # 3 rounds of the heart-disease quickstart
    python examples/python_api.py 1 data.max-train-per-hospital=24   # 1 round, any other setting overridden
"""

from __future__ import annotations

import sys
from pathlib import Path

import fedfm

QUICKSTART = Path(__file__).resolve().parent / "quickstart" / "heart.toml"


def main(rounds: int = 3, overrides: list[str] | None = None) -> None:
    config = fedfm.load_config(QUICKSTART, [f"federation.num-rounds={rounds}", *(overrides or [])])
    result = fedfm.run(config, out="runs/python-api")
    print(result.table())
    for line in result.history:
        print(f"round {line['round']}: global accuracy {line['global']['accuracy']:.3f}, "
              f"{line['bytes_up'] / 1e6:.2f} MB up, {line['bytes_down'] / 1e6:.2f} MB down")
    print("adapter:", result.adapter_dir)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, sys.argv[2:])
