"""Mean pooling for sentence-transformers encoders: what the head reads, and how it is exported."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from fedfm.adapters import EXPORT_SETTINGS, clear_cache, export_adapter, get_adapter_state, load_model
from fedfm.config import LoraSpec, ModelSpec
from fedfm.errors import ModelError
from fedfm.tasks import get_task
from fedfm.tasks.pooling import LayerMeanPooler, MeanPooler, apply_pooling, model_pooling


def _classifier(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()


def test_mean_pooling_is_the_masked_mean_of_the_last_layer(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = apply_pooling(_classifier(tiny_bert), "mean")
    assert isinstance(model.bert.pooler, MeanPooler)
    batch = tokenizer(["chest pain", "shortness of breath on exertion"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
        logits = model(**batch).logits
    keep = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(model.classifier(expected), logits)
    # Padding the short text does not change its score.
    alone = tokenizer(["chest pain"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**alone).logits[0], logits[0], rtol=1e-4, atol=1e-5)


def test_cls_leaves_the_model_as_it_is_and_mean_differs(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(["fever and cough"], return_tensors="pt")
    plain = _classifier(tiny_bert)
    kept = apply_pooling(_classifier(tiny_bert), "cls")
    pooled = apply_pooling(_classifier(tiny_bert), "mean")
    with torch.no_grad():
        torch.testing.assert_close(kept(**batch).logits, plain(**batch).logits)
        assert not torch.allclose(pooled(**batch).logits, plain(**batch).logits)


def test_a_deep_copy_pools_with_its_own_mask(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = apply_pooling(_classifier(tiny_bert), "mean")
    twin = copy.deepcopy(model)
    short = tokenizer(["pain"], return_tensors="pt")
    padded = tokenizer(["pain", "a much longer note about the same patient"], return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**padded)  # leaves the original pooler holding the long batch's mask
        torch.testing.assert_close(twin(**short).logits, model(**short).logits)


def test_auto_reads_the_sentence_transformers_pooling_file(tiny_bert: Path, tmp_path: Path) -> None:
    assert model_pooling(tiny_bert) == "cls"
    folder = tmp_path / "st-model"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert model_pooling(folder) == "mean"
    clear_cache()
    loaded = load_model(ModelSpec(name=str(folder)), LoraSpec(r=2), get_task("sequence-classification"), num_labels=2)
    assert loaded.model_settings == {"pooling": "mean"}
    assert isinstance(loaded.model.base_model.model.bert.pooler, MeanPooler)
    clear_cache()


def test_exported_adapter_names_its_pooling_and_reloads_with_it(tiny_bert: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    clear_cache()
    spec = ModelSpec(name=str(tiny_bert), pooling="mean")
    loaded = load_model(spec, LoraSpec(r=2), get_task("sequence-classification"), num_labels=3)
    state = {k: v + 0.1 for k, v in get_adapter_state(loaded.model).items()}
    export_adapter(loaded, state, tmp_path / "adapter")
    settings = json.loads((tmp_path / "adapter" / EXPORT_SETTINGS).read_text())
    assert settings == {"pooling": "mean"}
    batch = loaded.tokenizer(["no symptoms", "shortness of breath"], return_tensors="pt", padding=True)
    expected = loaded.model.eval()(**batch).logits.detach()
    base = apply_pooling(_classifier(tiny_bert), settings["pooling"])
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    clear_cache()


def test_mean_pooling_without_a_pooler_layer_is_a_clear_error() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = BertForSequenceClassification(config)
    model.bert.pooler = None
    with pytest.raises(ModelError, match="needs an encoder with a `pooler`"):
        apply_pooling(model, "mean")


# --------------------------------------------------------------------------- layer-mean


def test_layer_mean_averages_the_masked_mean_of_every_layer(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    plain = _classifier(tiny_bert)
    model = apply_pooling(_classifier(tiny_bert), "layer-mean")
    assert isinstance(model.bert.pooler, LayerMeanPooler)
    batch = tokenizer(["chest pain", "shortness of breath on exertion"], return_tensors="pt", padding=True)
    keep = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        states = plain.bert(**batch, output_hidden_states=True).hidden_states
        expected = torch.stack([(h * keep).sum(1) / keep.sum(1) for h in states]).mean(0)
        assert len(states) == plain.config.num_hidden_layers + 1
        torch.testing.assert_close(model(**batch).logits, model.classifier(expected))
        # Each batch starts afresh (no states left over from the last), and padding changes nothing.
        alone = tokenizer(["chest pain"], return_tensors="pt")
        torch.testing.assert_close(model(**alone).logits[0], model(**batch).logits[0], rtol=1e-4, atol=1e-5)
        # A deep copy feeds its own pooler.
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(**alone).logits, model(**alone).logits)
        assert not model.bert.pooler.states or twin.bert.pooler.states is not model.bert.pooler.states


def test_layer_mean_exports_a_card_snippet_and_a_merged_model_that_rebuild_it(tiny_bert: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedfm.export.card import loading_snippet
    from fedfm.export.merged import describe_merged_config
    from fedfm.export.settings import ExportSettings

    clear_cache()
    loaded = load_model(ModelSpec(name=str(tiny_bert), pooling="layer-mean"), LoraSpec(r=2),
                        get_task("sequence-classification"), num_labels=3)
    state = {k: v + 0.1 for k, v in get_adapter_state(loaded.model).items()}
    export_adapter(loaded, state, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / EXPORT_SETTINGS).read_text()) == {"pooling": "layer-mean"}
    batch = loaded.tokenizer(["no symptoms", "shortness of breath"], return_tensors="pt", padding=True)
    expected = loaded.model.eval()(**batch).logits.detach()

    settings = ExportSettings(task="sequence-classification", base_model=str(tiny_bert), label_names=["a", "b", "c"],
                              input_format="text", pooling="layer-mean")
    code = loading_snippet(settings, folder=str(tmp_path / "adapter"), merged=False)
    namespace: dict = {}
    exec(code.split("tokenizer = ")[0], namespace)  # noqa: S102 -- the card's imports and pooling helpers
    base = _classifier(tiny_bert)
    namespace["use_mean_pooling"](base)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)

    merged = copy.deepcopy(reloaded).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    describe_merged_config(tmp_path / "merged", settings)
    rebuilt = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    clear_cache()


def test_layer_mean_needs_bert_layers() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = BertForSequenceClassification(config)
    model.bert.encoder.layer = torch.nn.Sequential(*model.bert.encoder.layer)
    with pytest.raises(ModelError, match="'layer-mean' needs BERT's `embeddings` and `encoder.layer`"):
        apply_pooling(model, "layer-mean")
