"""Typed loading of config sections: a raw mapping walked field by field into a dataclass.

Every problem is collected (``Problems``) rather than raised, so a file's problems are reported at once. The
study config's sections (``study``) and the hyperparameter declarations (``hyperparameters``) both convert
values here; this module knows dataclasses and type hints, not any config field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

__all__ = ["MISSING", "Problems", "build", "convert", "type_name"]


class Problems:
    """The problems found in one source (a file, or ``--set``), each naming the field it is about."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []  # "SOURCE: FIELD: MESSAGE", as ConfigError shows them
        self.messages: list[str] = []  # the MESSAGE parts alone

    def add(self, path: str, message: str) -> None:
        where = f"{self.source}: {path}" if path else self.source
        self.items.append(f"{where}: {message}")
        self.messages.append(message)


MISSING: Any = object()  # what convert and build return after recording a problem


def type_name(tp: Any) -> str:
    """How a message (and the README) names the values of type ``tp``: "a number or null", "one of 'a', 'b'"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is dict or tp is dict:
        return "a mapping"
    if origin is list:
        item = type_name(typing.get_args(tp)[0]).removeprefix("an ").removeprefix("a ") if typing.get_args(tp) else ""
        return f"a list of {item}s" if item else "a list"
    return getattr(tp, "__name__", str(tp))


def _convert_union(value: Any, tp: Any, path: str, problems: Problems) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        problems.add(path, f"must not be null; expected {type_name(tp)}")
        return MISSING
    scratch = Problems(problems.source)
    # int before float so that `0.1 | 100` keeps counts as ints.
    for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is float):
        result = convert(value, arg, path, scratch)
        if result is not MISSING:
            return result
    problems.add(path, f"expected {type_name(tp)}, got {value!r}")
    return MISSING


def _convert_float(value: Any, path: str, problems: Problems) -> Any:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        problems.add(path, f"expected {type_name(float)}, got {value!r}")
        return MISSING
    if not math.isfinite(number):
        problems.add(path, f"must be a finite number, got {value!r}")
        return MISSING
    return number


def _string_mapping(value: dict, path: str, problems: Problems) -> Any:
    """A mapping of names to names: scalar keys and values (numbers, booleans) become their strings."""
    out = {}
    for key, item in value.items():
        if isinstance(key, (dict, list)) or isinstance(item, (dict, list)) or item is None:
            problems.add(f"{path}.{key}", f"expected a name, got {item!r}")
            return MISSING
        out[str(key).lower() if isinstance(key, bool) else str(key)] = str(item)
    return out


def convert(value: Any, tp: Any, path: str, problems: Problems) -> Any:
    """Return ``value`` converted to ``tp``, or MISSING after recording a problem at ``path``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, got {value!r}")
            return MISSING
        return build(tp, value, f"{path}.", problems)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, path, problems)
    if origin is Literal:
        if value not in typing.get_args(tp):
            hint = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(path, f"got {value!r}; expected {type_name(tp)}{extra}")
            return MISSING
        return value
    if tp is float:
        return _convert_float(value, path, problems)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            if typing.get_args(tp) == (str, str):  # YAML reads {0: negative} with an int key: names are strings
                return _string_mapping(value, path, problems)
            return dict(value)
        ok = False
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            items = [convert(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value)]
            return MISSING if any(v is MISSING for v in items) else items
        ok = False
    else:
        ok = tp is Any
    if ok:
        return value
    problems.add(path, f"expected {type_name(tp)}, got {value!r}")
    return MISSING


def build(cls: type, raw: dict[str, Any], prefix: str, problems: Problems) -> Any:
    """An instance of dataclass ``cls`` from ``raw`` (unknown keys, missing and mistyped fields recorded), or
    MISSING when a required field could not be set."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(fields)}"
            problems.add(f"{prefix}{key}", f"unknown key{extra}")
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.add(path, f"missing; set it to {type_name(hints[name])}")
            continue
        value = convert(raw[name], hints[name], path, problems)
        if value is not MISSING:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing: already reported
        return MISSING
