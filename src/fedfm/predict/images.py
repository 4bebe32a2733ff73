"""An image classifier's input: a table of image paths, a folder with one sub-folder per class, or one image file.

Every image is found and opened (its header only) here, before any model
loads, so a missing or unreadable file is named with its row. The pixels are
left as they are: the image processor saved in the exported folder resizes
and normalizes them when the rows are scored, as it did in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedfm.data.images import IMAGE_SUFFIXES, check_images, class_folders, resolve_image_path
from fedfm.errors import DataError
from fedfm.export import ExportSettings
from fedfm.predict.tables import INPUT_SUFFIXES, read_table, require_columns


@dataclass(frozen=True)
class ImageTable:
    """Image rows as read: what the predictions repeat, and the file each row's image is in.

    Attributes
    ----------
    table : pandas.DataFrame
        A table's own columns; for a folder, the image column (each file's path) and the label column (its
        class folder's name); for one image file, the image column.
    images : list of str
        Each row's image file, as an absolute path.
    """

    table: pd.DataFrame
    images: list[str]


def read_images(
    path: str | Path,
    settings: ExportSettings,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    need_labels: bool = False,
) -> ImageTable:
    """Find and check every image of ``--input`` for an exported image classifier.

    Parameters
    ----------
    path : str or Path
        A ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` table with a column of image paths (relative to the
        table's folder, or absolute); a folder with one sub-folder of images per class (the class names); or
        one image file.
    settings : ExportSettings
        The exported folder's ``fedfm.json``: the classes and the image column the model was trained on.
    image_column : str, optional
        A table's column of image paths (``--text-column``); default the one the model was trained on.
    label_column : str, optional
        The column a folder's class names go into; default the one the model was trained on.
    need_labels : bool
        Refuse one image file, which has no label (``evaluate``).

    Returns
    -------
    ImageTable

    Raises
    ------
    DataError
        Naming the input, the column or row, and what to do.
    """
    source = Path(path)
    column = image_column or settings.text_column
    suffix = source.suffix.lower()
    if source.is_dir():
        return _class_folder(source, settings, column, label_column or settings.label_column)
    if suffix in IMAGE_SUFFIXES:
        if need_labels:
            raise DataError(f"--input {source} is one image, without a label to score: give a table with a label "
                            f"column or a folder with one sub-folder per class ({settings.label_names})")
        image = resolve_image_path(str(source), base=Path.cwd(), where="--input")
        check_images([image], where="--input")
        return ImageTable(pd.DataFrame({column: [str(source)]}), [image])
    if suffix not in INPUT_SUFFIXES:
        raise DataError(f"--input {source}: give a table of image paths ({', '.join(INPUT_SUFFIXES)}), an image "
                        f"file ({', '.join(IMAGE_SUFFIXES)}) or a folder with one sub-folder of images per class; "
                        f"got the suffix {suffix or 'none'!r}")
    table = read_table(source)
    if table.empty:
        raise DataError(f"{source} has no rows")
    require_columns(table, [column], str(source), "the paths of the image files, relative to the file's folder or "
                    "absolute; choose another column with --text-column")
    images = [resolve_image_path(value, base=source.parent, where=f"{source} column {column!r} row {row}")
              for row, value in enumerate(table[column])]
    check_images(images, where=f"{source} column {column!r}")
    return ImageTable(table, images)


def _class_folder(folder: Path, settings: ExportSettings, column: str, label_column: str) -> ImageTable:
    """The images of a folder with one sub-folder per class, labelled by their sub-folder's name."""
    classes = class_folders(folder)
    if not classes:
        raise DataError(f"--input {folder} holds no sub-folders of images: give a folder with one sub-folder per "
                        f"class ({settings.label_names}), a table of image paths or one image file")
    unknown = sorted(set(classes) - set(settings.label_names))
    if unknown:
        raise DataError(f"--input {folder}: the sub-folder(s) {unknown} are not classes of this model, whose classes "
                        f"are {settings.label_names}: rename or move them")
    files = [(name, file) for name, found in classes.items() for file in found]
    images = [str(file.absolute()) for _, file in files]
    check_images(images, where=str(folder))
    table = pd.DataFrame({column: [str(file) for _, file in files], label_column: [name for name, _ in files]})
    return ImageTable(table, images)
