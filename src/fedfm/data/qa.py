"""Biomedical multiple-choice question sets: PubMedQA and MedMCQA."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from fedfm.data.base import MULTIPLE_CHOICE, SourceData, SourceRequest
from fedfm.data.files import read_json
from fedfm.data.formats import InputFormat
from fedfm.data.paths import data_file
from fedfm.errors import DataError

PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
MEDMCQA_LETTERS = ["A", "B", "C", "D"]
_OPTION_LINE = re.compile(r"^([A-Z])\.\s?(.*)$")


@dataclass(frozen=True)
class MultipleChoiceInput(InputFormat):
    """Multiple-choice rows: columns ``question``, ``context`` (optional) and ``options``, answers scored by likelihood.

    Attributes
    ----------
    same_options : bool
        Every row's options are the source's classes (PubMedQA: yes/no/maybe),
        so an exported folder records them and input files need no ``options`` column.
    """

    name: str = "multiple-choice"
    kind: str = MULTIPLE_CHOICE
    label_column: str | None = "label"
    same_options: bool = False

    def describe(self, *, text_column: str, context: str, fixed_options: list[str]) -> str:
        """The model card's description of multiple-choice rows (see :meth:`InputFormat.describe`)."""
        fixed = f"; options always {fixed_options}" if fixed_options else ""
        return f"a multiple-choice question (columns question, context, options){fixed}, answers scored by likelihood"

    def fixed_options(self, label_names: list[str]) -> list[str]:
        """``label_names`` when every row shares them (:attr:`same_options`), else ``[]``."""
        return list(label_names) if self.same_options else []


#: Multiple-choice rows with their own options (MedMCQA, MedQA); ``fedfm.json`` names this format.
MULTIPLE_CHOICE_INPUT = MultipleChoiceInput()
#: PubMedQA: every question has the options yes/no/maybe.
PUBMEDQA_INPUT = MultipleChoiceInput(same_options=True)


def load_pubmedqa(request: SourceRequest) -> SourceData:
    """Load PubMedQA PQA-L (Jin et al., EMNLP 2019, https://arxiv.org/abs/1909.06146).

    The 500 PMIDs of ``test_ground_truth.json`` are the official test split; the
    other 500 of ``ori_pqal.json`` are train. The question is answered from the
    abstract without its conclusion (the "reasoning-required" setting).

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        Columns ``question``, ``context`` (the abstract's sections joined with a
        space, untruncated), ``options`` (yes/no/maybe), ``label``, ``pmid`` and
        ``conclusion`` (the abstract's conclusion, ``LONG_ANSWER``; only
        :func:`with_conclusions` reads it, for ``data.augment = "conclusion"``).
    """
    origin = request.data_dir_origin
    questions = read_json(data_file(request.data_dir, origin, "pubmedqa/ori_pqal.json"))
    test_truth = read_json(data_file(request.data_dir, origin, "pubmedqa/test_ground_truth.json"))
    unknown = sorted(set(test_truth) - set(questions))
    if unknown:
        raise DataError(f"test_ground_truth.json names PMIDs absent from ori_pqal.json: {unknown[:5]}")
    splits: dict[str, dict[str, list]] = {
        s: {"question": [], "context": [], "options": [], "label": [], "pmid": [], "conclusion": []} for s in ("train", "test")
    }
    for pmid, item in questions.items():
        answer = test_truth.get(pmid, item.get("final_decision"))
        if answer not in PUBMEDQA_OPTIONS:
            raise DataError(f"PMID {pmid}: answer {answer!r} is not one of {PUBMEDQA_OPTIONS}")
        columns = splits["test" if pmid in test_truth else "train"]
        columns["question"].append(str(item["QUESTION"]))
        columns["context"].append(" ".join(str(c).strip() for c in item["CONTEXTS"]))
        columns["options"].append(list(PUBMEDQA_OPTIONS))
        columns["label"].append(PUBMEDQA_OPTIONS.index(answer))
        columns["pmid"].append(str(pmid))
        columns["conclusion"].append(str(item.get("LONG_ANSWER") or "").strip())
    return SourceData(
        name=request.name,
        kind=MULTIPLE_CHOICE,
        train=datasets.Dataset.from_dict(splits["train"]),
        test=datasets.Dataset.from_dict(splits["test"]),
        label_names=list(PUBMEDQA_OPTIONS),
        natural_column=None,
    )


def with_conclusions(rows: datasets.Dataset, where: str) -> datasets.Dataset:
    """Training rows followed by their "reasoning-free" copies (``data.augment = "conclusion"``).

    Each row with a non-empty ``conclusion`` is repeated once with the
    conclusion appended to its ``context``, as in PubMedQA's reasoning-free
    setting, which the PubMedQA paper (Jin et al. 2019, section 4) uses as
    additional supervision for the reasoning-required one. Only for a
    hospital's training rows: the questions it is tested on keep the context
    without the conclusion.

    Parameters
    ----------
    rows : datasets.Dataset
        Rows with ``context`` and ``conclusion`` columns.
    where : str
        Names the rows in the error for a missing column.

    Returns
    -------
    datasets.Dataset
        ``rows``, then the copies (rows with an empty conclusion get none).

    Raises
    ------
    DataError
        If ``rows`` lack a ``context`` or ``conclusion`` column.
    """
    missing = [c for c in ("context", "conclusion") if c not in rows.column_names]
    if missing:
        raise DataError(
            f"`data.augment` 'conclusion' needs 'context' and 'conclusion' columns; {where} lack {missing} "
            f"(columns: {rows.column_names})"
        )
    keep = [i for i, conclusion in enumerate(rows["conclusion"]) if (conclusion or "").strip()]
    if not keep:
        return rows
    copies = rows.select(keep)
    contexts = [f"{(c or '').strip()} {conclusion.strip()}".strip()
                for c, conclusion in zip(copies["context"], copies["conclusion"])]
    copies = copies.remove_columns("context").add_column("context", contexts).select_columns(rows.column_names)
    return datasets.concatenate_datasets([rows, copies])


def parse_lettered_options(text: str) -> list[str]:
    """Split ``"A. first\\nB. second"`` into ``["first", "second"]``.

    Parameters
    ----------
    text : str
        Options one per line, each starting with its letter and a full stop; a
        line without a letter continues the previous option.

    Returns
    -------
    list[str]
        The option texts in letter order, prefixes removed.
    """
    options: list[str] = []
    for line in text.splitlines():
        match = _OPTION_LINE.match(line.strip())
        if match and match.group(1) == chr(ord("A") + len(options)):
            options.append(match.group(2).strip())
        elif options:
            options[-1] = f"{options[-1]}\n{line}".strip()
        elif line.strip():
            raise DataError(f"options text does not start with 'A. ': {text[:60]!r}")
    return options


def load_medmcqa(request: SourceRequest) -> SourceData:
    """Load MedMCQA's 4,183-question dev set (Pal et al., CHIL 2022, https://arxiv.org/abs/2203.14371).

    The official test set has no public answers, so there is no test split here;
    the ``subject`` column (21 subjects) gives a natural non-IID partition.

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        Columns ``question``, ``context`` (""), ``options`` (4), ``label``, ``subject``.
    """
    path = data_file(request.data_dir, request.data_dir_origin, "medmcqa/validation.jsonl")
    columns = _read_lettered_jsonl(path, extra=("subject",))
    return SourceData(
        name=request.name,
        kind=MULTIPLE_CHOICE,
        train=datasets.Dataset.from_dict(columns),
        test=None,
        label_names=list(MEDMCQA_LETTERS),
        natural_column="subject",
    )


def load_medqa(request: SourceRequest) -> SourceData:
    """Load MedQA's US test set, 1,273 five-option USMLE questions (Jin et al. 2021, https://arxiv.org/abs/2009.13081).

    Only the official test split is available offline, so it is the whole
    dataset here: hospitals are drawn from it (``iid`` or ``dirichlet``) and each
    keeps ``data.test-fraction`` as its local test split; the global test set is
    the pooled local test splits.

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        Columns ``question``, ``context`` (""), ``options`` (5), ``label``.
    """
    path = data_file(request.data_dir, request.data_dir_origin, "medqa/test.jsonl")
    return SourceData(
        name=request.name,
        kind=MULTIPLE_CHOICE,
        train=datasets.Dataset.from_dict(_read_lettered_jsonl(path, extra=())),
        test=None,
        label_names=list("ABCDE"),
    )


def _read_lettered_jsonl(path: Path, *, extra: tuple[str, ...]) -> dict[str, list]:
    """Rows of ``{"question", "options": "A. ...\\nB. ...", "answer": "C. ..."}`` as multiple-choice columns."""
    columns: dict[str, list] = {"question": [], "context": [], "options": [], "label": [], **{k: [] for k in extra}}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON: {exc}") from exc
            options = parse_lettered_options(str(item["options"]))
            letter = str(item["answer"]).strip()[:1]
            index = ord(letter) - ord("A") if letter else -1
            if not 0 <= index < len(options):
                raise DataError(f"{path}:{line_no}: answer {item['answer']!r} is not one of the {len(options)} options")
            columns["question"].append(str(item["question"]))
            columns["context"].append("")
            columns["options"].append(options)
            columns["label"].append(index)
            for key in extra:
                columns[key].append(str(item.get(key, "")))
    return columns
