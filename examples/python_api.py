"""Run a federated fine-tune from Python and look at the result.

    python examples/python_api.py            # 3 rounds of the heart-disease quickstart
"""

from __future__ import annotations

import sys

import fedfm


def main(rounds: int = 3) -> None:
    config = fedfm.load_config("examples/quickstart/heart.toml", [f"federation.num-rounds={rounds}"])
    result = fedfm.run(config, out="runs/python-api")
    print(result.table())
    for line in result.history:
        print(f"round {line['round']}: global accuracy {line['global']['accuracy']:.3f}, "
              f"{line['bytes_up'] / 1e6:.2f} MB up, {line['bytes_down'] / 1e6:.2f} MB down")
    print("adapter:", result.adapter_dir)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
