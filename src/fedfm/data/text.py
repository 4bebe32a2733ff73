"""Writing tabular patient records as English sentences for a language model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _number(value: Any, unit: str = "") -> str:
    # The UCI table codes a missing measurement as 0 (every Swiss cholesterol,
    # one VA blood pressure); "0 mg/dl" would be read as a real value.
    if value is None or float(value) == 0.0:
        return "not recorded"
    text = f"{float(value):g}"
    return f"{text} {unit}" if unit else text


def parse_flag(value: Any) -> bool:
    """Read a yes/no cell that may arrive as a bool or as "TRUE"/"FALSE" text.

    Parameters
    ----------
    value : Any
        The cell.

    Returns
    -------
    bool
        Whether the flag is set.
    """
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value)


def _yes_no(value: Any) -> str:
    return "yes" if parse_flag(value) else "no"


def heart_row_to_text(row: Mapping[str, Any]) -> str:
    """Describe one UCI heart-disease patient in words.

    The hospital (``dataset``) and the diagnosis (``num``) are deliberately left
    out: the first is the partition key, the second the label.

    Parameters
    ----------
    row : Mapping[str, Any]
        A row with the UCI columns ``age, sex, cp, trestbps, chol, fbs, restecg,
        thalch, exang, oldpeak``.

    Returns
    -------
    str
        E.g. ``"age 63, male, chest pain: typical angina, resting blood pressure
        145 mm Hg, cholesterol 233 mg/dl, fasting blood sugar > 120: yes, resting
        ECG: lv hypertrophy, max heart rate 150, exercise-induced angina: no, ST
        depression 2.3"``.
    """
    parts = [
        f"age {int(row['age'])}",
        str(row["sex"]).strip().lower(),
        f"chest pain: {row['cp']}",
        f"resting blood pressure {_number(row['trestbps'], 'mm Hg')}",
        f"cholesterol {_number(row['chol'], 'mg/dl')}",
        f"fasting blood sugar > 120: {_yes_no(row['fbs'])}",
        f"resting ECG: {row['restecg']}",
        f"max heart rate {_number(row['thalch'])}",
        f"exercise-induced angina: {_yes_no(row['exang'])}",
        # oldpeak is legitimately 0 (no depression) for many patients.
        f"ST depression {float(row['oldpeak']):g}",
    ]
    return ", ".join(parts)
