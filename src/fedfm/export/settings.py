"""The ``fedfm.json`` schema: everything besides the weights that inference with an exported folder needs.

:class:`ExportSettings` is the file's one definition: :func:`export_settings`
builds it from a run's configuration, :meth:`ExportSettings.read` reads it back
and checks every field at once (all problems named together).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedfm.adapters import EXPORT_SETTINGS
from fedfm.config import CONTEXTS, FILE_DATASETS, TASKS, RunConfig
from fedfm.data.base import CLASSIFICATION, IMAGE, INSTRUCTION, MULTIPLE_CHOICE
from fedfm.data.formats import TEXT_INPUT, input_format, known_input_formats
from fedfm.data.images import IMAGE_INPUT
from fedfm.data.qa import MULTIPLE_CHOICE_INPUT
from fedfm.data.sources import source_input_format
from fedfm.errors import FedfmError
from fedfm.export.conversation import CHAT_INPUT

#: The ``input_format`` of a text column (the other formats belong to their sources: :mod:`fedfm.data.formats`).
TEXT = TEXT_INPUT.name

#: Tasks whose exported folders the card's snippet, ``fedfm predict`` and ``fedfm evaluate`` cover.
PREDICTABLE_TASKS = ("sequence-classification", "causal-qa", "instruction-tuning", "image-classification")
#: Tasks whose folders hold a classification head with one output per class in ``label_names``.
CLASSIFIER_TASKS = ("sequence-classification", "image-classification")
#: ``pooling`` values a ``fedfm.json`` may hold (``""``: no pooling recorded, the model's own).
EXPORT_POOLINGS = ("", "cls", "mean", "layer-mean")
#: Poolings that replace the encoder's first-token pooler (loading code must rebuild them).
MEAN_POOLINGS = ("mean", "layer-mean")


class ExportError(FedfmError, ValueError):
    """An exported folder is incomplete or corrupt, or its ``fedfm.json`` is invalid (the message names the file)."""


@dataclass(frozen=True)
class ExportSettings:
    """Everything besides the weights that inference with an exported folder needs (its ``fedfm.json``).

    Attributes
    ----------
    task : str
        ``sequence-classification``, ``causal-qa``, ``instruction-tuning`` or ``image-classification``.
    base_model : str
        ``model.name`` of the run: a fedfm alias (``minilm``, ``smollm2-135m``) or a folder.
    label_names : list of str
        Class names in label-id order (causal QA: the option names; instruction tuning: none).
    input_format : str
        The name of an input format (:func:`fedfm.data.formats.input_format`):
        ``text`` (a text column), ``heart-disease-record`` (a UCI heart-disease
        record written as text), ``multiple-choice`` (multiple-choice columns),
        ``chat`` (conversations: :mod:`fedfm.export.conversation`) or ``image``
        (a column of image file paths: :class:`fedfm.data.images.ImageInput`).
    text_column : str
        The text column of the ``text`` format; the column of image paths of the ``image`` format.
    label_column : str
        The label column ``fedfm evaluate`` reads by default.
    max_length : int
        Tokens kept per example, as in training.
    pooling : str
        ``mean``, ``layer-mean`` or ``cls`` for classifiers (see :mod:`fedfm.tasks.pooling`), ``""`` otherwise.
    fixed_options : list of str
        Causal QA with the same options on every row (PubMedQA: yes/no/maybe):
        input files then need no ``options`` column.
    length_normalize : bool
        Causal QA: options scored by mean instead of summed token log-probability.
    context : str
        Sentence-role classifiers: the ``data.context`` the model was trained
        with (:data:`fedfm.data.piboso.CONTEXT_MODES`). Other than ``none``,
        each row is read as the sentence paired with its position and/or
        neighbours, so input rows need an ``abstract_id`` column (sentences
        in their abstract's order).
    chat_template : bool
        Prompts are conversations written with the chat template of the
        tokenizer saved in the folder (instruction tuning); the model answers
        after the template's generation prompt.
    image_size : int
        Image classifiers: pixels a side the image processor saved in the
        folder resizes every image to (``model.image-size``); ``0`` for other
        models and for folders exported before fedfm recorded it.
    """

    task: str
    base_model: str
    label_names: list[str]
    input_format: str
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    pooling: str = ""
    fixed_options: list[str] = field(default_factory=list)
    length_normalize: bool = False
    context: str = "none"
    chat_template: bool = False
    image_size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``fedfm.json`` form (``pooling`` stays a top-level key, as older folders have it)."""
        return asdict(self)

    @classmethod
    def read(cls, folder: Path) -> ExportSettings:
        """The settings of an exported folder, checked field by field.

        Raises
        ------
        ExportError
            The folder has no ``fedfm.json``, one that is not a JSON object, one
            from before fedfm wrote the task and classes (run
            :func:`write_model_card` on its run directory), or fields of the
            wrong type or value (all of them named at once).
        """
        path = Path(folder) / EXPORT_SETTINGS
        if not path.is_file():
            raise ExportError(
                f"{folder} has no {EXPORT_SETTINGS}: pass the `adapter/` or `merged/` folder of a fedfm run directory"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError covers JSON syntax and non-UTF-8 bytes
            raise ExportError(f"{path} is not readable JSON ({err}): restore it or re-export the folder") from err
        if not isinstance(data, dict):
            raise ExportError(f"{path} must hold a JSON object, got {type(data).__name__}: restore it or re-export "
                              f"the folder")
        missing = [k for k in ("task", "base_model", "label_names", "input_format") if k not in data]
        if missing:
            raise ExportError(
                f"{path} lacks {missing}: it was exported before fedfm described its task; complete it with "
                f"`python -c \"import fedfm.export as e; e.write_model_card('{Path(folder).parent}')\"`"
            )
        problems = _settings_problems(data)
        if problems:
            raise ExportError(f"{path} is invalid: {'; '.join(problems)}; restore the file or re-export the folder "
                              f"(`fedfm.export.write_model_card(RUN_DIR)` rewrites it)")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _settings_problems(data: dict[str, Any]) -> list[str]:
    """Every field of a ``fedfm.json`` whose type or value inference could not use (empty list: none)."""
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    names = data["label_names"]
    check(data["task"] in TASKS, f"`task` must be one of {list(TASKS)}, got {data['task']!r}")
    check(isinstance(data["base_model"], str) and bool(data["base_model"]),
          f"`base_model` must be a model alias or folder, got {data['base_model']!r}")
    formats = known_input_formats()
    known_format = data["input_format"] in formats
    check(known_format, f"`input_format` must be one of {list(formats)}, got {data['input_format']!r}")
    kind = input_format(data["input_format"]).kind if known_format else ""
    generative = kind == INSTRUCTION  # answers, not classes
    check(known_format is False or (data["task"] == "image-classification") == (kind == IMAGE),
          f"`input_format` {data['input_format']!r} does not fit the task {data['task']!r} (an image classifier "
          f"reads `image` rows, nothing else does)")
    if not _is_strings(names) or not (names or generative):
        problems.append(f"`label_names` must be a non-empty list of strings (the classes in id order), got {names!r}")
    elif len(set(names)) != len(names):
        problems.append(f"`label_names` must not repeat a name, got {names!r}")
    for key in ("text_column", "label_column"):
        if key in data:
            check(isinstance(data[key], str) and bool(data[key]), f"`{key}` must be a column name, got {data[key]!r}")
    if "max_length" in data:
        value = data["max_length"]
        check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
              f"`max_length` must be a positive integer, got {value!r}")
    if "image_size" in data:
        value = data["image_size"]
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              f"`image_size` must be a whole number of pixels (0: not an image model), got {value!r}")
    if "pooling" in data:
        check(data["pooling"] in EXPORT_POOLINGS, f"`pooling` must be one of {list(EXPORT_POOLINGS)}, got {data['pooling']!r}")
    if "fixed_options" in data:
        check(_is_strings(data["fixed_options"]), f"`fixed_options` must be a list of strings, got {data['fixed_options']!r}")
    if "length_normalize" in data:
        check(isinstance(data["length_normalize"], bool),
              f"`length_normalize` must be true or false, got {data['length_normalize']!r}")
    if "context" in data:
        check(data["context"] in CONTEXTS, f"`context` must be one of {list(CONTEXTS)}, got {data['context']!r}")
    if "chat_template" in data:
        check(isinstance(data["chat_template"], bool),
              f"`chat_template` must be true or false, got {data['chat_template']!r}")
    return problems


def export_settings(config: RunConfig, label_names: list[str], *, pooling: str = "") -> ExportSettings:
    """The settings a run's configuration implies.

    Parameters
    ----------
    config : RunConfig
        The run's resolved configuration.
    label_names : list of str
        The classes in id order (causal QA: the option names).
    pooling : str
        What the export wrote as ``pooling`` (``mean``/``cls``), if anything.

    Returns
    -------
    ExportSettings
    """
    from fedfm.tasks import get_task

    data = config.data
    source = source_input_format(data.dataset)  # the dataset's own format: how its rows become model input
    rows = get_task(config.model.task).data_kind  # what the task reads decides what an input row must become
    if rows == MULTIPLE_CHOICE:
        fmt = source if source.kind == MULTIPLE_CHOICE else MULTIPLE_CHOICE_INPUT
    elif rows == IMAGE:
        fmt = source if source.kind == IMAGE else IMAGE_INPUT  # a table of image paths reads as the image format
    elif rows == INSTRUCTION:
        fmt = source if source.kind == INSTRUCTION else CHAT_INPUT
    elif data.hospitals or source.kind != CLASSIFICATION:
        fmt = TEXT_INPUT  # a deployment's hospitals hold their own files of text
    else:
        fmt = source
    classifier = fmt.kind == CLASSIFICATION
    image = fmt.kind == IMAGE
    own_columns = (classifier or image) and (data.dataset in FILE_DATASETS or bool(data.hospitals))
    generative = fmt.kind == INSTRUCTION
    text_column = fmt.text_column or (data.text_column if own_columns else "text")
    if image and own_columns and data.text_column != "text":  # `text` (the default) means the format's `image`
        text_column = data.text_column
    return ExportSettings(
        task=config.model.task, base_model=config.model.name, label_names=[] if generative else list(label_names),
        input_format=fmt.name, text_column=text_column,
        label_column=fmt.label_column or (data.label_column if own_columns else "label"),
        max_length=config.model.max_length, pooling=pooling if classifier else "",
        fixed_options=fmt.fixed_options(list(label_names)), context=data.context if classifier else "none",
        chat_template=generative, image_size=config.model.image_size if image else 0,
    )

