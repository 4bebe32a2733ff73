"""Supervised instruction tuning (SFT) of a causal LM: learn the responses of conversations.

Rows carry ``messages`` (:mod:`fedfm.data.instruction`): a list of
``{"role", "content"}`` turns ending with the assistant's. Each conversation
is written with the tokenizer's own chat template
(``tokenizer.apply_chat_template``), exactly as the model will be prompted
when it generates: for every assistant turn, the text up to it rendered with
``add_generation_prompt=True`` is the prompt, and what the full rendering adds
after it (the response and the template's end-of-turn tokens) is the target.
The loss falls on the assistant's tokens only.

A model without a chat template (a base model) gets :data:`PLAIN_TEMPLATE`,
which an exported adapter's tokenizer then carries, so generation prompts it
the way it was trained.

Too long a conversation loses prompt tokens before it loses response tokens:
the prompt keeps its first quarter and its end (the question's end and the
assistant header), and the response is cut only when it alone leaves less
than half of ``max_length`` to the prompt.

Training weighs every conversation the same (each row's mean token loss,
then the mean over rows: DP-SGD's per-example clipping bounds a whole
response, never a single token). Evaluation reports the token-weighted mean
loss of the held-out responses (``loss``), its ``perplexity`` and the
share of response tokens the model predicts exactly (``token-accuracy``).
Batches are padded on the right and bucketed by length
(:func:`fedfm.train.bucketed_batches`); examples are never packed into one
sequence, so no example attends to another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from fedfm.errors import DataError
from fedfm.tasks.base import Task, by_length, evaluating
from fedfm.tasks.causal_qa import IGNORE_INDEX, answer_logits, pad_right, pad_token_id, right_padded_collate

#: The template of models that have none: ChatML written as plain text (no special tokens needed).
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template, or :data:`PLAIN_TEMPLATE` when it has none."""
    return getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE


def render(tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
    """``messages`` as text through the model's chat template.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The model's tokenizer.
    messages : sequence of dict
        ``{"role", "content"}`` turns.
    generation_prompt : bool
        End with the header of an assistant turn (a prompt to generate from).

    Returns
    -------
    str
    """
    return str(tokenizer.apply_chat_template(list(messages), chat_template=chat_template(tokenizer), tokenize=False,
                                             add_generation_prompt=generation_prompt))


def conversation_pieces(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """A conversation as consecutive texts, each marked True when it is an assistant's response.

    Concatenated, the texts are the template's rendering of the whole
    conversation; each prompt text ends where the template would start the
    model's generation.

    Raises
    ------
    DataError
        The template renders a conversation so that an earlier prefix is not
        the start of a longer one (such a template cannot mark responses).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the model's chat template does not render a conversation as a sequence of its turns "
                            "(a prefix of the conversation is not the start of the whole), so its responses cannot "
                            "be marked for the loss; use a model whose template does, or set a plain one")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, is_response) for text, is_response in pieces if text]


def fit(prompt: list[int], prompt_labels: list[int], response: list[int], max_length: int
        ) -> tuple[list[int], list[int], list[int]]:
    """Cut a conversation to ``max_length`` tokens, prompt first (see the module's docstring).

    Parameters
    ----------
    prompt, prompt_labels : list of int
        Everything before the last response, and its labels (earlier responses keep theirs).
    response : list of int
        The last response's tokens.
    max_length : int
        The most tokens kept.

    Returns
    -------
    tuple of list
        ``(prompt, prompt_labels, response)`` within ``max_length`` tokens together.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, prompt_labels, response
    room = max(max_length - len(response), min(len(prompt), max_length // 2))
    if len(prompt) > room:
        head = room // 4
        keep = list(range(head)) + list(range(len(prompt) - (room - head), len(prompt)))
        prompt, prompt_labels = [prompt[i] for i in keep], [prompt_labels[i] for i in keep]
    return prompt, prompt_labels, response[: max_length - len(prompt)]


class InstructionTuning(Task):
    """Instruction tuning of a causal LM: the chat template, loss on the responses, held-out loss and perplexity."""

    name = "instruction-tuning"
    peft_task_type = "CAUSAL_LM"
    data_kind = "instruction"

    def model_class(self) -> Any:
        return AutoModelForCausalLM

    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        """Encode each conversation once: ``input_ids``, ``attention_mask``, ``labels`` (-100 off the responses)."""
        if "messages" not in dataset.column_names:
            raise DataError(f"instruction-tuning needs a `messages` column; have {dataset.column_names}")
        if max_length < 8:
            raise DataError(f"`max_length` must be >= 8 for instruction-tuning, got {max_length}")

        def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            return self.encode_rows(batch["messages"], tokenizer, max_length=max_length, indices=indices)

        return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names)

    def encode_rows(self, conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, *, max_length: int,
                    indices: Sequence[int] | None = None) -> dict[str, list[Any]]:
        """Token ids and labels of conversations (see :meth:`tokenize`).

        Every piece of :func:`conversation_pieces` is tokenized on its own
        (``add_special_tokens=False``: the template writes the special tokens),
        so a prompt's tokens are exactly those :meth:`prompt_ids` gives when
        the model generates.

        Raises
        ------
        DataError
            A conversation whose last response encodes to no tokens.
        """
        where = list(indices) if indices is not None else list(range(len(conversations)))
        split = [conversation_pieces(tokenizer, list(messages)) for messages in conversations]
        texts = [text for pieces in split for text, _ in pieces]
        flat = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        cursor = 0
        for row, pieces in enumerate(split):
            ids: list[int] = []
            labels: list[int] = []
            for _, is_response in pieces[:-1]:
                piece = list(flat[cursor])
                cursor += 1
                ids += piece
                labels += piece if is_response else [IGNORE_INDEX] * len(piece)
            response = list(flat[cursor])
            cursor += 1
            if not pieces[-1][1] or not response:
                raise DataError(f"row {where[row]}: the last response encodes to no tokens")
            prompt, prompt_labels, response = fit(ids, labels, response, max_length)
            out["input_ids"].append(prompt + response)
            out["attention_mask"].append([1] * (len(prompt) + len(response)))
            out["labels"].append(prompt_labels + response)
        return out

    def prompt_ids(self, tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
        """The tokens a model generates the next assistant turn after (the template's generation prompt)."""
        text = render(tokenizer, messages, generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return right_padded_collate(tokenizer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over rows of each row's mean response-token cross-entropy (every conversation weighs the same)."""
        sums, counts, _ = response_stats(*answer_logits(model, batch))
        return (sums / counts.clamp(min=1)).mean()

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """``loss`` (token-weighted mean NLL of the responses), ``perplexity`` and ``token-accuracy``."""
        if len(dataset) == 0:
            return {"loss": 0.0, "perplexity": 1.0, "token-accuracy": 0.0}
        sums, counts, correct = self._row_stats(model, dataset, tokenizer, batch_size=batch_size, device=device)
        tokens = max(float(counts.sum()), 1.0)
        loss = float(sums.sum()) / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "token-accuracy": float(correct.sum()) / tokens}

    @torch.no_grad()
    def example_losses(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> np.ndarray:
        """Each conversation's mean response-token NLL."""
        if len(dataset) == 0:
            return np.zeros(0)
        sums, counts, _ = self._row_stats(model, dataset, tokenizer, batch_size=batch_size, device=device)
        return sums / np.maximum(counts, 1)

    def _row_stats(self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: summed response NLL, response tokens, tokens predicted exactly (batches of similar length)."""
        ids, labels = dataset["input_ids"], dataset["labels"]
        sums, counts, correct = (np.zeros(len(ids)) for _ in range(3))
        pad_id = pad_token_id(tokenizer)
        with evaluating(model):
            for chosen in by_length([len(r) for r in ids], batch_size):
                batch = pad_right([ids[i] for i in chosen], [labels[i] for i in chosen], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                row_sums, row_counts, row_correct = response_stats(*answer_logits(model, batch))
                sums[chosen], counts[chosen], correct[chosen] = (
                    t.detach().cpu().numpy() for t in (row_sums, row_counts, row_correct)
                )
        return sums, counts, correct


def response_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed NLL of the labelled tokens, their count, and how many the model's argmax predicts.

    Parameters
    ----------
    logits : torch.Tensor
        ``(batch, length, vocab)``; position ``t`` predicts token ``t + 1``.
    labels : torch.Tensor
        ``(batch, length)``, ``-100`` where no loss is wanted.

    Returns
    -------
    tuple of torch.Tensor
        ``(sums, counts, correct)``, each ``(batch,)`` float32.
    """
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    picked = logits[rows, cols].float()  # only response positions, never a (batch, length, vocab) float32 copy
    wanted = targets[rows, cols]
    nll = torch.nn.functional.cross_entropy(picked, wanted, reduction="none")
    zeros = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    sums = zeros.index_add(0, rows, nll)
    counts = zeros.index_add(0, rows, torch.ones_like(nll))
    correct = zeros.index_add(0, rows, (picked.argmax(dim=-1) == wanted).to(torch.float32))
    return sums, counts, correct
