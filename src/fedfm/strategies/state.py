"""What a strategy carries from round to round, taken out and put back for checkpoints (pure numpy).

Flower's strategies keep their state in plain attributes (FedAdam's moments
``m_t``/``v_t``, FedAvgM's ``momentum_vector``, the adaptive-clipping wrappers'
``clipping_norm``, ``current_arrays``), and wrappers hold the strategy they wrap
in an attribute. :func:`capture` walks that tree and keeps every attribute that
holds numbers or arrays; :func:`restore` sets them again on a freshly built
strategy of the same configuration. A strategy with state of another kind
defines ``state_dict() -> dict`` and ``load_state_dict(dict)`` (values: numbers,
strings, lists, ndarrays, or dicts of these), and those are used instead.

Attributes holding configuration are captured too; restoring them to the
values the same configuration gave is harmless.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

#: Attribute names of a wrapper that hold the strategy it wraps.
_WRAPPED = ("inner", "strategy")

_NUMBER = (bool, int, float, np.integer, np.floating)


def _is_array_map(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()
    )


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON-able stand-in for ``value`` (arrays go into ``arrays`` under ``path``), or ``...`` to skip it."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, _NUMBER):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {"__array__": path}
    if isinstance(value, ArrayRecord):
        names = []
        for name, array in value.items():
            arrays[f"{path}/{name}"] = array.numpy()
            names.append(name)
        return {"__record__": path, "names": names}
    if _is_array_map(value):
        for name, array in value.items():
            arrays[f"{path}/{name}"] = array
        return {"__arrays__": path, "names": list(value)}
    if isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
        for i, array in enumerate(value):
            arrays[f"{path}/{i}"] = array
        return {"__list__": path, "length": len(value)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        encoded = {k: _encode(v, f"{path}/{k}", arrays) for k, v in value.items()}
        return {k: v for k, v in encoded.items() if v is not ...}
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (*_NUMBER, str)) for v in value):
        return list(value)
    return ...


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            return arrays[value["__array__"]]
        if "__record__" in value:
            return ArrayRecord({n: arrays[f"{value['__record__']}/{n}"] for n in value["names"]})
        if "__arrays__" in value:
            return {n: arrays[f"{value['__arrays__']}/{n}"] for n in value["names"]}
        if "__list__" in value:
            return [arrays[f"{value['__list__']}/{i}"] for i in range(value["length"])]
        return {k: _decode(v, arrays) for k, v in value.items()}
    return value


def _own_state(strategy: Any) -> dict[str, Any]:
    if hasattr(strategy, "state_dict"):
        return dict(strategy.state_dict())
    return {k: v for k, v in vars(strategy).items() if k not in _WRAPPED and not k.startswith("__")}


def capture(strategy: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The state of ``strategy`` and every strategy it wraps.

    Returns
    -------
    tuple
        A JSON-able description, and the arrays it refers to by name.
    """
    arrays: dict[str, np.ndarray] = {}
    levels = []
    node, path = strategy, "strategy"
    while node is not None:
        own = {}
        for name, value in _own_state(node).items():
            encoded = _encode(value, f"{path}/{name}", arrays)
            if encoded is not ...:
                own[name] = encoded
        levels.append({"class": type(node).__qualname__, "state": own})
        node = next((getattr(node, a) for a in _WRAPPED if hasattr(node, a)), None)
        path += "/inner"
    return {"levels": levels}, arrays


def restore(strategy: Any, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Put state from :func:`capture` back into a strategy built from the same configuration.

    Raises
    ------
    ValueError
        When the strategy's classes (wrapper by wrapper) differ from the captured ones.
    """
    node: Any = strategy
    for level in state["levels"]:
        if node is None or type(node).__qualname__ != level["class"]:
            found = type(node).__qualname__ if node is not None else "nothing"
            raise ValueError(f"the checkpoint holds the state of a {level['class']}, but this run built {found}")
        values = {k: _decode(v, arrays) for k, v in level["state"].items()}
        if hasattr(node, "load_state_dict"):
            node.load_state_dict(values)
        else:
            for name, value in values.items():
                setattr(node, name, value)
        node = next((getattr(node, a) for a in _WRAPPED if hasattr(node, a)), None)
