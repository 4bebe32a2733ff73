"""Reading and writing run configurations: TOML files, ``--set`` overrides, flat keys, JSON.

In TOML and on the command line keys are kebab-case and grouped by section
(``[train]`` / ``train.learning-rate``); in Python they are the snake_case
dataclass fields (``config.train.learning_rate``); Flower's run config and the
JSON an instruction carries use the flat form ``{"train.learning-rate": 5e-4}``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomllib

from fedfm.config.codec import build, flatten, render_toml, toml_value
from fedfm.config.schema import SECTIONS, RunConfig
from fedfm.config.validation import kebab
from fedfm.errors import ConfigError


def from_flat(flat: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from ``{"section.key": value}``; every problem reported at once."""
    return build(RunConfig, flat)


def to_flat(config: RunConfig) -> dict[str, Any]:
    """Flatten to ``{"section.kebab-key": value}`` with scalar values (Flower's run config type)."""
    return flatten(config)


def to_json(config: RunConfig) -> str:
    """Serialize for a Flower ConfigRecord or a file."""
    return json.dumps(to_flat(config), sort_keys=True)


def from_json(text: str) -> RunConfig:
    """Inverse of :func:`to_json`."""
    return from_flat(json.loads(text))


def to_toml(config: RunConfig) -> str:
    """Render the resolved configuration as TOML (readable by :func:`load_config`)."""
    return render_toml(config)


def describe() -> str:
    """A reference of every section and key with its default and help text (for docs and `--help`)."""
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]  {cls.__doc__.splitlines()[0] if cls.__doc__ else ''}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            lines.append(f"  {kebab(f.name)} = {toml_value(default)}    # {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``section.key=value`` override; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(f"override `{text}` must look like section.key=value, e.g. train.learning-rate=1e-4")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return kebab(key), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML file (or the defaults) and apply ``section.key=value`` overrides.

    Parameters
    ----------
    path : str or Path, optional
        A TOML file with ``[model]``, ``[lora]``, ``[data]``, ``[train]``,
        ``[federation]`` and ``[output]`` tables. None starts from the defaults.
    overrides : list of str, optional
        ``section.key=value`` strings applied on top, as ``fedfm run --set`` does.

    Returns
    -------
    RunConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        Listing every invalid or unknown field with its value and the allowed values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file `{p}` does not exist")
        data_bytes = _read_bytes(p)
        try:
            text = data_bytes.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
        except UnicodeDecodeError as err:
            line = data_bytes[:err.start].count(b"\n") + 1
            raise ConfigError(
                f"config file `{p}` is not UTF-8 text (line {line}: byte {data_bytes[err.start]:#04x}); TOML files "
                f"are UTF-8: save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            ) from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file `{p}` is not valid TOML: {err}") from err
    flat: dict[str, Any] = {}
    problems: list[str] = []
    for section, table in data.items():
        if not isinstance(table, dict):
            problems.append(f"`{section}` must be a table, got {table!r}")
            continue
        for key, value in table.items():
            flat[f"{section}.{kebab(key)}"] = value
    for text in overrides or []:
        key, value = parse_override(text)
        flat[key] = value
    if problems:
        raise ConfigError(problems)
    return from_flat(flat)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file `{path}` cannot be read: {err.strerror or err}") from err
