"""Field values to and from flat ``{"section.kebab-key": value}`` form and TOML text.

Generic over a configuration class whose fields are section dataclasses (as
:class:`~fedfm.config.schema.RunConfig`), so that the schema can use it without
this module importing the schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from functools import cache
from typing import Any, Literal, TypeVar, get_origin, get_type_hints

from fedfm.config.validation import kebab, shown, validate
from fedfm.errors import ConfigError

C = TypeVar("C")


@cache
def section_types(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls`` (a configuration or one of its sections)."""
    return get_type_hints(cls)


def coerce(value: Any, typ: Any, key: str, problems: list[str]) -> Any:
    """Coerce a TOML/JSON value to a field's type, or record why it cannot be."""
    text = str(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"`{key}` must be true or false, got {value!r}")
        return None
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            problems.append(f"`{key}` must be an integer, got {shown(value)}")
            return None
        if isinstance(value, int):
            return value  # as it is: a round trip through float would round a large one
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass  # "1e3" is read below
        try:
            return _integral(float(value))
        except ValueError:
            problems.append(f"`{key}` must be an integer, got {shown(value)}")
            return None
    if typ is float:
        if isinstance(value, bool):
            problems.append(f"`{key}` must be a number, got {value!r}")
            return None
        try:
            return float(value)
        except OverflowError:
            problems.append(f"`{key}` must be a finite number, got {shown(value)}")
            return None
        except (TypeError, ValueError):
            problems.append(f"`{key}` must be a number, got {shown(value)}")
            return None
    if typ is str or get_origin(typ) is Literal:  # a choice is read as a string; validate checks the choices
        if isinstance(value, (dict, list, tuple)):
            problems.append(f"`{key}` must be a string, got {value!r}")
            return None
        return str(value)
    if text.startswith("tuple[int"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        items: list[int] = []
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).lstrip("-").isdigit():
                problems.append(f"`{key}` must be a list of integers, got {value!r}")
                return None
            items.append(int(v))
        return tuple(items)
    if text.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            problems.append(f"`{key}` must be a list of strings, got {value!r}")
            return None
        return tuple(value)
    raise TypeError(f"unsupported config field type {typ} for {key}")  # a bug in the schema


def _integral(value: float) -> int:
    """``value`` as an int when it is a finite whole number (``1e3``), else ValueError."""
    if not (math.isfinite(value) and value.is_integer()):
        raise ValueError(value)
    return int(value)


def build(cls: type[C], flat: dict[str, Any]) -> C:
    """Build configuration class ``cls`` from ``{"section.key": value}``; every problem reported at once.

    Raises
    ------
    ConfigError
        Unknown keys, values of the wrong type, and the range problems of the values that did parse.
    """
    sections = {f.name: section_types(cls)[f.name] for f in fields(cls)}  # type: ignore[arg-type]
    nested: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            problems.append(f"unknown configuration key `{key}`; sections are {sorted(sections)}")
            continue
        nested.setdefault(section, {})[name] = value
    specs: dict[str, Any] = {}
    for section, spec_cls in sections.items():
        types = section_types(spec_cls)
        allowed = {kebab(f.name): f.name for f in fields(spec_cls)}
        kwargs: dict[str, Any] = {}
        for key, value in nested.get(section, {}).items():
            known = allowed.get(kebab(key))
            if known is None:
                problems.append(f"unknown key `{section}.{key}`; allowed keys of [{section}]: {sorted(allowed)}")
                continue
            coerced = coerce(value, types[known], f"{section}.{kebab(known)}", problems)
            if coerced is not None:
                kwargs[known] = coerced
        specs[section] = spec_cls(**kwargs)
    if problems:
        # Report type problems together with range problems of what did parse.
        config = object.__new__(cls)
        for section, spec in specs.items():
            object.__setattr__(config, section, spec)
        raise ConfigError(problems + validate(config))  # type: ignore[arg-type]  # a RunConfig
    return cls(**specs)


def flatten(config: Any) -> dict[str, Any]:
    """Flatten to ``{"section.kebab-key": value}`` with scalar values (Flower's run config type)."""
    flat: dict[str, Any] = {}
    for section in fields(config):
        spec = getattr(config, section.name)
        for f in fields(spec):
            value = getattr(spec, f.name)
            # Flower's run config holds scalars only: lists travel comma-separated.
            flat[f"{section.name}.{kebab(f.name)}"] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return flat


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_toml(config: Any) -> str:
    """Render a configuration as TOML, one table per section."""
    lines: list[str] = []
    for section in fields(config):
        spec = getattr(config, section.name)
        lines.append(f"[{section.name}]")
        for f in fields(spec):
            lines.append(f"{kebab(f.name)} = {toml_value(getattr(spec, f.name))}")
        lines.append("")
    return "\n".join(lines)
