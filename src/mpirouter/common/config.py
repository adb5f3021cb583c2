"""Nested config dataclasses <-> plain dicts/JSON, and `key.sub=value` overrides from the CLI.

`from_dict` checks every value against its field's annotation before any dataclass is built, so
a config file or `--set` with the wrong shape fails with one line naming the dotted path
(`model.moe: expected a MoEConfig section (a JSON object), got int 5`) instead of a traceback
from deep inside a constructor. Value ranges are each config's own `__post_init__` business;
`check_number` is the shared helper for those.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

C = TypeVar("C")


def to_dict(cfg: Any) -> dict:
    """A nested dataclass as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict, path: str = "") -> C:
    """Build a (nested) dataclass from a dict, checking each value against the field's annotation.

    Errors are ValueErrors naming the dotted path of the offending key (`path` is the prefix of
    this section, "" at the top). Unknown keys are an error; missing keys take their defaults.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a {cls.__name__} section (a JSON object), got {show_value(data)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{path}: " if path else ""
        raise ValueError(
            f"{prefix}unknown {cls.__name__} field(s): {', '.join(sorted(map(str, unknown)))}; known: {', '.join(sorted(names))}"
        )
    kwargs = {key: check_value(value, hints[key], _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        # a section's own __post_init__ message names the field but not where the section sits
        message = str(e)
        if path and not message.startswith((f"{path}.", f"{path}:")):
            message = f"{path}: {message}"
        raise ValueError(message) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def show_value(value: Any, limit: int = 80) -> str:
    """A value as it would read in JSON, on one line, with its type where the spelling alone is ambiguous."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"{type(value).__name__} {value!r}"
    try:
        text = json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        text = f"{type(value).__name__} {value!r}"
    if isinstance(value, dict):
        text = f"object {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(tp) -> str:
    """What an annotation expects, in words: 'an integer', 'a list of 2 numbers', 'one of a, b'."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if str in args:  # Literal["a", "b"] | str takes any string: the choices are only examples
            args = tuple(a for a in args if get_origin(a) is not Literal)
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args and len({a for a in args}) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a JSON object"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} section (a JSON object)"
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _plural(tp) -> str:
    names = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    return names.get(tp, f"items that are each {describe(tp)}")


def check_value(value: Any, tp, where: str) -> Any:
    """`value` checked against the annotation `tp`, converted where JSON has no such type.

    int accepts integral numbers (JSON 1e3 -> 1000) but not booleans; float accepts ints and
    returns a float (nan/inf pass: finiteness is a range question for __post_init__); tuples come
    from lists of the right length; a dataclass comes from a dict (or is already an instance).
    Raises ValueError "<where>: expected <what>, got <value>".
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, dict):
            # a section's own errors (e.g. a bad nested field) say more than "expected X or null"
            for arg in options:
                if dataclasses.is_dataclass(arg):
                    return check_value(value, arg, where)
        for arg in options:
            try:
                return check_value(value, arg, where)
            except ValueError:
                continue
        raise _mismatch(where, tp, value)
    if origin is Literal:
        if not any(type(value) is type(choice) and value == choice for choice in args):
            raise ValueError(f"{where}: {show_value(value)} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, where)
        raise _mismatch(where, tp, value)
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(where, tp, value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _mismatch(where, tp, value)
            items = [check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _mismatch(where, tp, value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _mismatch(where, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _mismatch(where, tp, value)
        if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
            raise _mismatch(where, tp, value)
        if not -(2**63) <= int(value) < 2**63:  # torch and the data order take 64-bit integers; 1e39 steps is a typo
            raise ValueError(f"{where}: {show_value(value)} does not fit in a 64-bit integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _mismatch(where, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _mismatch(where, tp, value)
        return value
    return value  # an annotation this checker does not know: the dataclass gets it as is


def _mismatch(where: str, tp, value: Any) -> ValueError:
    return ValueError(f"{where}: expected {describe(tp)}, got {show_value(value)}")


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    upper_name: str | None = None,
    optional: bool = False,
) -> None:
    """Raise ValueError "<name> must be <range>, got <value>" unless `value` is a finite number in range.

    For `__post_init__` range checks. Written as "not (value >= bound)" style so that NaN, which
    fails every comparison, is rejected rather than slipping through `x > 0`-style tests' negations.
    `upper_name` labels the upper bound (e.g. "num_experts=8"); `optional` allows None.
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise ValueError(f"{name} must be {kind}{' or null' if optional else ''}, got {show_value(value)}")
    lower = ("[", ge) if ge is not None else ("(", gt) if gt is not None else None
    upper = ("]", le) if le is not None else (")", lt) if lt is not None else None
    ok = math.isfinite(value)
    if ge is not None:
        ok = ok and value >= ge
    if gt is not None:
        ok = ok and value > gt
    if le is not None:
        ok = ok and value <= le
    if lt is not None:
        ok = ok and value < lt
    if ok:
        return
    upper_text = upper_name or (f"{upper[1]:g}" if upper else "")
    if lower and upper:
        need = f"in {lower[0]}{lower[1]:g}, {upper_text}{upper[0]}"
    elif lower:
        need = f"{'>=' if lower[0] == '[' else '>'} {lower[1]:g}" + ("" if integer else " and finite")
    elif upper:
        need = f"{'<=' if upper[0] == ']' else '<'} {upper_text}" + ("" if integer else " and finite")
    else:
        need = "finite"
    raise ValueError(f"{name} must be {need}{' (or null)' if optional else ''}, got {value}")


def _coerce(text: str, tp, where: str):
    """Parse a CLI string into the field's annotated type; bad text is a ValueError naming `where`.

    Only the text is interpreted here (e.g. JSON for lists and sections); `from_dict` then checks
    the parsed value against the annotation like any value from a config file.
    """
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(get_args(tp)):
            return None
        for arg in args:
            try:
                return _coerce(text, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {describe(tp)}, got {json.dumps(text)}")
    if origin is Literal:
        choices = get_args(tp)
        if text not in choices:
            raise ValueError(f"{where}: {json.dumps(text)} is not one of {', '.join(map(str, choices))}")
        return text
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected {describe(tp)}, got {json.dumps(text)}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)  # "1e3" is a fine way to write 1000 steps
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise ValueError(f"{where}: expected {describe(tp)}, got {json.dumps(text)}")
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: expected {describe(tp)}, got {json.dumps(text)}") from None
    if tp is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: expected {describe(tp)} written as JSON, got {json.dumps(text)} ({e.msg} at column {e.colno})") from None


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b.c": value}, JSON-normalized (tuples become lists), to compare configs field by field."""
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(data)).items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


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
        for depth, key in enumerate(keys[:-1]):
            hints = get_type_hints(owner_cls)
            if key not in hints or _dataclass_in(hints[key]) is None:
                raise ValueError(f"override {path!r}: {owner_cls.__name__} has no section {key!r}")
            if not isinstance(node.get(key), dict):
                # an earlier override replaced the section by a non-object; from_dict reports that value
                section = ".".join(keys[: depth + 1])
                raise ValueError(f"override {path!r}: {section} is {show_value(node.get(key))}, not a section")
            owner_cls, node = _dataclass_in(hints[key]), node[key]
        hints = get_type_hints(owner_cls)
        leaf = keys[-1]
        if leaf not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(owner_cls)))
            raise ValueError(f"override {path!r}: {owner_cls.__name__} has no field {leaf!r}; known: {known}")
        node[leaf] = _coerce(text.strip(), hints[leaf], path.strip())
    return from_dict(cls, data)


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
