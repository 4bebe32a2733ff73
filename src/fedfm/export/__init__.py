"""What a run hands to colleagues: a self-describing adapter folder and its model card.

At the end of a run :func:`write_model_card` (:mod:`fedfm.export.describe`)
completes the exported folders (``adapter/`` and, with
``output.merged-model``, ``merged/``):

- ``fedfm.json`` names everything inference needs besides the weights: the
  task, the base model, the class names in id order, how a row becomes the
  model's input, the token limit and the pooling, an image classifier's image
  size (:class:`ExportSettings`, :mod:`fedfm.export.settings`);
- ``README.md`` is a Hugging Face model card whose every figure is read from
  the run's own ``config.toml``, ``summary.json`` and ``metrics.jsonl``
  (:mod:`fedfm.export.card`);
- a merged classifier's ``config.json`` names its classes, and one that pools
  by the mean gets ``modeling_fedfm.py`` and an ``auto_map`` there
  (:mod:`fedfm.export.merged`);
- an image classifier's folders keep the image processor of training
  (``preprocessor_config.json``); the card's snippet classifies an image file;
- an instruction-tuned model's folder records the ``chat`` input format
  (:mod:`fedfm.export.conversation`: a row as a conversation to answer) and its
  tokenizer carries the chat template training used.

Loading a folder back for ``fedfm predict`` / ``fedfm evaluate`` is
:func:`fedfm.predict.load_exported`.
"""

from __future__ import annotations

from fedfm.export.card import CARD, loading_snippet, model_card
from fedfm.export.conversation import CHAT_INPUT, ConversationInput, carry_chat_template
from fedfm.export.describe import write_model_card
from fedfm.export.merged import MODELING_FILE
from fedfm.export.settings import (
    CLASSIFIER_TASKS,
    EXPORT_POOLINGS,
    PREDICTABLE_TASKS,
    TEXT,
    ExportError,
    ExportSettings,
    export_settings,
)

__all__ = [
    "CARD",
    "CHAT_INPUT",
    "CLASSIFIER_TASKS",
    "EXPORT_POOLINGS",
    "MODELING_FILE",
    "PREDICTABLE_TASKS",
    "TEXT",
    "ConversationInput",
    "ExportError",
    "ExportSettings",
    "carry_chat_template",
    "export_settings",
    "loading_snippet",
    "model_card",
    "write_model_card",
]
