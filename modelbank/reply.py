"""An HTTP answer of the model bank that is not a plain JSON object: a redirect, a signed JWS, a JWKS."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, value: Any) -> Reply:
        return cls(status, json.dumps(value).encode(), "application/json")

    @classmethod
    def jwt(cls, status: int, token: str) -> Reply:
        return cls(status, token.encode("ascii"), "application/jwt")

    @classmethod
    def redirect(cls, location: str) -> Reply:
        return cls(302, b"", None, (("Location", location),))
