"""What operations answer, as JSON Schema: each Spec's ``result`` is a TypedDict or a dataclass, described here.

A result type says every member of the answer: a TypedDict's ``NotRequired`` members may be left out, and
``Annotated[T, "text"]`` gives a member its description; a dataclass stands for its ``dataclasses.asdict``, an
Enum for its values.
Schemas of named types go to ``components`` (the OpenAPI document's), referred to by name, so one type
answered by several operations is described once. The socket's answers are checked against these schemas
(tests/daemon/test_openapi_conformance.py): a member an operation returns that its type does not name fails there.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal, NotRequired, Required, get_args, get_origin

_SIMPLE: dict[object, str] = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


class ResultTypeError(TypeError):
    """A result type the document cannot describe (a member's type, or a name two types take)."""


class Components:
    """The named schemas met so far, by name (a name taken by two different types is refused)."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}
        self._types: dict[str, object] = {}

    def ref(self, name: str, tp: object, make: typing.Callable[[], dict[str, Any]]) -> dict[str, Any]:
        known = self._types.get(name)
        if known is None:
            self._types[name] = tp
            self.schemas[name] = {}  # taken before it is made: a type may refer to itself
            self.schemas[name] = make()
        elif known is not tp:
            raise ResultTypeError(f"two types are named {name!r} ({known!r}, {tp!r}): rename one, the API names both")
        return {"$ref": f"#/components/schemas/{name}"}


def schema(tp: object, components: Components) -> dict[str, Any]:
    """The JSON Schema of values of ``tp`` as the socket sends them (JSON)."""
    if tp is Any:
        return {}
    if tp is None:
        tp = type(None)
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    origin, args = get_origin(tp), get_args(tp)
    if origin is typing.Annotated:
        described = dict(schema(args[0], components))
        note = next((a for a in args[1:] if isinstance(a, str)), None)
        if note:
            if "$ref" in described:  # 2020-12 allows siblings of $ref
                return {**described, "description": note}
            described["description"] = note
        return described
    if origin in (NotRequired, Required):
        return schema(args[0], components)
    if origin is Literal:
        return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
    if origin in (types.UnionType, typing.Union):
        members = [schema(a, components) for a in args]
        if all(set(m) == {"type"} and isinstance(m["type"], str) for m in members):
            return {"type": [m["type"] for m in members]}
        return {"anyOf": members}
    if origin is list:
        return {"type": "array", "items": schema(args[0], components)} if args else {"type": "array"}
    if origin is dict:
        values = schema(args[1], components) if args else {}
        return {"type": "object", "additionalProperties": values} if values else {"type": "object"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):  # answered as its value
        return {"enum": [member.value for member in tp]}
    if isinstance(tp, type) and typing.is_typeddict(tp):
        return components.ref(tp.__name__, tp, lambda: _typed_dict(tp, components))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return components.ref(tp.__name__, tp, lambda: _dataclass(tp, components))
    raise ResultTypeError(f"no JSON Schema for {tp!r}: use str, int, float, bool, None, Literal, list, dict, a union, "
                    "a TypedDict or a dataclass")


def _typed_dict(tp: type, components: Components) -> dict[str, Any]:
    hints = typing.get_type_hints(tp, include_extras=True)
    # Read from the hints, not __required_keys__: Python 3.11 cannot see NotRequired in postponed annotations.
    total = getattr(tp, "__total__", True)
    required = [name for name, hint in hints.items()
                if get_origin(hint) is Required or (total and get_origin(hint) is not NotRequired)]
    return _object(tp, {name: schema(hint, components) for name, hint in hints.items()}, required)


def _dataclass(tp: type, components: Components) -> dict[str, Any]:
    hints = typing.get_type_hints(tp, include_extras=True)
    names = [field.name for field in dataclasses.fields(tp)]
    return _object(tp, {name: schema(hints[name], components) for name in names}, names)


def _object(tp: type, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    described: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        described["required"] = required
    doc = docstring(tp)
    if doc:
        described["description"] = doc
    return described


def docstring(tp: type) -> str:
    """A class's own docstring on one line; none for the one dataclasses make up from the signature."""
    doc = tp.__doc__ or ""
    return "" if doc.startswith(f"{tp.__name__}(") else " ".join(doc.split())
