"""Typed, error-collecting construction of frozen config dataclasses from YAML data.

``parse_dataclass(cls, data, where)`` checks every key of ``data`` against the
fields of ``cls``: unknown keys, missing required keys, wrong types and
``__post_init__`` failures all become messages that quote the location, key and
value. It returns ``(instance_or_None, errors)`` and never raises for bad input,
so a recipe's validation can gather *all* errors into one report.

Supported field types: bool, int, float (ints accepted), str, ``Optional[X]``,
``Literal[...]``, ``Union[...]``, ``list[X]``, ``tuple[X, ...]``,
``dict[str, X]``, ``Any`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Optional, Union

_MISSING = dataclasses.MISSING


def closest(name: str, choices) -> Optional[str]:
    """The choice most like ``name``, or None when none is close."""
    found = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""


def type_name(tp: Any) -> str:
    """Readable name of a type annotation, for error messages."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        args = typing.get_args(tp)
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check/convert ``value`` to annotation ``tp``; append messages to ``errors``."""
    origin = typing.get_origin(tp)
    bad = f"{where}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})"
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            errors.append(bad)
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}"
                          + did_you_mean(value, typing.get_args(tp)))
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, option, where, trial)
            if not trial:
                return out
        errors.append(bad)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(bad)
            return value
        obj, sub = parse_dataclass(tp, value, where)
        errors.extend(sub)
        return obj
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(bad)
            return value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(bad)
            return value
        args = typing.get_args(tp)
        val_tp = args[1] if args else Any
        return {k: _convert(v, val_tp, f"{where}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(bad)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(bad)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(bad)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        errors.append(bad)
    return value


def parse_dataclass(cls: type, data: Any, where: str) -> tuple[Any, list[str]]:
    """Build ``cls(**data)`` with full checking.

    Args:
        cls: a dataclass type (frozen, kw_only recommended).
        data: the mapping from YAML.
        where: location prefix for messages, e.g. ``"objective 'csd'"``.

    Returns:
        ``(instance, [])`` on success, ``(None, errors)`` otherwise.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"{where}: expected a mapping, got {data!r} ({type(data).__name__})"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    errors: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            errors.append(f"{where}: unknown key {key!r}{did_you_mean(key, fields)}; valid keys: {valid}")
            continue
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}", errors)
    for name, f in fields.items():
        if name not in data and f.default is _MISSING and f.default_factory is _MISSING:
            errors.append(f"{where}: missing required key {name!r} ({type_name(hints[name])})")
    if errors:
        return None, errors
    try:
        return cls(**kwargs), []
    except (ValueError, TypeError) as exc:
        return None, [f"{where}: {exc}"]


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and dicts to plain YAML-able Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from each field's ``metadata['help']`` (for docs and ``distill plugins show``)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
