"""Validate plain dictionaries (from YAML) into typed dataclasses, and apply dotted overrides.

We write this small validator instead of depending on pydantic: recipes are a handful of nested
dataclasses, and what matters is that every mistake becomes one line naming the key
(``optim.lr: expected a number, got 'fast'``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..errors import ConfigError


def parse_value(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp``, or raise :class:`ConfigError` naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(key, "a value is required (got null)")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return parse_value(option, value, key)
            except ConfigError as err:
                errors.append(str(err).split(": ", 1)[-1])
        raise ConfigError(key, " or ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(parse_value(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [parse_value(item, v, f"{key}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): parse_value(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        # YAML 1.1 reads "5e-4" (no dot) as a string, so accept numeric strings here.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in our schema, not user input


def parse_dataclass(cls: type, value: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(where, f"unknown key (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = parse_value(hints[name], value[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "is required")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(key)
    return obj


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`parse_dataclass`: plain YAML-serialisable data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict/list tree in place.

    The value is parsed as YAML (``[0.08, 1.0]``, ``null``, ``true`` work); list items are
    addressed by position (``objective.1.weight=0.3``).
    """
    if "=" not in assignment:
        raise ConfigError("", f"override {assignment!r} must look like key=value")
    dotted, raw = assignment.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise ConfigError("", f"override {assignment!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(where, "is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(where, "this section is a list: address its items by position") from None
    if not -len(node) <= index < len(node):
        raise ConfigError(where, f"no item {index} (the list has {len(node)})")
    return index


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float | int, key: str = "optim.budget") -> float:
    """Seconds in ``90``, ``90s``, ``8m``, ``1.5m``, ``1h30m``; a clear error otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(value)
        except ValueError:
            match = _DURATION.fullmatch(value)
            if not value or match is None or not any(match.groups()):
                raise ConfigError(key, f"expected a duration such as 90s, 8m or 1h30m, got {text!r}") from None
            seconds = sum(float(v) * _UNITS[u] for v, u in zip(match.groups(), "hms") if v)
    if not seconds > 0:
        raise ConfigError(key, f"must be a positive duration, got {text!r}")
    return seconds
