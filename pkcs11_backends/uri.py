"""RFC 7512 ``pkcs11:`` URIs: the one way a user names a token object.

Only what names a key or certificate is kept; query attributes other than
``module-path`` are refused, and ``pin-value`` is refused loudly, because a PIN in
a URI ends up in shell history, process lists and logs.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from urllib.parse import quote, unquote_to_bytes

from pkcs11_backends.errors import UriError

SCHEME = "pkcs11:"

# Characters RFC 7512 lets stand unescaped in a path attribute value (pchar minus ";").
_PATH_SAFE = "-._~!$&'()*+,=:@"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class ObjectType(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    CERT = "cert"
    SECRET_KEY = "secret-key"
    DATA = "data"


_PATH_ATTRIBUTES = {
    "token",
    "manufacturer",
    "serial",
    "model",
    "object",
    "type",
    "id",
    "slot-id",
    "slot-description",
    "slot-manufacturer",
    "library-manufacturer",
    "library-description",
    "library-version",
}


@dataclasses.dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI. Fields left ``None`` match anything."""

    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: ObjectType | None = None
    module_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.lower().startswith(SCHEME):
            raise UriError(f"not a pkcs11: URI: {text!r}")
        body = text[len(SCHEME):]
        path, _, query = body.partition("?")
        values: dict[str, bytes] = {}
        for part in filter(None, path.split(";")):
            name, sep, raw = part.partition("=")
            if not sep:
                raise UriError(f"pkcs11: URI attribute without '=': {part!r}")
            if name not in _PATH_ATTRIBUTES:
                raise UriError(f"unknown pkcs11: URI attribute {name!r}")
            if name in values:
                raise UriError(f"pkcs11: URI attribute {name!r} given twice")
            values[name] = _unescape(raw, name)
        module_path = None
        for part in filter(None, query.split("&")):
            name, _, raw = part.partition("=")
            if name == "pin-value":
                raise UriError("pkcs11: URI carries a PIN (pin-value): PINs come from pin_file or a credential")
            if name != "module-path":
                raise UriError(f"unsupported pkcs11: URI query attribute {name!r}")
            module_path = _text(_unescape(raw, name), name)
        object_type = None
        if "type" in values:
            try:
                object_type = ObjectType(_text(values["type"], "type"))
            except ValueError:
                allowed = ", ".join(t.value for t in ObjectType)
                raise UriError(f"pkcs11: URI type must be one of {allowed}") from None
        return cls(
            token=_text(values["token"], "token") if "token" in values else None,
            serial=_text(values["serial"], "serial") if "serial" in values else None,
            manufacturer=_text(values["manufacturer"], "manufacturer") if "manufacturer" in values else None,
            model=_text(values["model"], "model") if "model" in values else None,
            object=_text(values["object"], "object") if "object" in values else None,
            id=values.get("id"),
            type=object_type,
            module_path=module_path,
        )

    def with_type(self, object_type: ObjectType) -> Pkcs11Uri:
        return dataclasses.replace(self, type=object_type)

    def __str__(self) -> str:
        parts = []
        for name, value in (
            ("token", self.token),
            ("manufacturer", self.manufacturer),
            ("model", self.model),
            ("serial", self.serial),
            ("object", self.object),
        ):
            if value is not None:
                parts.append(f"{name}={quote(value, safe=_PATH_SAFE)}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.type is not None:
            parts.append(f"type={self.type.value}")
        text = SCHEME + ";".join(parts)
        if self.module_path is not None:
            text += "?module-path=" + quote(self.module_path, safe="/-._~")
        return text


def _unescape(raw: str, name: str) -> bytes:
    if _BAD_ESCAPE.search(raw):
        raise UriError(f"bad percent-escape in pkcs11: URI attribute {name!r}: use %XX with two hex digits")
    return unquote_to_bytes(raw)


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"pkcs11: URI attribute {name!r} is not UTF-8") from None
