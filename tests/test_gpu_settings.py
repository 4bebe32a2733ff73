"""Settings for bases that outgrow a laptop: quantization, gradient checkpointing, bf16 autocast, GPUs for Ray.

What needs a GPU (loading a 4- or 8-bit base) cannot run here; what runs here is
real: the refusals a CPU machine gives before any model loads (through the
``fedfm`` command), the BitsAndBytesConfig fedfm builds, gradient checkpointing
on the tiny BERT and Llama, and the Ray options a run hands Flower.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfm import adapters, engine
from fedfm.adapters import load_model, quantization_config
from fedfm.cli import main
from fedfm.config import LoraSpec, ModelSpec
from fedfm.errors import ModelError
from fedfm.tasks import get_task
from fedfm.train import autocast

#: The refusals are those of a machine without CUDA.
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="refusals of a machine without CUDA")


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; assert exit status 2 and one closing ``fedfm: error:`` line without traceback; return it."""
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    assert sum(line.startswith("fedfm: error:") for line in err.splitlines()) == 1
    return err.rstrip("\n").splitlines()[-1]


def _sets(settings: dict[str, Any]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture()
def unloadable(tmp_path: Path, tiny_csv_settings: dict[str, Any]) -> dict[str, Any]:
    """The tiny CSV run, but with a model folder that would fail to load: an error about it means a model load was tried."""
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    return {**tiny_csv_settings, "model.name": str(folder), "federation.num-rounds": 1}


@without_cuda
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_without_cuda_is_refused_before_any_model_loads(
    command: str, quantization: str, unloadable: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    extra = ["--out", str(out)] if command == "run" else []
    line = _fails([command, *_sets({**unloadable, "model.quantization": quantization}), *extra], capsys)
    assert f"`model.quantization` '{quantization}' needs a CUDA GPU and bitsandbytes" in line
    assert "torch sees no CUDA GPU" in line and 'set model.quantization = "none" on a CPU' in line
    assert "cannot load model" not in line and not out.exists()


def test_quantization_on_a_cpu_device_is_a_configuration_error(
    tiny_csv_settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(["check", *_sets({**tiny_csv_settings, "model.quantization": "4bit", "model.device": "cpu"})], capsys)
    assert "`model.quantization` '4bit' needs a CUDA GPU and bitsandbytes, but `model.device` is 'cpu'" in line


@without_cuda
def test_gpu_shares_without_a_gpu_are_refused_before_the_run_starts(
    unloadable: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = _fails(["run", *_sets({**unloadable, "federation.gpus-per-hospital": 0.125}), "--out", str(out)], capsys)
    assert "`federation.gpus-per-hospital` (0.125) reserves GPUs" in line and "torch sees no CUDA GPU" in line
    assert not out.exists()


@pytest.mark.parametrize("settings, expected", [
    ({"federation.ray-address": "127.0.0.1:6379", "federation.backend": "in-process"},
     "`federation.ray-address` '127.0.0.1:6379' runs the hospitals on a Ray cluster"),
    ({"federation.gpus-per-hospital": 0.5, "federation.backend": "in-process"},
     "`federation.gpus-per-hospital` (0.5) is a Ray worker's GPU share"),
    ({"model.gradient-checkpointing": True, "privacy.mode": "dp-sgd"},
     "`model.gradient-checkpointing` must be false with `privacy.mode` 'dp-sgd'"),
    ({"federation.gpus-per-hospital": -1}, "`federation.gpus-per-hospital` must be >= 0, got -1"),
])
def test_settings_that_cannot_work_together_are_named(
    settings: dict[str, Any], expected: str, tiny_csv_settings: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in _fails(["check", *_sets({**tiny_csv_settings, **settings})], capsys)


@without_cuda
def test_a_hospital_without_cuda_refuses_a_quantized_base_with_a_model_error(tiny_bert: Path) -> None:
    # A SuperNode's machine is not the server's: load_model asks again before loading anything
    cached = len(adapters._CACHE)
    with pytest.raises(ModelError, match="needs a CUDA GPU and bitsandbytes, but torch sees no CUDA GPU"):
        load_model(ModelSpec(name=str(tiny_bert), quantization="4bit"), LoraSpec(r=4),
                   get_task("sequence-classification"), num_labels=2)
    assert len(adapters._CACHE) == cached


def test_4bit_is_qlora_nf4_with_double_quantization_and_bf16_compute() -> None:
    four = quantization_config("4bit")
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = quantization_config("8bit")
    assert eight.load_in_8bit and not eight.load_in_4bit
    # Task heads train in full and the output layer stays precise: never quantized
    for config in (four, eight):
        assert {"classifier", "score", "lm_head"} <= set(config.llm_int8_skip_modules)


def _lora_gradients(loaded: Any, batch: dict[str, torch.Tensor], layer: str) -> tuple[dict[str, torch.Tensor], int]:
    """LoRA (and head) gradients of one training step's loss, and how often ``layer``'s forward ran.

    ``layer`` is early inside a checkpointed block: transformers checkpoints a block's ``forward`` (a
    hook on the block itself fires once either way), and torch stops recomputing a block once it has
    what the backward pass needs (a hook on its last layer may not fire again).
    """
    model = loaded.model
    model.train()
    model.zero_grad()
    calls = []
    hook = model.get_submodule(layer).register_forward_hook(lambda *_: calls.append(1))
    try:
        torch.manual_seed(3)  # LoRA dropout draws the same masks in both models
        model(**batch).loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads, len(calls)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(kind: str, tiny_bert: Path, tiny_llama_dir: Path) -> None:
    # Prepare: the same tiny model with and without checkpointing (two cache entries), the same adapter
    if kind == "bert":
        name, task, layer = str(tiny_bert), get_task("sequence-classification"), "base_model.model.bert.encoder.layer.0.attention.self.query"
        batch = {"labels": torch.tensor([0, 1, 1, 0])}
    else:
        name, task, layer = str(tiny_llama_dir), get_task("instruction-tuning"), "base_model.model.model.layers.0.self_attn.q_proj"
        batch = {}
    plain = load_model(ModelSpec(name=name), LoraSpec(r=4), task, num_labels=2, side="gc-test")
    checkpointed = load_model(ModelSpec(name=name, gradient_checkpointing=True), LoraSpec(r=4), task, num_labels=2,
                              side="gc-test")
    assert checkpointed is not plain
    # A trained-looking adapter (B != 0), so every LoRA factor gets a gradient
    state = {k: torch.randn_like(v) * 0.1 for k, v in plain.initial_state.items()}
    adapters.set_adapter_state(plain.model, state)
    adapters.set_adapter_state(checkpointed.model, state)
    ids = torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **batch}
    if kind == "llama":
        batch["labels"] = ids.clone()

    # Execute
    expected, plain_calls = _lora_gradients(plain, batch, layer)
    got, checkpointed_calls = _lora_gradients(checkpointed, batch, layer)

    # Assert: the block ran again in the backward pass, and every LoRA gradient is the same
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert set(got) == set(expected) and any("lora_A" in n for n in got)
    for n in expected:
        assert expected[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_auto_dtype_is_float32_on_a_cpu() -> None:
    # `model.dtype = "auto"` (the default) leaves a CPU run exactly as `float32` did: no autocast at all
    assert isinstance(autocast(torch.device("cpu"), "auto"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), "float32"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), "bfloat16"), torch.autocast)


def test_ray_settings_pick_ray_and_joining_a_cluster_passes_only_its_address() -> None:
    assert engine.resolve("auto", workers=1) == "in-process"
    assert engine.resolve("auto", workers=1, ray_settings=True) == "ray"
    local = engine.ray_options(workers=2, threads=1, gpus_per_hospital=0, address="", gpus=0, quiet=True)
    assert local["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert local["init_args"]["num_cpus"] == 2 and local["init_args"]["num_gpus"] == 0
    # Today's behaviour on a GPU machine: the workers split one GPU; a share packs eight hospitals on one
    assert engine.ray_options(workers=4, threads=1, gpus_per_hospital=0, address="", gpus=2,
                              quiet=False)["client_resources"]["num_gpus"] == 0.25
    shared = engine.ray_options(workers=8, threads=1, gpus_per_hospital=0.125, address="", gpus=1, quiet=False)
    assert shared["client_resources"]["num_gpus"] == 0.125 and shared["init_args"]["num_gpus"] == 1
    # ray.init refuses num_cpus / num_gpus with an address: the cluster's `ray start` set them
    joined = engine.ray_options(workers=2, threads=1, gpus_per_hospital=0, address="10.0.0.5:6379", gpus=0, quiet=True)
    assert set(joined["init_args"]) == {"address", "logging_level", "log_to_driver"}
    assert joined["init_args"]["address"] == "10.0.0.5:6379"


def test_a_merged_export_of_a_quantized_base_folds_into_the_unquantized_one(tiny_bert: Path, tmp_path: Path) -> None:
    # Prepare: a quantized base cannot load here, so its stand-in is the tiny BERT with every frozen weight
    # rounded to a coarse grid (what quantization does to them), marked 4-bit, whose `unquantized` builds the
    # float32 base on the CPU as adapters._build sets it up for a quantized model
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    task, lora = get_task("sequence-classification"), LoraSpec(r=4)
    coarse = load_model(ModelSpec(name=str(tiny_bert)), lora, task, num_labels=3, side="coarse-stand-in")
    with torch.no_grad():
        for p in coarse.model.parameters():
            if not p.requires_grad:
                p.copy_((p * 4).round() / 4)
    stand_in = dataclasses.replace(coarse, quantization="4bit", unquantized=lambda: adapters._build(
        ModelSpec(name=str(tiny_bert), device="cpu"), lora, task, num_labels=3, seed=0))
    state = {k: v + 0.1 for k, v in coarse.initial_state.items()}

    # Execute
    adapters.export_adapter(stand_in, state, tmp_path / "adapter", merged_dir=tmp_path / "merged")

    # Assert: a plain peft adapter of the unquantized base, float32, and the merged model is that base + the update
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
    batch = coarse.tokenizer(["shortness of breath", "calm"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    expected = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**batch).logits.detach()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**batch).logits.detach(), expected, atol=1e-4, rtol=1e-4)
    coarse.model.eval()
    assert not torch.allclose(coarse.model(**batch).logits.detach(), expected, atol=1e-3)
