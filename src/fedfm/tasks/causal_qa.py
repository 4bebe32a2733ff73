"""Multiple-choice question answering with a causal LM, scored by each option's likelihood.

Rows follow fedfm's multiple-choice standard: ``question`` (str), ``context``
(str, ``""`` when none), ``options`` (list of answer texts) and ``label`` (the
index of the right option). Each row becomes a plain-text prompt::

    Context: {context}
    Question: {question}
    Options: (A) {option 0} (B) {option 1} ...
    Answer:

(the ``Context:`` line is left out when the context is empty) followed by the
target ``" {option text}"`` and the tokenizer's end-of-sequence token.

Why a plain template rather than the tokenizer's chat template: it works the
same for base and instruction-tuned models and for the tiny random models of
the tests, costs no system-prompt tokens (SmolLM2's template adds 30 per prompt),
and LoRA fine-tuning adapts the model to whichever format it is shown.

Training puts the loss on the answer tokens only. Evaluation scores every
option by the log-probability of its tokens, end-of-sequence included, after
the prompt -- exactly the quantity training maximises for the right option --
and predicts the best one. The end token makes an option that is a prefix of
another (``"A"`` vs ``"A and B"``) comparable with it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from fedfm.errors import DataError
from fedfm.tasks.base import Task, by_length
from fedfm.tasks.metrics import classification_metrics

#: Label value the loss ignores (prompt and padding positions).
IGNORE_INDEX = -100
#: Columns a multiple-choice dataset must have.
REQUIRED_COLUMNS = ("question", "context", "options", "label")
#: Letters that name the options in the prompt; also the most options a row may have.
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_question(question: str, options: Sequence[str]) -> str:
    """The part of the prompt after the context: question, lettered options, ``Answer:``.

    Parameters
    ----------
    question : str
        The question text.
    options : sequence of str
        Answer texts, in the order their indices refer to.

    Returns
    -------
    str
        ``"Question: ...\\nOptions: (A) ... (B) ...\\nAnswer:"``.
    """
    listed = " ".join(f"({OPTION_LETTERS[i]}) {str(text).strip()}" for i, text in enumerate(options))
    return f"Question: {question.strip()}\nOptions: {listed}\nAnswer:"


def format_target(option: str) -> str:
    """The text the model should continue the prompt with: a space, then the option."""
    return " " + str(option).strip()


class CausalQA(Task):
    """Multiple-choice QA as text completion: learn the right answer's text, score options by likelihood.

    Parameters
    ----------
    length_normalize : bool
        Score an option by its mean token log-probability instead of the sum.
        The default (sum) is the probability of producing exactly that answer,
        which is what training maximises; the mean stops long options from
        being penalised for their length when options differ a lot in length
        (e.g. MedMCQA), at the price of no longer being a probability.
    """

    name = "causal-qa"
    peft_task_type = "CAUSAL_LM"
    data_kind = "multiple-choice"

    def __init__(self, *, length_normalize: bool = False) -> None:
        self.length_normalize = length_normalize

    def model_class(self) -> Any:
        return AutoModelForCausalLM

    def tokenize(self, dataset: Dataset, tokenizer: Any, *, max_length: int) -> Dataset:
        """Encode prompts and answers once; see :meth:`encode_rows` for the columns."""
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise DataError(
                f"causal-qa needs columns {list(REQUIRED_COLUMNS)}; missing {missing} (have {dataset.column_names})"
            )
        if max_length < 2:
            raise DataError(f"`max_length` must be >= 2 for causal-qa, got {max_length}")

        def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            return self.encode_rows(batch, tokenizer, max_length=max_length, indices=indices)

        return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names)

    def encode_rows(
        self, batch: dict[str, list[Any]], tokenizer: Any, *, max_length: int, indices: Sequence[int] | None = None
    ) -> dict[str, list[Any]]:
        """Encode a batch of standard rows into training and evaluation columns.

        Prompt and answer are tokenized separately and joined, so the answer
        tokens are identical in training and in option scoring. When the prompt
        and the longest option do not fit ``max_length`` the end of the context
        is cut (the whole context section goes if even its header does not
        fit); question, options and answers are never cut.

        Parameters
        ----------
        batch : dict
            Columns ``question``, ``context``, ``options``, ``label``.
        tokenizer : transformers tokenizer
            The model's tokenizer.
        max_length : int
            Most tokens of prompt plus any option (end token included).
        indices : sequence of int, optional
            Dataset row numbers of the batch, for error messages.

        Returns
        -------
        dict
            ``input_ids``, ``attention_mask`` (prompt + right answer),
            ``labels`` (``-100`` on the prompt, answer ids after it),
            ``prompt_length`` (the prompt is ``input_ids[:prompt_length]``),
            ``option_ids`` (per option, its continuation ids, end token
            included) and ``label`` (index of the right option).

        Raises
        ------
        DataError
            On a bad label, fewer than two or more than 26 options, or a row
            whose question and options alone exceed ``max_length``.
        """
        rows = len(batch["question"])
        where = list(indices) if indices is not None else list(range(rows))
        for i in range(rows):
            n_options, label = len(batch["options"][i]), batch["label"][i]
            if not 2 <= n_options <= len(OPTION_LETTERS):
                raise DataError(f"row {where[i]}: needs 2 to {len(OPTION_LETTERS)} options, got {n_options}")
            if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < n_options:
                raise DataError(f"row {where[i]}: `label` must be an option index in [0, {n_options}), got {label!r}")

        def encode(texts: list[str]) -> list[list[int]]:
            if not texts:
                return []
            return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

        prefix = special_prefix(tokenizer)
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        questions = encode([format_question(q, o) for q, o in zip(batch["question"], batch["options"])])
        contexts = encode([" " + (c or "").strip() for c in batch["context"]])
        flat_options = encode([format_target(o) for options in batch["options"] for o in options])
        context_head, newline = encode(["Context:", "\n"])

        out: dict[str, list[Any]] = {
            k: [] for k in ("input_ids", "attention_mask", "labels", "prompt_length", "option_ids", "label")
        }
        cursor = 0
        for i in range(rows):
            n_options = len(batch["options"][i])
            options = [ids + end for ids in flat_options[cursor : cursor + n_options]]
            cursor += n_options
            if any(not ids for ids in options):
                raise DataError(f"row {where[i]}: an option encodes to no tokens and the tokenizer has no end token")
            fixed = len(prefix) + len(questions[i]) + max(len(ids) for ids in options)
            if fixed > max_length:
                raise DataError(
                    f"row {where[i]}: question and options need {fixed} tokens without any context, "
                    f"more than `max_length` = {max_length}; raise max_length"
                )
            context: list[int] = []
            if (batch["context"][i] or "").strip():
                room = max_length - fixed - len(context_head) - len(newline)
                if room > 0:
                    context = context_head + contexts[i][:room] + newline
            prompt = prefix + context + questions[i]
            label = int(batch["label"][i])
            answer = options[label]
            out["input_ids"].append(prompt + answer)
            out["attention_mask"].append([1] * (len(prompt) + len(answer)))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
            out["prompt_length"].append(len(prompt))
            out["option_ids"].append(options)
            out["label"].append(label)
        return out

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return right_padded_collate(tokenizer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over rows of each row's mean answer-token cross-entropy.

        Every question weighs the same whatever its answer's length; this is
        also the per-sample mean that DP-SGD's ``loss_reduction="mean"`` assumes.
        """
        logits, labels = answer_logits(model, batch)
        sums, counts = answer_nll(logits, labels)
        return (sums / counts.clamp(min=1)).mean()

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Accuracy and F1 of the most likely option; ``loss`` is the right option's mean token NLL.

        Options are scored by :meth:`option_log_likelihoods` (each prompt runs
        once). ``batch_size`` only matters for models without a reusable
        cache, where it counts (row, option) sequences per forward pass.
        """
        if len(dataset) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "macro-f1": 0.0, "weighted-f1": 0.0}
        log_likelihood, n_tokens = self.option_log_likelihoods(
            model, dataset, tokenizer, batch_size=batch_size, device=device
        )
        with np.errstate(invalid="ignore", divide="ignore"):  # absent options: -inf / 0
            scores = log_likelihood / n_tokens if self.length_normalize else log_likelihood
        scores = np.where(n_tokens > 0, scores, -np.inf)
        labels = np.asarray(dataset["label"], dtype=np.int64)
        rows = np.arange(len(labels))
        gold_nll = -log_likelihood[rows, labels] / n_tokens[rows, labels]
        return classification_metrics(labels, scores.argmax(axis=1), scores.shape[1], float(gold_nll.mean()))

    @torch.no_grad()
    def example_losses(
        self, model: torch.nn.Module, dataset: Dataset, tokenizer: Any, *, batch_size: int, device: torch.device
    ) -> np.ndarray:
        """Each question's mean token NLL of its right answer."""
        if len(dataset) == 0:
            return np.zeros(0)
        log_likelihood, n_tokens = self.option_log_likelihoods(
            model, dataset, tokenizer, batch_size=batch_size, device=device
        )
        labels = np.asarray(dataset["label"], dtype=np.int64)
        rows = np.arange(len(labels))
        return -log_likelihood[rows, labels] / np.maximum(n_tokens[rows, labels], 1)

    @torch.no_grad()
    def option_log_likelihoods(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        tokenizer: Any,
        *,
        batch_size: int,
        device: torch.device,
        reuse_prompt: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Log-probability of every option's tokens after its row's prompt.

        With ``reuse_prompt`` each row's prompt runs once and all its options
        continue from the cached keys and values: for PubMedQA (a ~400-token
        prompt, 2-token answers, 3 options) that is about a third of the work
        of scoring each (prompt + option) sequence on its own. Models that
        return no reusable cache fall back to the latter, which sorts the
        sequences by length and right-pads them in batches of ``batch_size``.
        Both give the same numbers up to float rounding. The model's
        train/eval mode is restored afterwards.

        Parameters
        ----------
        model : torch.nn.Module
            A causal LM (peft-wrapped or not) on ``device``.
        dataset : Dataset
            Output of :meth:`tokenize`.
        tokenizer : transformers tokenizer
            Gives the padding id.
        batch_size : int
            Sequences per forward pass when sequences are scored one by one.
        device : torch.device
            Where batches go.
        reuse_prompt : bool
            Run each prompt once and continue it with every option.

        Returns
        -------
        tuple of numpy.ndarray
            ``(log_likelihood, n_tokens)``, both ``(rows, most options)``:
            summed token log-probabilities (``-inf`` where a row has fewer
            options) and the number of tokens summed (0 there).
        """
        prompts = [list(ids[:n]) for ids, n in zip(dataset["input_ids"], dataset["prompt_length"])]
        options = [[list(ids) for ids in row] for row in dataset["option_ids"]]
        num_options = max((len(row) for row in options), default=0)
        log_likelihood = np.full((len(prompts), num_options), -np.inf)
        n_tokens = np.zeros((len(prompts), num_options))
        pad_id = pad_token_id(tokenizer)
        was_training = model.training
        model.eval()
        try:
            done = 0
            while reuse_prompt and done < len(prompts):
                scores = _continue_prompt(model, prompts[done], options[done], pad_id, device)
                if scores is None:
                    break  # the model keeps no cache: score every sequence on its own below
                log_likelihood[done, : len(scores)] = scores
                n_tokens[done, : len(scores)] = [len(ids) for ids in options[done]]
                done += 1
            remaining = list(range(done, len(prompts)))
            _score_sequences(
                model, prompts, options, remaining, pad_id, max(1, batch_size), device, log_likelihood, n_tokens
            )
        finally:
            model.train(was_training)
        return log_likelihood, n_tokens


def _continue_prompt(
    model: torch.nn.Module, prompt: list[int], options: list[list[int]], pad_id: int, device: torch.device
) -> list[float] | None:
    """Log-likelihood of each option after one shared prompt pass, or None without a reusable cache."""
    argument = _cache_argument(model)
    if argument is None:
        return None
    prompt_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out = _forward(
        model, {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids), "use_cache": True}, 1
    )
    cache = getattr(out, argument, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache.batch_repeat_interleave(len(options))
    batch = pad_right(options, options, pad_id)
    mask = torch.cat([torch.ones(len(options), len(prompt), dtype=torch.long), batch["attention_mask"]], dim=1)
    # Right padding keeps every option token at its true position after the prompt.
    rest = model(
        input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=True, **{argument: cache}
    ).logits
    sums, _ = answer_nll(rest, batch["labels"].to(device))  # tokens 2.. of each option
    heads = torch.tensor([ids[0] for ids in options], device=first.device)
    return (first[heads] - sums.to(first.device)).tolist()


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which the model takes and returns its key/value cache, if it has one."""
    unwrap = getattr(model, "get_base_model", None)  # peft wraps the real model
    base = unwrap() if callable(unwrap) else model
    parameters = inspect.signature(base.forward).parameters
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _score_sequences(
    model: torch.nn.Module,
    prompts: list[list[int]],
    options: list[list[list[int]]],
    rows: list[int],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    log_likelihood: np.ndarray,
    n_tokens: np.ndarray,
) -> None:
    """Score (prompt + option) sequences of ``rows`` independently, filling the two arrays in place."""
    pairs = [(r, k) for r in rows for k in range(len(options[r]))]
    sequences = [prompts[r] + options[r][k] for r, k in pairs]
    targets = [[IGNORE_INDEX] * len(prompts[r]) + options[r][k] for r, k in pairs]
    for chosen in by_length([len(s) for s in sequences], batch_size):
        batch = pad_right([sequences[i] for i in chosen], [targets[i] for i in chosen], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        sums, counts = answer_nll(*answer_logits(model, batch))
        for i, total, count in zip(chosen, sums.tolist(), counts.tolist()):
            r, k = pairs[i]
            log_likelihood[r, k], n_tokens[r, k] = -total, count


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. ``[bos]``; none for SmolLM2).

    Suffix tokens such as BERT's ``[SEP]`` are left out: a causal LM should
    not see them between prompt and answer.
    """
    probe = "Answer"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else end-of-sequence, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def right_padded_collate(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collate function right-padding rows' ``input_ids`` and ``labels`` (:func:`pad_right`) with the pad id."""
    pad_id = pad_token_id(tokenizer)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_right([r["input_ids"] for r in rows], [r["labels"] for r in rows], pad_id)

    return collate


def pad_right(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences into ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding).

    Right padding keeps every real token at the position it had alone, so a
    causal model gives the same answer scores whatever the batch.
    """
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    target = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, row_labels) in enumerate(zip(input_ids, labels)):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        target[i, : len(row_labels)] = torch.as_tensor(row_labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": target}


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits from the first position that predicts an answer token on, with matching labels.

    A causal LM's logits are ``(batch, length, vocab)``: with SmolLM2's 49k
    vocabulary, 64 sequences of 512 tokens would need 6.4 GB in float32,
    almost all for prompt positions nobody scores. transformers' causal LMs
    take ``logits_to_keep`` to compute only the last positions; models that
    do not are run in full.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM, peft-wrapped or not.
    batch : dict
        Right-padded ``input_ids``, ``attention_mask`` and ``labels``.

    Returns
    -------
    tuple of torch.Tensor
        ``(logits, labels)`` covering the same last positions; ``labels`` may
        be shorter than the batch's but keeps every answer token.
    """
    labels = batch["labels"]
    width = labels.shape[1]
    is_answer = labels != IGNORE_INDEX
    # Position p predicts token p + 1, so the earliest answer token needs p = first - 1.
    first = int(is_answer.to(torch.int8).argmax(dim=1).min()) if bool(is_answer.any()) else 0
    keep = min(width, width - first + 1)
    logits = _forward(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, keep).logits
    # A model may also accept and ignore the argument: align with whatever came back.
    return logits, labels[:, width - logits.shape[1] :]


def _forward(model: torch.nn.Module, inputs: dict[str, Any], logits_to_keep: int) -> Any:
    """``model(**inputs)`` computing only the last ``logits_to_keep`` logits where the model allows it."""
    try:
        return model(**inputs, logits_to_keep=logits_to_keep)
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
        return model(**inputs)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed negative log-likelihood of the labelled tokens, and how many there are.

    Parameters
    ----------
    logits : torch.Tensor
        ``(batch, length, vocab)`` model outputs; position ``t`` predicts token ``t + 1``.
    labels : torch.Tensor
        ``(batch, length)`` token ids, ``-100`` where no loss is wanted.

    Returns
    -------
    tuple of torch.Tensor
        ``(sums, counts)``, each of shape ``(batch,)``, float32.
    """
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    # Only answer positions go through log-softmax (in float32, for stability),
    # never a full (batch, length, vocab) copy.
    picked = logits[rows, cols].float()
    nll = torch.nn.functional.cross_entropy(picked, targets[rows, cols], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, nll)
    counts = torch.bincount(rows, minlength=labels.shape[0]).to(torch.float32)
    return sums, counts
