"""Generating answers with an exported instruction-tuned model, and scoring it on reference answers.

Prompts are tokenized exactly as training tokenized them
(:meth:`fedfm.tasks.InstructionTuning.prompt_ids`: the chat template of the
folder's tokenizer, ending with its generation prompt), cut the way training
cuts a long prompt (:func:`fedfm.tasks.instruction_tuning.fit`), sorted by
length and generated in batches padded on the left, so every row's last
prompt token sits at the end and the new tokens follow it. Decoding is greedy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedfm.errors import FedfmError
from fedfm.predict.loader import Exported

#: Tokens ``fedfm predict`` generates per answer unless told otherwise (``--max-new-tokens``).
DEFAULT_MAX_NEW_TOKENS = 256


class GenerationError(FedfmError, ValueError):
    """Generation was asked for something it cannot do (fewer than one new token)."""


def check_max_new_tokens(max_new_tokens: int) -> int:
    """``max_new_tokens`` must be an integer of at least 1 (checked before the model loads).

    Raises
    ------
    GenerationError
        Naming ``--max-new-tokens`` and the value it got.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be an integer >= 1 (tokens per answer), got {max_new_tokens!r}")
    return int(max_new_tokens)


@torch.no_grad()
def greedy_continuations(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, batch_size: int,
                         max_new_tokens: int, device: torch.device,
                         on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations of tokenized prompts, decoded without special tokens, in the order given.

    Prompts are sorted by length and padded on the left into batches, so every
    row's continuation starts right after its own last token; greedy decoding
    gives the same text whatever the batch, up to float rounding.

    Parameters
    ----------
    model : transformers causal LM or peft model
        On ``device``; put in eval mode for the call.
    tokenizer : transformers tokenizer
        Decodes the new tokens; its end-of-sequence token ends an answer.
    prompts : sequence of sequence of int
        Token ids, with whatever special tokens the prompt needs.
    batch_size : int
        Prompts per ``generate`` call.
    max_new_tokens : int
        The most tokens per answer; a batch stops once every row has ended.
    device : torch.device
        Where the model is.
    on_batch : callable, optional
        Called with the number of prompts each finished batch held (a progress counter).

    Returns
    -------
    list of str
        One answer per prompt, stripped of surrounding white space.
    """
    from transformers import GenerationConfig

    from fedfm.tasks.base import by_length, evaluating
    from fedfm.tasks.causal_qa import pad_token_id

    pad = pad_token_id(tokenizer)
    config = GenerationConfig(max_new_tokens=check_max_new_tokens(max_new_tokens), do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    ids = [list(p) for p in prompts]
    answers = [""] * len(ids)
    with evaluating(model):
        for chosen in by_length([len(i) for i in ids], batch_size):
            width = max(len(ids[i]) for i in chosen)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chosen], device=device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chosen], device=device)
            with warnings.catch_warnings():  # transformers' own deprecation inside generate, nothing a user can change
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            for row, i in enumerate(chosen):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            if on_batch is not None:
                on_batch(len(chosen))
    return answers


def generate(exported: Exported, prompts: Sequence[Sequence[dict[str, str]]], *, batch_size: int = 8,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """The model's greedy answer to each conversation, in order.

    Parameters
    ----------
    exported : Exported
        An instruction-tuned folder, from :func:`fedfm.predict.load_exported`.
    prompts : sequence of sequence of dict
        Conversations up to the answer (``{"role", "content"}`` turns).
    batch_size : int
        Conversations generated together.
    max_new_tokens : int
        The most tokens of an answer (it ends earlier at the end-of-turn token).

    Returns
    -------
    list of str
        The answers, without the template's special tokens.
    """
    from fedfm.tasks import InstructionTuning
    from fedfm.tasks.instruction_tuning import fit

    task, tokenizer, limit = InstructionTuning(), exported.tokenizer, exported.settings.max_length
    ids = [fit(p, p, [], limit)[0] for p in (task.prompt_ids(tokenizer, turns) for turns in prompts)]
    return greedy_continuations(exported.model, tokenizer, ids, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                device=exported.device)


def response_metrics(exported: Exported, prompts: Sequence[Sequence[dict[str, str]]], references: Sequence[str], *,
                     batch_size: int = 8) -> dict[str, float]:
    """How well the model predicts the reference answers: fedfm's held-out ``loss``, ``perplexity``, ``token-accuracy``.

    The conversations are tokenized and scored as the run's own evaluation
    scored its test rows (:meth:`fedfm.tasks.InstructionTuning.evaluate`), so
    the run's global test rows give the run's final figures.

    Parameters
    ----------
    exported : Exported
        An instruction-tuned folder.
    prompts : sequence of sequence of dict
        Conversations up to the answer.
    references : sequence of str
        Each conversation's reference answer.
    batch_size : int
        Conversations per forward pass.

    Returns
    -------
    dict
        ``loss``, ``perplexity``, ``token-accuracy`` and ``rows``.
    """
    import datasets

    from fedfm.tasks import InstructionTuning

    datasets.disable_progress_bars()
    conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, references, strict=True)]
    task = InstructionTuning()
    rows = task.tokenize(datasets.Dataset.from_dict({"messages": conversations}), exported.tokenizer,
                         max_length=exported.settings.max_length)
    metrics = task.evaluate(exported.model, rows, exported.tokenizer, batch_size=batch_size, device=exported.device)
    metrics["rows"] = float(len(conversations))
    return metrics
