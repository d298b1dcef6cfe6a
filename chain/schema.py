"""Build frozen dataclasses from parsed YAML, checking keys, types and ranges at the edge.

Each dataclass field may carry metadata: ``choices`` (allowed values), ``min``/``max`` (inclusive
bounds), ``gt`` (exclusive lower bound), ``lt`` (exclusive upper bound) and ``path`` (a filesystem
path, or a mapping of them, resolved against the config file's folder). Every problem becomes one ``ConfigError`` line
naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from .errors import ConfigError, shown

T = TypeVar("T")


class Origin(typing.NamedTuple):
    """Where a raw mapping came from: the file to name in errors and the folder paths are relative to."""

    source: str
    base_dir: Path


def build(cls: type[T], raw: Any, where: str, origin: Origin) -> T:
    """Build dataclass ``cls`` from ``raw`` (a mapping), validating every key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(origin, where, f"expected a mapping, got {_type_name(raw)}")
    fields = {
        f.name: f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and not f.metadata.get("internal")
    }
    for key in raw:
        if key not in fields:
            _fail(origin, where, _unknown_key(str(key), list(fields)))
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            values[name] = convert(hints[name], raw[name], key, origin, field.metadata)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            _fail(origin, key, "missing required key")
    return cls(**values)


def convert(hint: Any, value: Any, key: str, origin: Origin, meta: Any = None) -> Any:
    """Convert one YAML value to the annotated type, or fail naming the key."""
    meta = meta or {}
    typ, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        _fail(origin, key, f"must not be empty (expected {_hint_name(typ)})")
    if dataclasses.is_dataclass(typ):
        return build(typ, value, key, origin)  # type: ignore[arg-type]
    result = _convert_plain(typ, value, key, origin)
    _check_range(result, key, origin, meta)
    if meta.get("path") and isinstance(result, str):
        result = resolve_path(result, origin)
    elif meta.get("path") and isinstance(result, dict):
        result = {k: resolve_path(v, origin) for k, v in result.items()}
    return result


def resolve_path(value: str, origin: Origin) -> str:
    """Resolve a path against the config file's folder; ``synthetic`` stays a keyword."""
    if value == "synthetic":
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = origin.base_dir / path
    return str(path)


def _convert_plain(typ: Any, value: Any, key: str, origin: Origin) -> Any:
    base = typing.get_origin(typ)
    if typ is bool:
        if not isinstance(value, bool):
            _fail(origin, key, f"expected true or false, got {_type_name(value)} {shown(value)}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(origin, key, f"expected an integer, got {_type_name(value)} {shown(value)}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(origin, key, f"expected a number, got {_type_name(value)} {shown(value)}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            _fail(origin, key, f"expected a string, got {_type_name(value)} {shown(value)}")
        return value
    if base is tuple:
        item = typing.get_args(typ)[0]
        if not isinstance(value, list):
            _fail(origin, key, f"expected a list, got {_type_name(value)}")
        return tuple(_convert_plain(item, v, f"{key}[{i}]", origin) for i, v in enumerate(value))
    if base is dict:
        ktyp, vtyp = typing.get_args(typ)
        if not isinstance(value, dict):
            _fail(origin, key, f"expected a mapping, got {_type_name(value)}")
        return {
            _convert_plain(ktyp, str(k), key, origin): _convert_plain(vtyp, v, f"{key}.{k}", origin)
            for k, v in value.items()
        }
    raise TypeError(f"schema: unsupported annotation {typ!r} at {key}")


def _check_range(value: Any, key: str, origin: Origin, meta: Any) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value)[:200], [str(c) for c in choices], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        _fail(origin, key, f"{shown(value)} is not one of {', '.join(map(str, choices))}{extra}")
    if "min" in meta and value < meta["min"]:
        _fail(origin, key, f"{shown(value)} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        _fail(origin, key, f"{shown(value)} is above the maximum {meta['max']}")
    if "gt" in meta and not value > meta["gt"]:
        _fail(origin, key, f"{shown(value)} must be greater than {meta['gt']}")
    if "lt" in meta and not value < meta["lt"]:
        _fail(origin, key, f"{shown(value)} must be less than {meta['lt']}")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key[:200], allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(allowed)})"
    return f"unknown key {shown(key)}{hint}"


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _hint_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ))


MAX_MESSAGE_CHARS = 1000  # an error line quotes user content (keys, values): it stays one readable line


def _fail(origin: Origin, key: str, message: str) -> typing.NoReturn:
    location = f"{origin.source}: {key}: " if key else f"{origin.source}: "
    text = location + message
    raise ConfigError(text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "...")
