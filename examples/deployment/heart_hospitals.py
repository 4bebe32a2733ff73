"""Write each heart-disease hospital's training rows to its own file, for trying a deployment.

The UCI heart disease table (FLamby's Fed-Heart-Disease) comes from four real
hospitals. This script plays their record systems: it writes, for each
hospital, the rows the quickstart federation would train on as
``<out>/<slug>/records.csv`` (columns ``text``, ``label``). The coordinator keeps
running the quickstart's data settings (``heart_disease_uci``, natural
partition), so its global test set, the pooled held-out rows, is in no
hospital's file.

Usage::

    python examples/deployment/heart_hospitals.py OUT

It prints the node config of each hospital's SuperNode; ``partition-id`` is the
hospital's position in the coordinator's (sorted) list.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

from fedfm.config import RunConfig
from fedfm.data import build_federation, load_source


def slug(name: str) -> str:
    """A file-system and node-config friendly form of a hospital name, e.g. ``va-long-beach``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_hospital_files(out: Path, config: RunConfig | None = None) -> dict[str, Path]:
    """Write every hospital's training rows of the quickstart federation; return the files by hospital name.

    Parameters
    ----------
    out : Path
        Folder to write ``<slug>/records.csv`` into.
    config : RunConfig or None
        Whose ``data`` settings split the table; the defaults (the quickstart's) when ``None``.

    Returns
    -------
    dict[str, Path]
        Each hospital's file, in the coordinator's order (its index is the SuperNode's ``partition-id``).
    """
    data = (config or RunConfig()).data
    source = load_source(data.dataset, data_dir=data.data_dir or None)
    federation = build_federation(
        source, partitioner=data.partitioner, num_hospitals=data.num_hospitals, alpha=data.alpha,
        column=data.partition_column or None, test_fraction=data.test_fraction, seed=data.seed,
    )
    files = {}
    for hospital in federation.hospitals:
        path = out / slug(hospital.name) / "records.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        hospital.train.select_columns(["text", "label"]).to_csv(str(path), index=False)
        files[hospital.name] = path
    return files


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for one sub-folder per hospital")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    files = write_hospital_files(args.out)
    for index, (name, path) in enumerate(files.items()):
        print(f"{name}: --node-config 'partition-id={index} hospital=\"{slug(name)}\" "
              f"data-root=\"{path.parent.resolve()}\" data-path=\"{path.name}\"'")


if __name__ == "__main__":
    main()
