from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfm.adapters import (
    check_adapter_state,
    export_adapter,
    get_adapter_state,
    load_model,
    resolve_device,
    resolve_model_path,
    set_adapter_state,
)
from fedfm.config import LoraSpec, ModelSpec
from fedfm.errors import AdapterError, ModelError
from fedfm.tasks import get_task


@pytest.fixture()
def loaded(tiny_bert: Path):  # type: ignore[no-untyped-def]
    return load_model(ModelSpec(name=str(tiny_bert)), LoraSpec(r=4), get_task("sequence-classification"), num_labels=3)


def test_adapter_holds_only_lora_and_head_tensors(loaded) -> None:  # type: ignore[no-untyped-def]
    state = get_adapter_state(loaded.model)
    assert state, "adapter state is empty"
    for name in state:
        assert "lora_A" in name or "lora_B" in name or ".classifier." in name, name
    # 2 layers x (query, value) x (A, B) + classifier weight and bias
    assert len(state) == 2 * 2 * 2 + 2
    assert state["base_model.model.classifier.weight"].shape == (3, 16)
    assert loaded.adapter_parameters == sum(v.numel() for v in state.values())
    assert loaded.adapter_parameters < 0.02 * loaded.base_parameters


def test_base_is_cached_per_process(tiny_bert: Path, loaded) -> None:  # type: ignore[no-untyped-def]
    again = load_model(ModelSpec(name=str(tiny_bert)), LoraSpec(r=4), get_task("sequence-classification"), num_labels=3)
    assert again is loaded


def test_set_then_get_round_trips_and_changes_outputs(loaded) -> None:  # type: ignore[no-untyped-def]
    model = loaded.model
    state = get_adapter_state(model)
    batch = loaded.tokenizer(["chest pain at rest"], return_tensors="pt")
    before = model(**batch).logits.detach()
    changed = {k: v + 0.5 for k, v in state.items()}
    set_adapter_state(model, changed)
    after = get_adapter_state(model)
    assert all(torch.equal(after[k], changed[k]) for k in state)
    assert not torch.allclose(model(**batch).logits, before)
    set_adapter_state(model, state)
    assert torch.allclose(model(**batch).logits, before)


def test_wrong_keys_shapes_and_nan_are_refused(loaded) -> None:  # type: ignore[no-untyped-def]
    state = get_adapter_state(loaded.model)
    name = next(k for k in state if "lora_A" in k)
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(AdapterError, match="missing 1 tensor"):
        set_adapter_state(loaded.model, missing)
    with pytest.raises(AdapterError, match="unexpected 1 tensor"):
        check_adapter_state(loaded.model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(AdapterError, match="has shape"):
        check_adapter_state(loaded.model, {**state, name: torch.zeros(1, 1)})
    poisoned = dict(state)
    poisoned[name] = state[name].clone()
    poisoned[name][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        set_adapter_state(loaded.model, poisoned)


def test_exported_adapter_loads_with_plain_peft_and_merged_model_matches(loaded, tiny_bert: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    state = {k: v + 0.1 for k, v in get_adapter_state(loaded.model).items()}
    export_adapter(loaded, state, tmp_path / "adapter", merged_dir=tmp_path / "merged")
    batch = loaded.tokenizer(["shortness of breath"], return_tensors="pt")
    loaded.model.eval()
    expected = loaded.model(**batch).logits.detach()

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a known alias"):
        resolve_model_path(str(tmp_path))


def test_device_follows_the_config() -> None:
    assert resolve_device(ModelSpec(device="cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(ModelSpec(device="auto")).type == expected
    if torch.cuda.is_available():
        assert resolve_device(ModelSpec(device="cuda")).type == "cuda"
    else:
        with pytest.raises(ModelError, match="`model.device` is 'cuda'"):
            resolve_device(ModelSpec(device="cuda"))


def test_model_lives_on_its_device_and_the_exchanged_state_on_the_cpu(loaded) -> None:  # type: ignore[no-untyped-def]
    # What leaves a hospital is serialized from CPU tensors whatever device trains.
    assert {p.device.type for p in loaded.model.parameters()} == {loaded.device.type}
    assert {v.device.type for v in get_adapter_state(loaded.model).values()} == {"cpu"}


def test_a_float16_checkpoint_trains_in_float32(tiny_bert: Path, tmp_path: Path) -> None:
    # transformers 5 keeps a checkpoint's own dtype; a float16 folder trained without
    # autocast overflowed to NaN on the CPU. The frozen base is always float32.
    from transformers import AutoModel, AutoTokenizer

    half = tmp_path / "half"
    AutoModel.from_pretrained(tiny_bert, dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(half)
    loaded = load_model(ModelSpec(name=str(half)), LoraSpec(r=2), get_task("sequence-classification"), num_labels=2, seed=0)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert all(v.dtype == torch.float32 for v in loaded.initial_state.values())


def test_load_global_adapter_follows_the_plan(loaded) -> None:  # type: ignore[no-untyped-def]
    from fedfm.adapters import load_global_adapter
    from fedfm.strategies import ClientPlan

    # Prepare: a global whose every tensor moved, and this hospital's own kept B (FedSA-LoRA)
    initial = {k: v.numpy() for k, v in loaded.initial_state.items()}
    received = {k: v + 1.0 for k, v in initial.items()}
    kept = {k: v - 1.0 for k, v in initial.items() if "lora_B" in k}
    # Execute
    state, fold = load_global_adapter(loaded, ClientPlan(private=("lora_B",)), received, kept=kept)
    # Assert: shared tensors from the server, B from the hospital's own state; nothing folded
    now = get_adapter_state(loaded.model)
    assert fold == {}
    for name, value in now.items():
        expected = kept[name] if "lora_B" in name else received[name]
        torch.testing.assert_close(value, torch.from_numpy(expected))
        torch.testing.assert_close(state[name], value)
    set_adapter_state(loaded.model, loaded.initial_state)
