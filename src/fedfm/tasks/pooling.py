"""How an encoder's token states become the one vector a classification head reads.

BERT-family models in transformers pool with their first token: ``pooler`` takes
the ``[CLS]`` state through a dense layer and ``tanh``. Sentence-transformers
checkpoints such as all-MiniLM-L6-v2 were trained with a mask-aware mean of the
last layer instead, and the pooler weights they ship are left over from
pre-training. Mean pooling them gives LoRA a far better starting point
(NICTA-PIBOSO, 150 steps on pooled rows: macro-F1 0.43 with mean pooling, 0.31
with the CLS pooler; ``docs/dev-notes.md``).

:func:`apply_pooling` swaps the encoder's ``pooler`` for :class:`MeanPooler`;
the model keeps its class, its state-dict names and its head, so peft adapters
and merged checkpoints are unchanged. A colleague loading an exported adapter
calls the same function on the base before ``PeftModel.from_pretrained``.

``layer-mean`` (:class:`LayerMeanPooler`) averages that mean over the embedding
output and every layer's output. Intermediate layers of a sentence encoder keep
more of a sentence's form than its last, meaning-tuned layer: on NICTA-PIBOSO a
linear probe of MiniLM's frozen features, pooled rows trained to convergence,
reaches macro-F1 0.529 on test with ``layer-mean`` against 0.450 with ``mean``
(validation 0.545 against 0.507), which is what lifts the DP linear probe
(``docs/privacy.md``). On heart's templated records it does worse (DP probe
accuracy 0.76 against 0.78): choose it on validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedfm.errors import ModelError

POOLING_FILE = Path("1_Pooling") / "config.json"


class MeanPooler(torch.nn.Module):
    """Mean of the token states the attention mask keeps (no parameters).

    The encoder calls its pooler with the hidden states only, so a forward
    pre-hook on the encoder hands the batch's attention mask over first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class LayerMeanPooler(MeanPooler):
    """The masked token mean of the embedding output and of every layer's output, averaged (no parameters).

    Forward hooks on the embeddings and on each layer hand their outputs over
    (:func:`_collect`); the encoder's pre-hook empties the list for each batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.states: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        states, self.states = self.states or [hidden_states], []
        return torch.stack([super(LayerMeanPooler, self).forward(state) for state in states]).mean(dim=0)


def model_pooling(model_dir: Path) -> str:
    """``mean`` when a sentence-transformers folder says it pools by mean, else ``cls``."""
    path = model_dir / POOLING_FILE
    if not path.is_file():
        return "cls"
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return "cls"
    return "mean" if settings.get("pooling_mode_mean_tokens") else "cls"


def resolve_pooling(requested: str, model_dir: Path) -> str:
    """The pooling a run uses: ``requested``, with ``auto`` read from the model folder."""
    return model_pooling(model_dir) if requested == "auto" else requested


def apply_pooling(model: Any, pooling: str) -> Any:
    """Make a transformers sequence classifier pool its encoder's states by ``pooling``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``...ForSequenceClassification`` model (not yet wrapped by peft, or
        wrapped: the encoder is found either way).
    pooling : str
        ``cls`` leaves the model as it is; ``mean`` installs :class:`MeanPooler`,
        ``layer-mean`` :class:`LayerMeanPooler`.

    Returns
    -------
    The same model, changed in place.

    Raises
    ------
    ModelError
        ``mean`` or ``layer-mean`` was asked for on an architecture without a
        ``pooler`` layer (or, for ``layer-mean``, without BERT's ``embeddings``
        and ``encoder.layer``).
    """
    if pooling == "cls":
        return model
    encoder = _encoder(model)
    if encoder is None:
        raise ModelError(
            f"`model.pooling` '{pooling}' needs an encoder with a `pooler` layer (BERT family); "
            f"{type(model).__name__} has none. Use 'cls'."
        )
    if isinstance(encoder.pooler, MeanPooler):
        if isinstance(encoder.pooler, LayerMeanPooler) != (pooling == "layer-mean"):
            raise ModelError(f"this model already pools by {type(encoder.pooler).__name__}; cannot switch to '{pooling}'")
        return model
    if pooling == "layer-mean":
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if not isinstance(getattr(encoder, "embeddings", None), torch.nn.Module) or not isinstance(layers, torch.nn.ModuleList):
            raise ModelError(f"`model.pooling` 'layer-mean' needs BERT's `embeddings` and `encoder.layer`; "
                             f"{type(model).__name__} has another layout. Use 'mean'.")
        encoder.pooler = LayerMeanPooler()
        for module in (encoder.embeddings, *layers):
            # A plain attribute, not a submodule: the state dict keeps its names; a deep copy of the model
            # (merging, export) points the copied layers at the copied pooler.
            object.__setattr__(module, "_fedfm_pooler", encoder.pooler)
            module.register_forward_hook(_collect)
    else:
        encoder.pooler = MeanPooler()
    encoder.register_forward_pre_hook(_hand_over_mask, with_kwargs=True)
    return model


def _collect(module: Any, args: tuple[Any, ...], output: Any) -> None:
    module._fedfm_pooler.states.append(output[0] if isinstance(output, tuple) else output)


def _hand_over_mask(encoder: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # A module-level function, not a closure: a deep copy of the model (merging,
    # export) then hands the mask to its own pooler, not to the original's.
    if isinstance(encoder.pooler, MeanPooler):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        encoder.pooler.mask = mask
        if isinstance(encoder.pooler, LayerMeanPooler):
            encoder.pooler.states = []


def _encoder(model: Any) -> Any:
    """The submodule that owns ``pooler`` (``bert`` in ``BertForSequenceClassification``)."""
    for module in model.modules():
        if isinstance(getattr(module, "pooler", None), torch.nn.Module):
            return module
    return None
