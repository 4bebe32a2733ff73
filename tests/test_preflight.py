"""One call runs every check a configuration gets before any model loads (fedfm.preflight, issue 24)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedfm.config import RunConfig
from fedfm.errors import ConfigError
from fedfm.preflight import config_problems, preflight


def _notes(tmp_path: Path, sites: list[str]) -> Path:
    rows = [{"text": f"note {i}", "label": ("calm", "pain")[i % 2], "site": site} for i, site in enumerate(sites)]
    path = tmp_path / "notes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _config(path: Path, **settings: Any) -> RunConfig:
    return RunConfig().replace(**{"data.dataset": "csv", "data.path": str(path), "data.partition-column": "site",
                                  **settings})


def test_a_good_configuration_passes_and_hands_back_its_federation(tmp_path: Path) -> None:
    # Execute
    checked = preflight(_config(_notes(tmp_path, ["a", "b", "c"] * 8)), simulation=True)
    # Assert
    assert [h.name for h in checked.federation.hospitals] == ["a", "b", "c"]
    assert checked.privacy == []


def test_problems_found_without_data_come_together_before_any_file_is_read(tmp_path: Path) -> None:
    # Prepare: a strategy that takes one rank for all, with ranks; a deployment's hospitals in a simulation;
    # a data file that does not exist (it must not be read).
    config = _config(tmp_path / "missing.csv", **{
        "federation.client-ranks": (2, 4), "data.hospitals": ("a", "b"), "data.label-names": ("calm", "pain"),
        "federation.central-evaluation": False})
    # Execute
    with pytest.raises(ConfigError) as err:
        preflight(config, simulation=True)
    # Assert
    problems = err.value.problems
    assert len(problems) == 2
    assert "`federation.client-ranks` is set, but strategy 'fedavg'" in problems[0]
    assert problems[1].startswith("`data.hospitals` ['a', 'b'] lists a deployment's hospitals")
    assert config_problems(config) == problems[:1]  # a deployment's server may list them


def test_federation_problems_are_reported(tmp_path: Path) -> None:
    config = _config(_notes(tmp_path, ["a", "b", "c"] * 8), **{"federation.min-hospitals": 5})
    with pytest.raises(ConfigError, match=r"`federation.min-hospitals` \(5\) must not exceed the 3 hospitals"):
        preflight(config, simulation=True)
