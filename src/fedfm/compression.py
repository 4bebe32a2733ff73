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

Encoded parts travel under derived names: ``name`` (casts),
``name::q`` and ``name::scale`` (int8), ``name::idx`` and ``name::val`` (top-k).
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("none", "float16", "bfloat16", "int8", "topk")

#: Methods that send the difference to the round's start (the reader must know that start).
DELTA_METHODS = ("int8", "topk")

SEP = "::"


class CompressionError(ValueError):
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
    encoded: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        delta = value.astype(np.float32) - start[name].astype(np.float32)
        if method == "int8":
            peak = float(np.max(np.abs(delta))) if delta.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            encoded[name + SEP + "q"] = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
            encoded[name + SEP + "scale"] = np.array([scale], dtype=np.float32)
            continue
        if residual is not None and name in residual:
            delta = delta + residual[name]
        flat = delta.ravel()
        k = topk_count(flat.size, fraction)
        index = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k < flat.size else np.arange(flat.size)
        index = np.sort(index).astype(np.int32)
        encoded[name + SEP + "idx"] = index
        encoded[name + SEP + "val"] = flat[index].astype(np.float32)
        left = flat.copy()
        left[index] = 0.0
        kept[name] = left.reshape(delta.shape)
    return encoded, kept


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
    parts = {"float16": ("",), "bfloat16": ("",), "int8": ("q", "scale"), "topk": ("idx", "val")}[method]
    expected = {name + (SEP + part if part else "") for name in start for part in parts}
    if set(encoded) != expected:
        missing, extra = sorted(expected - set(encoded)), sorted(set(encoded) - expected)
        raise CompressionError(f"{method} update: missing parts {missing}, unexpected parts {extra}")
    decoded: dict[str, np.ndarray] = {}
    for name, reference in start.items():
        shape = reference.shape
        if method in ("float16", "bfloat16"):
            value = encoded[name]
            want = np.float16 if method == "float16" else np.uint16
            if value.dtype != want or value.shape != shape:
                raise CompressionError(f"{name}: expected {np.dtype(want).name} {shape}, got {value.dtype} {value.shape}")
            decoded[name] = value.astype(np.float32) if method == "float16" else _from_bfloat16(value)
            continue
        base = reference.astype(np.float32)
        if method == "int8":
            q, scale = encoded[name + SEP + "q"], encoded[name + SEP + "scale"]
            if q.dtype != np.int8 or q.shape != shape or scale.shape != (1,) or not np.isfinite(scale).all():
                raise CompressionError(f"{name}: expected int8 {shape} and one finite scale, got {q.dtype} {q.shape} "
                                       f"and scale {scale.ravel()[:2]}")
            decoded[name] = base + q.astype(np.float32) * np.float32(scale[0])
            continue
        index, values = encoded[name + SEP + "idx"], encoded[name + SEP + "val"]
        size = int(np.prod(shape))
        if (index.ndim != 1 or values.shape != index.shape or not np.issubdtype(index.dtype, np.integer)
                or (index.size and (index.min() < 0 or index.max() >= size)) or len(np.unique(index)) != index.size):
            raise CompressionError(f"{name}: top-k indices must be distinct in [0, {size}) with one value each")
        flat = base.ravel().copy()
        flat[index] += values.astype(np.float32)
        decoded[name] = flat.reshape(shape)
    return decoded


def encoded_bytes(encoded: dict[str, np.ndarray]) -> int:
    """Bytes of the encoded tensors' data (the wire adds a little per tensor)."""
    return int(sum(v.nbytes for v in encoded.values()))
