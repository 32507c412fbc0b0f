"""Typed operation inputs, parsed strictly from JSON: unknown fields refused by name, types checked, lengths capped.

An input is a frozen dataclass; a field's ``metadata`` may say ``max`` (characters, items or bytes), ``base64``
(a ``bytes`` field sent as base64) and ``doc`` (its description in docs/openapi.json). A ``check()`` method, when
the class has one, runs last for rules across fields (the class's docstring should say them: it describes the
input in the API's description, whose schema :func:`json_schema` makes from the same plan :func:`parse` reads by).
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
from agent.operations import results

T = TypeVar("T")
DEFAULT_MAX_TEXT = 4096  # a scope, a state, a URL: far below the request size limit
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_SCALARS = frozenset({str, bool, int, type(None)})
_QUERY_BOOLEANS = {"1": True, "true": True, "0": False, "false": False}


class InvalidInput(InputError):
    """A field is missing, unknown, of the wrong type or too long; ``code`` is the stable error code."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Nothing:
    """The input of an operation that takes none: any field is unknown."""


def text(maximum: int = DEFAULT_MAX_TEXT, default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A string field of at most ``maximum`` characters."""
    return dataclasses.field(default=default, metadata={"max": maximum, "doc": doc})


def base64_bytes(maximum: int, default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A ``bytes`` field sent as base64 (standard or URL-safe alphabet), at most ``maximum`` bytes decoded."""
    return dataclasses.field(default=default, metadata={"max": maximum, "base64": True, "doc": doc})


@dataclasses.dataclass(frozen=True)
class _Field:
    """How one field of an input class is read: worked out once per class, used for every request."""

    name: str
    required: bool
    optional: bool  # None is a value
    kind: type  # bool, int, str, dict, list or bytes (base64)
    items: type | None  # list items / dict values must be of this type
    limit: int | None
    choices: tuple[str, ...] = ()  # a Literal["a", "b"] field: one of these


@functools.cache  # input classes are fixed: a plan each, made on first use
def _plan(cls: type) -> tuple[dict[str, _Field], str]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, _Field] = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        optional = typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint)
        if optional:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        choices: tuple[str, ...] = ()
        if typing.get_origin(hint) is typing.Literal:
            choices, hint = typing.get_args(hint), str
        origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
        items = None
        if origin is dict and args and args[1] is str:
            items = str
        elif origin is list and args and args[0] is not Any:
            items = typing.get_origin(args[0]) or args[0]
        kind = bytes if field.metadata.get("base64") else origin
        if kind not in (bool, int, str, dict, list, bytes):
            raise TypeError(f"unsupported input type {hint!r} for {cls.__name__}.{field.name}")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        limit = field.metadata.get("max", DEFAULT_MAX_TEXT if kind is str else None)
        fields[field.name] = _Field(field.name, required, optional, kind, items, limit, choices)
    return fields, ", ".join(fields) or "none"


def parse(cls: type[T], body: Mapping[str, Any], *, from_query: bool = False) -> T:
    """``body`` (a JSON object, or a query's parameters) as an instance of the input dataclass ``cls``."""
    fields, known = _plan(cls)  # type: ignore[arg-type]  # a class is hashable
    for name in body:
        if name not in fields:
            unknown = sorted(set(body) - set(fields))
            raise InvalidInput("unknown_field", f"unknown field {unknown[0][:60]!r}"
                               + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                               f"fields of this request: {known}")
    _refuse_non_finite(body)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in body:
            if field.required:
                raise InvalidInput("missing_field", f"field {name!r} is required")
            continue
        value = body[name]
        if from_query and field.kind is bool:
            value = _QUERY_BOOLEANS.get(str(value).lower(), value)
        values[name] = _convert(field, value)
        if field.choices and value not in field.choices:
            allowed = " or ".join(field.choices) if len(field.choices) == 2 else "one of " + ", ".join(field.choices)
            raise InvalidInput("bad_query" if from_query else "bad_field",
                               f"{name} must be {allowed}, not {str(value)[:20]!r}")
    made = cls(**values)
    check = getattr(made, "check", None)
    if check is not None:
        check()
    return made


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema (2020-12) of the objects :func:`parse` accepts for ``cls``: made from the plan it reads by,
    so the API's description cannot promise what the parser refuses (rules of ``check()`` are in the docstring)."""
    fields, _ = _plan(cls)
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        schema = _field_schema(fields[field.name])
        if field.metadata.get("doc"):
            schema["description"] = "; ".join(filter(None, (field.metadata["doc"], schema.get("description"))))
        if field.default is not dataclasses.MISSING and field.default is not None:
            schema["default"] = field.default
        properties[field.name] = schema
    described: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    required = [name for name, field in fields.items() if field.required]
    if required:
        described["required"] = required
    doc = results.docstring(cls)
    if doc:
        described["description"] = doc
    return described


_JSON_TYPES = {bool: "boolean", int: "integer", str: "string", dict: "object", list: "array", bytes: "string"}


def _field_schema(field: _Field) -> dict[str, Any]:
    kind, limit = field.kind, field.limit
    schema: dict[str, Any] = {"type": _JSON_TYPES[kind]}
    if kind is bytes:
        schema["contentEncoding"] = "base64"
        if limit is not None:  # parse() caps len * 3 // 4 at the limit
            schema["maxLength"] = (4 * limit + 3) // 3
            schema["description"] = f"base64 (standard or URL-safe alphabet) of at most {limit} bytes"
    elif field.choices:
        schema["enum"] = list(field.choices) + ([None] if field.optional else [])
    elif kind is str:
        schema["maxLength"] = limit or DEFAULT_MAX_TEXT
    elif kind is dict:
        if field.items is not None:
            schema["additionalProperties"] = {"type": _JSON_TYPES[field.items]}
        if limit is not None:
            schema["maxProperties"] = limit
    elif kind is list:
        if field.items is not None:
            schema["items"] = {"type": _JSON_TYPES[field.items]}
        if limit is not None:
            schema["maxItems"] = limit
    if field.optional:
        schema["type"] = [schema["type"], "null"]
    return schema


def _convert(field: _Field, value: Any) -> Any:
    name, kind, limit = field.name, field.kind, field.limit
    if value is None:
        if field.optional:
            return None
        raise InvalidInput("bad_field", f"field {name!r} must not be null")
    if kind is bytes:
        return _base64(name, value, limit)
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidInput("bad_field", f"field {name!r} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput("bad_field", f"field {name!r} must be a whole number")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise InvalidInput("bad_field", f"field {name!r} must be a string")
        _cap(name, len(value), limit or DEFAULT_MAX_TEXT, "characters")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise InvalidInput("bad_field", f"field {name!r} must be a JSON object")
        if field.items is not None and not all(isinstance(v, field.items) for v in value.values()):
            raise InvalidInput("bad_field", f"field {name!r} must be an object of strings")
        if limit is not None:
            _cap(name, len(value), limit, "members")
        return value
    if not isinstance(value, list) or (field.items is not None and not all(isinstance(v, field.items)
                                                                           for v in value)):
        raise InvalidInput("bad_field", f"field {name!r} must be a list of "
                                        f"{'objects' if field.items is dict else 'values'}")
    if limit is not None:
        _cap(name, len(value), limit, "items")
    return value


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
    if isinstance(value, dict) and all(type(v) in _SCALARS for v in value.values()):
        return  # the common request: strings and flags only
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput("bad_json", "the request holds NaN or Infinity, which JSON does not have")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
