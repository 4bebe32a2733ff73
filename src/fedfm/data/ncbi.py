"""NCBI-disease: disease mentions in PubMed abstracts, tagged word by word (BIO).

Dogan, Leaman & Lu, "NCBI disease corpus: a resource for disease name
recognition and concept normalization", J. Biomed. Inform. 2014
(https://doi.org/10.1016/j.jbi.2013.12.006); the IOB files of Crichton et al.,
BMC Bioinformatics 2017 (github.com/cambridgeltl/MTL-Bioinformatics-2016).
"""

from __future__ import annotations

from fedfm.data.base import TOKEN_CLASSIFICATION, SourceData, SourceRequest
from fedfm.data.conll import OUTSIDE, parse_conll, sentences_to_dataset, tag_names
from fedfm.data.paths import data_file

__all__ = ["OUTSIDE", "SPLITS", "load_ncbi_disease", "parse_conll", "sentences_to_dataset", "tag_names"]

SPLITS = ("train", "devel", "test")


def load_ncbi_disease(request: SourceRequest) -> SourceData:
    """Load NCBI-disease: ``train.tsv`` as train, ``test.tsv`` as the official test.

    ``devel.tsv`` is read for its tags only (so the vocabulary is the corpus's)
    and otherwise left out: a hospital's validation rows come from its own
    training rows (``data.validation-fraction``), and the published anchors
    train on the train split.
    The files carry no abstract ids, so hospitals are built from sentences.

    Parameters
    ----------
    request : SourceRequest
        Only ``data_dir`` is used.

    Returns
    -------
    SourceData
        5,424 train and 940 test sentences, tags ``O``, ``B-Disease``, ``I-Disease``.
    """
    parsed = {
        split: parse_conll(data_file(request.data_dir, request.data_dir_origin, f"ncbi_disease/{split}.tsv"))
        for split in SPLITS
    }
    # parse_conll refuses a tag that is not BIO, naming its line.
    names = tag_names([{t for _, tags in sentences for t in tags} for sentences in parsed.values()])
    return SourceData(
        name=request.name,
        kind=TOKEN_CLASSIFICATION,
        train=sentences_to_dataset(parsed["train"], names),
        test=sentences_to_dataset(parsed["test"], names),
        label_names=names,
        natural_column=None,
    )
