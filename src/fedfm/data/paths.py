"""Finding the shared data directory and the files inside it."""

from __future__ import annotations

import os
from pathlib import Path

from fedfm.errors import DataError

DATA_DIR_ENV = "FEDFM_DATA_DIR"

# src/fedfm/data/paths.py -> parents[3] is the repository root in a checkout.
_REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """Find the directory holding the shared biomedical datasets.

    Parameters
    ----------
    explicit : str or Path or None
        A directory chosen by the caller; returned as given when not ``None``.

    Returns
    -------
    Path or None
        In order: ``explicit``; ``$FEDFM_DATA_DIR``; ``../shared/data`` relative
        to the working directory if it exists; ``../shared/data`` beside the
        repository root (located from this file) if it exists; else ``None``.
    """
    return resolve_data_dir_with_origin(explicit)[0]


def resolve_data_dir_with_origin(explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """Like :func:`resolve_data_dir`, also saying which rule chose the directory.

    Parameters
    ----------
    explicit : str or Path or None
        A directory chosen by the caller.

    Returns
    -------
    tuple[Path or None, str]
        The directory and a phrase for error messages, e.g. ``"from $FEDFM_DATA_DIR"``.
    """
    if explicit is not None:
        return Path(explicit).expanduser(), "passed as data_dir"
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser(), f"from ${DATA_DIR_ENV}"
    beside_cwd = Path.cwd().parent / "shared" / "data"
    if beside_cwd.is_dir():
        return beside_cwd, "found at ../shared/data from the working directory"
    beside_repo = _REPO_ROOT.parent / "shared" / "data"
    if beside_repo.is_dir():
        return beside_repo, "found at ../shared/data beside the fedfm checkout"
    return None, f"no data directory found (${DATA_DIR_ENV} unset, no ../shared/data)"


def data_file(data_dir: Path | None, origin: str, relative: str) -> Path:
    """Return ``data_dir / relative``, or raise a DataError saying where it looked.

    Parameters
    ----------
    data_dir : Path or None
        The resolved data directory.
    origin : str
        How ``data_dir`` was chosen (from :func:`resolve_data_dir_with_origin`).
    relative : str
        The file's path inside the data directory, e.g. ``"pubmedqa/ori_pqal.json"``.

    Returns
    -------
    Path
        The existing file.
    """
    if data_dir is not None and (data_dir / relative).is_file():
        return data_dir / relative
    where = f"{data_dir} ({origin})" if data_dir is not None else origin
    raise DataError(
        f"cannot find {relative!r}: looked in the data directory {where}. Set "
        f"${DATA_DIR_ENV} (or pass data_dir=) to the folder that holds "
        f"{relative.split('/')[0]}/, e.g. export {DATA_DIR_ENV}=/path/to/shared/data"
    )
