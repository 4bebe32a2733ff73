"""Write each heart-disease hospital's training rows to its own file, for trying a deployment.

The UCI heart disease table (FLamby's Fed-Heart-Disease) comes from four real
hospitals. This script plays their record systems: it writes, for each
hospital, the rows the quickstart federation would train on as
``<out>/<slug>/records.csv`` (columns ``text``, ``label``; label 1 is heart
disease). It also writes the quickstart's global test set, the pooled held-out
rows that are in no hospital's file, as ``<out>/coordinator/test.csv``: a
labelled file the coordinator may score the global adapter on.

Usage::

    python examples/deployment/heart_hospitals.py OUT

It prints the node config of each hospital's SuperNode (known by its name) and
the coordinator's run configuration: the hospitals (``data.hospitals``), the
classes (``data.label-names``) and the test file (``data.path``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

from fedfm.config import RunConfig
from fedfm.data import Federation, build_federation, load_source


def slug(name: str) -> str:
    """A file-system and node-config friendly form of a hospital name, e.g. ``va-long-beach``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def quickstart_federation(config: RunConfig | None = None) -> Federation:
    """The heart-disease hospitals as the quickstart splits them (``config``'s data settings, default the quickstart's)."""
    data = (config or RunConfig()).data
    source = load_source(data.dataset, data_dir=data.data_dir or None)
    return build_federation(
        source, partitioner=data.partitioner, num_hospitals=data.num_hospitals, alpha=data.alpha,
        column=data.partition_column or None, test_fraction=data.test_fraction, seed=data.seed,
    )


def write_hospital_files(out: Path, config: RunConfig | None = None) -> dict[str, Path]:
    """Write every hospital's training rows, and the coordinator's test rows; return the hospitals' files.

    Parameters
    ----------
    out : Path
        Folder to write ``<slug>/records.csv`` and ``coordinator/test.csv`` into.
    config : RunConfig or None
        Whose ``data`` settings split the table; the defaults (the quickstart's) when ``None``.

    Returns
    -------
    dict[str, Path]
        Each hospital's file by its slug, in the quickstart's order (the order of ``data.hospitals``).
    """
    federation = quickstart_federation(config)
    test = out / "coordinator" / "test.csv"
    test.parent.mkdir(parents=True, exist_ok=True)
    federation.global_test.select_columns(["text", "label"]).to_csv(str(test), index=False)
    files = {}
    for hospital in federation.hospitals:
        path = out / slug(hospital.name) / "records.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        hospital.train.select_columns(["text", "label"]).to_csv(str(path), index=False)
        files[slug(hospital.name)] = path
    return files


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for one sub-folder per hospital")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    files = write_hospital_files(args.out)
    for name, path in files.items():
        print(f"{name}: --node-config 'hospital=\"{name}\" data-root=\"{path.parent.resolve()}\" "
              f"data-path=\"{path.name}\"'")
    labels = ",".join(quickstart_federation().source.label_names)
    test = (args.out / "coordinator" / "test.csv").resolve()
    print(f"coordinator: --run-config 'data.hospitals=\"{','.join(files)}\" data.label-names=\"{labels}\" "
          f"data.path=\"{test}\"'")


if __name__ == "__main__":
    main()
