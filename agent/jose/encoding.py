"""The byte-level forms JOSE uses: unpadded base64url and compact UTF-8 JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def b64url_uint(value: int) -> str:
    """An unsigned integer as JWK wants it (RFC 7518 §2): big-endian, minimal length."""
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))
