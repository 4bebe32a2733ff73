"""Compressed adapter updates: what a hospital sends instead of float32 tensors, and how it is read back.

Pure numpy: the hospital encodes, the server decodes before any validation or
aggregation, and every strategy sees ordinary float32 arrays.

Methods (``[compression] method``):

``none``
    The tensors as they are.
``float16``, ``bfloat16``
    Each tensor cast to 16 bits (bfloat16 keeps float32's range, float16 more
    mantissa); read back as float32.
``int8``
    The *update* (trained minus the round's start) of each tensor, quantized
    to 8 bits with one float32 scale per tensor (``max|Δ| / 127``, rounding
    to nearest). The reader adds it back to the start it sent.
``topk``
    The ``fraction`` largest-magnitude entries of each tensor's update, as
    int32 flat indices and float32 values. What is not sent stays with the
    hospital (*error feedback*, Stich et al., NeurIPS 2018,
    <https://arxiv.org/abs/1809.07599>) and joins its next update, so nothing
    is lost for good, only delayed.

Casts keep each tensor's name. The update methods pack every tensor, in name
order, into two arrays (``::int8`` and ``::scales``; ``::topk-indices`` into
the concatenated update and ``::topk-values``): for small tensors the wire's
per-array overhead would otherwise eat the savings. Scales and top-k are
still chosen per tensor.
"""

from __future__ import annotations

import math

import numpy as np

from fedfm.config import COMPRESSION_METHODS as METHODS
from fedfm.errors import FedfmError

#: Methods that send the difference to the round's start (the reader must know that start).
DELTA_METHODS = ("int8", "topk")

#: Names of the packed parts (every tensor's update, concatenated in name order).
INT8, SCALES = "::int8", "::scales"
INDICES, VALUES = "::topk-indices", "::topk-values"


class CompressionError(FedfmError, ValueError):
    """An encoded update that cannot be read back (missing parts, wrong sizes, bad values)."""


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 → the upper 16 bits of each value, rounded to nearest even (as uint16)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def _from_bfloat16(half: np.ndarray) -> np.ndarray:
    return (half.astype(np.uint32) << 16).view(np.float32)


def topk_count(size: int, fraction: float) -> int:
    """Entries top-k keeps of a tensor of ``size`` entries (at least one)."""
    return max(1, min(size, math.ceil(fraction * size)))


def _flat_deltas(arrays: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Each tensor's update, flattened, in name order (the order both sides pack in)."""
    return [(name, (arrays[name].astype(np.float32) - start[name].astype(np.float32)).ravel()) for name in sorted(start)]


def encode(
    arrays: dict[str, np.ndarray],
    start: dict[str, np.ndarray] | None,
    method: str,
    *,
    fraction: float = 0.1,
    residual: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What a hospital sends for its trained ``arrays``, and the residual it keeps.

    Parameters
    ----------
    arrays : dict of str to ndarray
        The trained tensors the plan shares.
    start : dict of str to ndarray, optional
        The same tensors at the start of the round (needed by ``int8`` and ``topk``).
    method : str
        One of :data:`METHODS`.
    fraction : float
        ``topk``: share of each tensor's entries sent, in (0, 1].
    residual : dict of str to ndarray, optional
        ``topk``: what earlier rounds did not send; added to this round's update.

    Returns
    -------
    tuple
        The encoded arrays, and the residual to keep for the next round
        (empty unless ``topk``).
    """
    if method not in METHODS:
        raise CompressionError(f"compression method must be one of {list(METHODS)}, got {method!r}")
    if method == "none":
        return dict(arrays), {}
    if method == "float16":
        return {name: v.astype(np.float16) for name, v in arrays.items()}, {}
    if method == "bfloat16":
        return {name: _to_bfloat16(v) for name, v in arrays.items()}, {}
    if start is None:
        raise CompressionError(f"compression {method!r} sends updates and needs the round's start")
    if set(arrays) != set(start):
        raise CompressionError(f"trained tensors {sorted(arrays)} differ from the round's start {sorted(start)}")
    deltas = _flat_deltas(arrays, start)
    if method == "int8":
        peaks = np.array([float(np.max(np.abs(d))) if d.size else 0.0 for _, d in deltas], dtype=np.float32)
        scales = np.where(peaks > 0, peaks / 127.0, 1.0).astype(np.float32)
        packed = [np.clip(np.rint(d / s), -127, 127).astype(np.int8) for (_, d), s in zip(deltas, scales, strict=True)]
        return {INT8: np.concatenate(packed) if packed else np.zeros(0, np.int8), SCALES: scales}, {}
    indices: list[np.ndarray] = []
    values: list[np.ndarray] = []
    kept: dict[str, np.ndarray] = {}
    offset = 0
    for name, delta in deltas:
        if residual is not None and name in residual:
            delta = delta + residual[name].ravel()
        k = topk_count(delta.size, fraction)
        chosen = np.arange(delta.size) if k >= delta.size else np.argpartition(np.abs(delta), delta.size - k)[delta.size - k :]
        chosen = np.sort(chosen)
        indices.append(chosen + offset)
        values.append(delta[chosen])
        left = delta.copy()
        left[chosen] = 0.0
        kept[name] = left.reshape(start[name].shape)
        offset += delta.size
    return {INDICES: np.concatenate(indices).astype(np.int64 if offset >= 2**31 else np.int32),
            VALUES: np.concatenate(values).astype(np.float32)}, kept


def decode(
    encoded: dict[str, np.ndarray], start: dict[str, np.ndarray], method: str
) -> dict[str, np.ndarray]:
    """The float32 tensors a hospital meant, from what it sent.

    ``start`` gives the names, shapes and (for update methods) the values the
    hospital started the round from: what the server sent it.

    Raises
    ------
    CompressionError
        A part is missing or extra, has the wrong size or dtype, or holds an
        index out of range or a non-finite scale.
    """
    if method not in METHODS:
        raise CompressionError(f"compression method must be one of {list(METHODS)}, got {method!r}")
    if method == "none":
        return dict(encoded)
    expected = {"float16": set(start), "bfloat16": set(start), "int8": {INT8, SCALES}, "topk": {INDICES, VALUES}}[method]
    if set(encoded) != expected:
        missing, extra = sorted(expected - set(encoded)), sorted(set(encoded) - expected)
        raise CompressionError(f"{method} update: missing parts {missing}, unexpected parts {extra}")
    if method in ("float16", "bfloat16"):
        decoded: dict[str, np.ndarray] = {}
        want = np.float16 if method == "float16" else np.uint16
        for name, reference in start.items():
            value = encoded[name]
            if value.dtype != want or value.shape != reference.shape:
                raise CompressionError(
                    f"{name}: expected {np.dtype(want).name} {reference.shape}, got {value.dtype} {value.shape}"
                )
            decoded[name] = value.astype(np.float32) if method == "float16" else _from_bfloat16(value)
        return decoded
    names = sorted(start)
    sizes = [start[name].size for name in names]
    total = int(sum(sizes))
    flat = np.concatenate([start[name].astype(np.float32).ravel() for name in names]) if names else np.zeros(0, np.float32)
    if method == "int8":
        q, scales = encoded[INT8], encoded[SCALES]
        if q.dtype != np.int8 or q.shape != (total,) or scales.shape != (len(names),) or not np.isfinite(scales).all():
            raise CompressionError(
                f"int8 update: expected {total} int8 values and {len(names)} finite scales, got {q.dtype} {q.shape} "
                f"and scales {scales.dtype} {scales.shape}"
            )
        flat = flat + q.astype(np.float32) * np.repeat(scales.astype(np.float32), sizes)
    else:
        index, values = encoded[INDICES], encoded[VALUES]
        if (index.ndim != 1 or values.shape != index.shape or not np.issubdtype(index.dtype, np.integer)
                or (index.size and (index.min() < 0 or index.max() >= total)) or len(np.unique(index)) != index.size):
            raise CompressionError(f"top-k indices must be distinct in [0, {total}) with one value each")
        flat[index] += values.astype(np.float32)
    decoded = {}
    offset = 0
    for name, size in zip(names, sizes, strict=True):
        decoded[name] = flat[offset : offset + size].reshape(start[name].shape)
        offset += size
    return decoded


def encoded_bytes(encoded: dict[str, np.ndarray]) -> int:
    """Bytes of the encoded tensors' data (the wire adds a little per tensor)."""
    return int(sum(v.nbytes for v in encoded.values()))
