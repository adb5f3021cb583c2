"""Nested config dataclasses <-> plain dicts/JSON, and `key.sub=value` overrides from the CLI."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

C = TypeVar("C")


def to_dict(cfg: Any) -> dict:
    """A nested dataclass as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict) -> C:
    """Build a (nested) dataclass from a dict; unknown keys are an error naming the key."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_in(hints[key])
        kwargs[key] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(text: str, tp, where: str):
    """Parse a CLI string into the field's annotated type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(text, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: cannot parse {text!r} as {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if text not in choices:
            raise ValueError(f"{where}: {text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: {text!r} is not a boolean")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not a valid {tp.__name__}") from None
    if origin in (list, tuple):
        return tp(json.loads(text)) if origin is tuple else json.loads(text)
    return json.loads(text)


def apply_overrides(cfg: C, overrides: list[str]) -> C:
    """Return a copy of `cfg` with `a.b.c=value` assignments applied (types from the annotations).

    Re-validates every touched dataclass (their __post_init__ checks run again).
    """
    data = to_dict(cfg)
    cls = type(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        owner_cls, node = cls, data
        for key in keys[:-1]:
            hints = get_type_hints(owner_cls)
            if key not in hints or _dataclass_in(hints[key]) is None:
                raise ValueError(f"override {path!r}: {owner_cls.__name__} has no section {key!r}")
            owner_cls, node = _dataclass_in(hints[key]), node[key]
        hints = get_type_hints(owner_cls)
        leaf = keys[-1]
        if leaf not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(owner_cls)))
            raise ValueError(f"override {path!r}: {owner_cls.__name__} has no field {leaf!r}; known: {known}")
        node[leaf] = _coerce(text.strip(), hints[leaf], path)
    return from_dict(cls, data)
