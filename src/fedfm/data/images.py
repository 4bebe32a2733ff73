"""Images as rows: PneumoniaMNIST, a folder per class, and a table of image file paths.

Every image source has an ``image`` column of datasets' ``Image`` feature
(PNG bytes or a file path, decoded to a PIL image when a row is read) and a
``label`` column of class ids. Nothing is resized here: the model's image
processor does that when a batch is built (``ImageClassification.collate``),
so training, ``fedfm predict`` and the exported model card's snippet all see
the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fedfm.data.base import IMAGE, SourceData, SourceRequest
from fedfm.data.files import encode_labels
from fedfm.data.formats import InputFormat
from fedfm.data.paths import DATA_DIR_ENV
from fedfm.errors import DataError

PNEUMONIAMNIST = "pneumoniamnist"
PNEUMONIA_FILE = "pneumoniamnist/pneumoniamnist.npz"
#: MedMNIST's class order (label 0 = normal, 1 = pneumonia).
PNEUMONIA_LABELS = ["normal", "pneumonia"]
#: `data.dataset` for a folder holding one sub-folder of images per class.
IMAGE_FOLDER = "image-folder"
#: Suffixes read as images (what Pillow opens without plugins).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: The column of a table of one's own that holds image paths, when `data.text-column` is left at `text`.
DEFAULT_IMAGE_COLUMN = "image"

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image array (H×W grey or H×W×3 RGB) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_rows(images: Sequence[Any], labels: Sequence[int], **extra: Sequence[Any]) -> datasets.Dataset:
    """Rows of the ``image`` kind from PNG bytes or file paths and class ids (and extra columns).

    Parameters
    ----------
    images : sequence of bytes or str
        Each image as PNG/JPEG bytes or as a path to its file.
    labels : sequence of int
        Class ids.
    extra : sequences
        More columns, one value per row.
    """
    cells = [{"bytes": i, "path": None} if isinstance(i, bytes) else {"bytes": None, "path": str(i)} for i in images]
    features = FEATURES.copy()
    for name, values in extra.items():
        features[name] = datasets.Value("string") if values and isinstance(values[0], str) else datasets.Value("int64")
    return datasets.Dataset.from_dict({"image": cells, "label": [int(v) for v in labels], **extra}, features=features)


def pneumoniamnist_file(data_dir: Path | None, origin: str = "") -> Path:
    """``pneumoniamnist/pneumoniamnist.npz`` in the data directory.

    Raises
    ------
    DataError
        When the file is not there (the message says where it looked and how to point fedfm at it).
    """
    if data_dir is not None and (data_dir / PNEUMONIA_FILE).is_file():
        return data_dir / PNEUMONIA_FILE
    where = f"{data_dir} ({origin})" if data_dir is not None else origin
    raise DataError(f"cannot find {PNEUMONIA_FILE!r} in the data directory {where}; set ${DATA_DIR_ENV} or "
                    "`data.data-dir` to the folder holding pneumoniamnist/")


def pneumoniamnist_split(data_dir: Path | None, split: str, origin: str = "") -> datasets.Dataset:
    """One split (``train``, ``val`` or ``test``) of PneumoniaMNIST as image rows (28×28 grey PNGs)."""
    path = pneumoniamnist_file(data_dir, origin)
    with np.load(path) as arrays:
        try:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        except KeyError as err:
            raise DataError(f"{path} has no {split}_images/{split}_labels arrays") from err
    return image_rows([png_bytes(a) for a in images], [int(v) for v in labels])


def load_pneumoniamnist(request: SourceRequest) -> SourceData:
    """PneumoniaMNIST (MedMNIST v2; Yang et al., 2023): 28×28 chest X-rays, normal vs pneumonia.

    The copy in the shared data folder has a *modified* train split (3,882 images; the official one has
    4,708, and the 826 missing images are all normal), and the official validation (524) and test (624)
    splits. Hospitals are made from the train split; the official test split is the global test set.
    The validation split is :func:`pneumoniamnist_split` ``(..., "val")``, which benchmarks choose
    settings on.
    """
    return SourceData(
        name=request.name,
        kind=IMAGE,
        train=pneumoniamnist_split(request.data_dir, "train", request.data_dir_origin),
        test=pneumoniamnist_split(request.data_dir, "test", request.data_dir_origin),
        label_names=list(PNEUMONIA_LABELS),
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """Each class's image files in a folder with one sub-folder per class.

    Hidden folders and folders without images are left out; classes come in the folders' sorted order.

    Parameters
    ----------
    folder : Path
        ``<folder>/<class name>/<any depth>/<image>``.

    Returns
    -------
    dict of str to list of Path
        Each class's image files, sorted.
    """
    classes = {d.name: _image_files(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    return {name: files for name, files in classes.items() if files}


def load_image_folder(request: SourceRequest) -> SourceData:
    """A folder with one sub-folder per class (``<path>/<class name>/<any depth>/<image>``), as image rows.

    Classes are the sub-folders' names, in sorted order unless ``data.label-names`` gives the order.

    Raises
    ------
    DataError
        When the folder is missing, has fewer than two non-empty class folders, or a class
        folder is not one of ``data.label-names``.
    """
    if request.path is None:
        raise DataError('`data.dataset = "image-folder"` needs `data.path`: the folder holding one folder per class')
    folder = request.path.expanduser()
    if not folder.is_absolute() and not folder.exists() and request.data_dir is not None:
        folder = request.data_dir / folder
    if not folder.is_dir():
        raise DataError(f"`data.path` {str(request.path)!r} is not a folder; an image folder holds one sub-folder "
                        "of images per class")
    classes = class_folders(folder)
    if len(classes) < 2:
        raise DataError(f"{folder} must hold at least two sub-folders of images (one per class; suffixes "
                        f"{', '.join(IMAGE_SUFFIXES)}); found {sorted(classes) or 'none'}")
    names = [name for name, files in classes.items() for _ in files]
    ids, label_names = encode_labels(names, request.label_names, where=f"{folder} (class folders)")
    paths = [str(p) for files in classes.values() for p in files]
    check_images(paths, where=str(folder))
    rows = image_rows(paths, ids, file=[str(Path(p).relative_to(folder)) for p in paths])
    return SourceData(name=request.name, kind=IMAGE, train=rows, test=None, label_names=label_names)


def image_table(request: SourceRequest, table: datasets.Dataset, path: Path) -> SourceData:
    """A CSV / JSON-lines / Parquet table of image paths (relative to the table's folder, or absolute) and labels.

    The path column is ``data.text-column`` (``image`` when left at ``text``); labels as for text files.
    The table's other columns are kept (e.g. a ``hospital`` column for ``data.partitioner = "natural"``).

    Raises
    ------
    DataError
        A column is missing, or an image file does not exist.
    """
    column = DEFAULT_IMAGE_COLUMN if request.text_column == "text" else request.text_column
    present = table.column_names
    missing = [c for c in (column, request.label_column) if c not in present]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (the image paths and the labels); columns present: "
                        f"{present}. Name the path column with `data.text-column`.")
    files = [resolve_image_path(value, base=path.parent, where=f"{path} column {column!r} row {i + 1}")
             for i, value in enumerate(table[column])]
    ids, names = encode_labels(list(table[request.label_column]), request.label_names,
                               where=f"{path} column {request.label_column!r}")
    if not ids:
        raise DataError(f"{path} has no rows")
    check_images(files, where=f"{path} column {column!r}")
    rows = image_rows(files, ids)
    for other in present:
        if other not in (column, request.label_column, "image", "label"):
            rows = rows.add_column(other, table[other])
    return SourceData(name=request.name, kind=IMAGE, train=rows, test=None, label_names=names)


def resolve_image_path(value: Any, *, base: Path, where: str) -> str:
    """An image path cell as an absolute path to an existing file (relative paths are relative to ``base``).

    Raises
    ------
    DataError
        The cell is empty or the file does not exist.
    """
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected the path of an image file, got {value!r}")
    candidate = Path(value.strip()).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    if not candidate.is_file():
        raise DataError(f"{where}: image file {str(candidate)!r} does not exist")
    return str(candidate)


def check_images(images: Sequence[str | bytes], *, where: str) -> None:
    """Open every image once (its header only), so an unreadable file fails before any model loads.

    Parameters
    ----------
    images : sequence of str or bytes
        Image file paths, or encoded images.
    where : str
        Names the file or folder in the error.

    Raises
    ------
    DataError
        Naming the first image Pillow cannot read.
    """
    from PIL import Image, UnidentifiedImageError

    for number, image in enumerate(images, start=1):
        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                opened.verify()
        except (OSError, UnidentifiedImageError) as err:
            name = f"image {number}" if isinstance(image, bytes) else repr(image)
            raise DataError(f"{where}: cannot read {name} as an image: {err}") from err


@dataclass(frozen=True)
class ImageInput(InputFormat):
    """An image file per row: a column of image paths (relative to the file's folder, or absolute)."""

    name: str = "image"
    kind: str = IMAGE
    text_column: str | None = DEFAULT_IMAGE_COLUMN

    def describe(self, *, text_column: str, context: str, fixed_options: list[str]) -> str:
        """The model card's description of the input."""
        return (f"one image per row: the column `{text_column}` holds the path of an image file (PNG, JPEG, ...; "
                "grey or colour)")

    def example_text(self) -> str:
        """The image file the model card's snippet opens."""
        return "chest_xray.png"


#: How an exported image classifier reads a colleague's file.
IMAGE_INPUT = ImageInput()
