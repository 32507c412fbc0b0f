"""Typed operation inputs, parsed strictly from JSON: unknown fields refused by name, types checked, lengths capped.

An input is a frozen dataclass; a field's ``metadata`` may say ``max`` (characters, items or bytes) and
``base64`` (a ``bytes`` field sent as base64). A ``check()`` method, when the class has one, runs last for rules
across fields.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from agent.errors import InputError

T = TypeVar("T")
DEFAULT_MAX_TEXT = 4096  # a scope, a state, a URL: far below the request size limit
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_QUERY_BOOLEANS = {"1": True, "true": True, "0": False, "false": False}


class InvalidInput(InputError):
    """A field is missing, unknown, of the wrong type or too long; ``code`` is the stable error code."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Nothing:
    """The input of an operation that takes none: any field is unknown."""


def text(maximum: int = DEFAULT_MAX_TEXT, default: Any = dataclasses.MISSING) -> Any:
    """A string field of at most ``maximum`` characters."""
    return dataclasses.field(default=default, metadata={"max": maximum})


def base64_bytes(maximum: int, default: Any = dataclasses.MISSING) -> Any:
    """A ``bytes`` field sent as base64 (standard or URL-safe alphabet), at most ``maximum`` bytes decoded."""
    return dataclasses.field(default=default, metadata={"max": maximum, "base64": True})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:  # an input class's hints, resolved once
    return typing.get_type_hints(cls)


def parse(cls: type[T], body: Mapping[str, Any], *, from_query: bool = False) -> T:
    """``body`` (a JSON object, or a query's parameters) as an instance of the input dataclass ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(body) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise InvalidInput("unknown_field", f"unknown field {unknown[0][:60]!r}"
                           + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                           f"fields of this request: {known}")
    _refuse_non_finite(body)
    values: dict[str, Any] = {}
    hints = _hints(cls)  # type: ignore[arg-type]  # a class is hashable
    for name, field in fields.items():
        if name not in body:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise InvalidInput("missing_field", f"field {name!r} is required")
            continue
        value = body[name]
        if from_query and hints[name] in (bool, bool | None):
            value = _QUERY_BOOLEANS.get(str(value).lower(), value)
        values[name] = _convert(name, value, hints[name], field.metadata)
    made = cls(**values)
    check = getattr(made, "check", None)
    if check is not None:
        check()
    return made


def _convert(name: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    optional = typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise InvalidInput("bad_field", f"field {name!r} must not be null")
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    limit = meta.get("max")
    if meta.get("base64"):
        return _base64(name, value, limit)
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is bool:
        if not isinstance(value, bool):
            raise InvalidInput("bad_field", f"field {name!r} must be true or false")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput("bad_field", f"field {name!r} must be a whole number")
        return value
    if origin is str:
        if not isinstance(value, str):
            raise InvalidInput("bad_field", f"field {name!r} must be a string")
        _cap(name, len(value), limit or DEFAULT_MAX_TEXT, "characters")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidInput("bad_field", f"field {name!r} must be a JSON object")
        if args and args[1] is str and not all(isinstance(v, str) for v in value.values()):
            raise InvalidInput("bad_field", f"field {name!r} must be an object of strings")
        if limit is not None:
            _cap(name, len(value), limit, "members")
        return value
    if origin is list:
        if not isinstance(value, list) or (args and args[0] is not Any
                                           and not all(isinstance(v, typing.get_origin(args[0]) or args[0])
                                                       for v in value)):
            raise InvalidInput("bad_field", f"field {name!r} must be a list of {_describe(args)}")
        if limit is not None:
            _cap(name, len(value), limit, "items")
        return value
    raise TypeError(f"unsupported input type {hint!r} for field {name!r}")  # a bug in an input declaration


def _describe(args: tuple[Any, ...]) -> str:
    return "objects" if args and (typing.get_origin(args[0]) or args[0]) is dict else "values"


def _cap(name: str, size: int, limit: int, unit: str) -> None:
    if size > limit:
        raise InvalidInput("field_too_long", f"field {name!r} has {size} {unit}, more than the {limit} allowed")


def _base64(name: str, value: Any, limit: int | None) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput("missing_field" if value is None else "bad_field", f"field {name!r} (base64) is required")
    if limit is not None:
        _cap(name, len(value) * 3 // 4, limit, "bytes")
    try:
        if _BASE64URL.match(value) and ("-" in value or "_" in value):
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("bad_base64", f"field {name!r} is not base64") from None


def _refuse_non_finite(value: Any) -> None:
    """JSON has no NaN or Infinity; Python's parser accepts them, so a value could carry one."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput("bad_json", "the request holds NaN or Infinity, which JSON does not have")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
