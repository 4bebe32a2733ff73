"""The merged model's own description: class names in its ``config.json`` (text and image classifiers) and,
for mean pooling (``mean``, ``layer-mean``), ``modeling_fedfm.py``.

A merged classifier that pools by the mean gets ``modeling_fedfm.py`` and an
``auto_map`` in its ``config.json``, so ``AutoModelForSequenceClassification
.from_pretrained(merged, trust_remote_code=True)`` rebuilds the same model
with transformers alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.export.settings import CLASSIFIER_TASKS, MEAN_POOLINGS, ExportSettings
from fedfm.rundir import atomic_write_text

#: The module a mean-pooled merged classifier carries for ``trust_remote_code=True``.
MODELING_FILE = "modeling_fedfm.py"


_MODELING_TEMPLATE = '''"""Mean pooling for this merged classifier (written by fedfm; needs only torch and transformers).

Load with ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``.
The encoder's first-token pooler is replaced by a mask-aware mean of the token
states (LAYERS: of the embedding output and of every layer's output, averaged;
else of the last layer), the pooling the model was fine-tuned with; it has no weights.
"""

import torch
from transformers import {base} as _Base

LAYERS = {layers}


class MeanPooler(torch.nn.Module):
    """Mean of the token states the attention mask keeps (averaged over the collected layers when LAYERS)."""

    def __init__(self):
        super().__init__()
        self.mask = None
        self.states = []

    def _mean(self, hidden_states):
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden_states):
        states, self.states = self.states or [hidden_states], []
        return torch.stack([self._mean(state) for state in states]).mean(dim=0)


def _hand_over_mask(encoder, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    encoder.pooler.mask = mask
    encoder.pooler.states = []


def _collect(module, args, output):
    module._fedfm_pooler.states.append(output[0] if isinstance(output, tuple) else output)


class MeanPooled{base}(_Base):
    """``{base}`` pooling by the mask-aware mean of its token states."""

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if isinstance(getattr(module, "pooler", None), torch.nn.Module):
                module.pooler = MeanPooler()
                module.register_forward_pre_hook(_hand_over_mask, with_kwargs=True)
                if LAYERS:
                    for layer in (module.embeddings, *module.encoder.layer):
                        object.__setattr__(layer, "_fedfm_pooler", module.pooler)
                        layer.register_forward_hook(_collect)
                break
'''



def describe_merged_config(folder: Path, settings: ExportSettings) -> None:
    """Class names in the merged ``config.json``; for mean pooling, the module that rebuilds it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if settings.task in CLASSIFIER_TASKS:  # `model.config.id2label` then names the classes, not LABEL_0, LABEL_1, ...
        config["id2label"] = {str(i): name for i, name in enumerate(settings.label_names)}
        config["label2id"] = {name: i for i, name in enumerate(settings.label_names)}
    if settings.pooling in MEAN_POOLINGS:
        base = (config.get("architectures") or ["BertForSequenceClassification"])[0]
        atomic_write_text(folder / MODELING_FILE,
                          _MODELING_TEMPLATE.format(base=base, layers=settings.pooling == "layer-mean"))
        config["auto_map"] = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.MeanPooled{base}"}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
