"""Task kinds: tokenization, loss and evaluation per kind of problem.

A small registry maps the config's ``model.task`` to a :class:`Task` class.
"""

from __future__ import annotations

from fedfm.errors import ConfigError
from fedfm.tasks.base import Task
from fedfm.tasks.causal_qa import CausalQA
from fedfm.tasks.image_classification import ImageClassification
from fedfm.tasks.instruction_tuning import InstructionTuning
from fedfm.tasks.sequence_classification import SequenceClassification
from fedfm.tasks.token_classification import TokenClassification

_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str, cls: type[Task], *, force: bool = False) -> None:
    """Make a task class available under ``model.task = name``.

    Raises
    ------
    ConfigError
        ``name`` is taken by another class and ``force`` is false.
    """
    if not force and _REGISTRY.get(name, cls) is not cls:
        raise ConfigError(f"task {name!r} is registered already ({_REGISTRY[name].__name__}); pass force=True to "
                          "replace it")
    _REGISTRY[name] = cls


def get_task(name: str) -> Task:
    """An instance of the task registered as ``name``.

    Raises
    ------
    ConfigError
        When no task has that name; the message lists the known ones.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"`model.task` must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]()


register_task(SequenceClassification.name, SequenceClassification)
register_task(CausalQA.name, CausalQA)
register_task(TokenClassification.name, TokenClassification)
register_task(InstructionTuning.name, InstructionTuning)
register_task(ImageClassification.name, ImageClassification)

__all__ = [
    "CausalQA",
    "ImageClassification",
    "InstructionTuning",
    "SequenceClassification",
    "Task",
    "TokenClassification",
    "get_task",
    "register_task",
]
