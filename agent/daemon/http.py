"""The HTTP/1.1 pieces the daemon needs: request heads, responses, JSON errors with stable codes."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import os
import re
import uuid
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent.daemon.policy import Peer

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
INTERACTION_HEADER = "x-fapi-interaction-id"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MAX_HEADERS = 100
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # one for every answer: json.dumps with options makes one each


class HttpError(Exception):
    """An error answered as JSON ``{"code", "message", "hint", "interaction_id"}``."""

    def __init__(self, status: int, code: str, message: str, hint: str = "",
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint
        self.headers = headers


@dataclasses.dataclass
class Head:
    """A parsed request head; never changed once parsed (a connection's requests may share it)."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @functools.cached_property
    def path(self) -> str:  # a head is parsed once per connection and asked for its path by every request
        return unquote(urlsplit(self.target).path)

    @functools.cached_property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return "keep-alive" in tokens if self.version == "HTTP/1.0" else "close" not in tokens

    def content_length(self, limit: int) -> int:
        if "transfer-encoding" in self.headers:
            raise HttpError(411, "length_required", "chunked request bodies are not accepted",
                            "send the body with a Content-Length header")
        raw = self.headers.get("content-length", "0").strip()
        if not raw.isdigit() or len(raw) > 18:
            raise HttpError(400, "bad_content_length", f"Content-Length {raw[:40]!r} is not a number")
        length = int(raw)
        if length > limit:
            raise HttpError(413, "request_too_large", f"request body of {length} bytes exceeds the limit of {limit}",
                            "send a smaller body (raise [daemon] max_request_bytes if this is expected)")
        return length


def parse_head(raw: bytes) -> Head:
    """Parse the request line and headers (``raw`` ends before the blank line)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "malformed_http", "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1].startswith("/"):
        raise HttpError(400, "malformed_http", f"malformed request line {lines[0][:80]!r}",
                        "send 'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505 if version.startswith("HTTP/") else 400, "unsupported_http_version",
                        f"unsupported protocol {version[:20]!r}", "use HTTP/1.1")
    if len(lines) - 1 > _MAX_HEADERS:
        raise HttpError(431, "too_many_headers", f"more than {_MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed_http", f"malformed header line {line[:80]!r}")
        key = name.lower()
        if key in ("content-length", "host") and key in headers:
            raise HttpError(400, "malformed_http", f"duplicate {name} header")
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if version == "HTTP/1.1" and "host" not in headers:
        # curl and every HTTP/1.1 library send it; a missing Host is a hand-made request, accept it anyway.
        headers["host"] = "localhost"
    return Head(method, target, version, headers)


def interaction_id(headers: dict[str, str]) -> str:
    """The caller's ``x-fapi-interaction-id`` if it is a UUID, else a new one."""
    given = headers.get(INTERACTION_HEADER)
    if given is not None:
        try:
            return str(uuid.UUID(given))
        except ValueError:
            pass
    return new_interaction_id()


def new_interaction_id() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())`` at half the cost: most requests need one."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


@dataclasses.dataclass
class Request:
    head: Head
    body: bytes
    peer: Peer
    interaction_id: str
    # What the request log line should say about the operation (filled in by the handler).
    log: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.head.target).query).items()}

    def json(self) -> dict[str, Any]:
        content_type = self.head.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HttpError(415, "unsupported_media_type", f"expected application/json, got {content_type!r}")
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, "malformed_json", f"request body is not valid JSON: {exc}",
                            "send a JSON object, e.g. {\"alg\": \"PS256\", \"data_b64\": \"...\"}") from None
        if not isinstance(value, dict):
            raise HttpError(400, "malformed_json", "request body must be a JSON object")
        return value


@dataclasses.dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, _COMPACT.encode(value).encode("utf-8") + b"\n", headers=headers)

    @classmethod
    def error(cls, error: HttpError, interaction: str) -> Response:
        body = {"code": error.code, "message": error.message, "interaction_id": interaction}
        if error.hint:
            body["hint"] = error.hint
        return cls.json(error.status, body, error.headers)

    def render(self, interaction: str, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}",
                 f"{INTERACTION_HEADER}: {interaction}", "Cache-Control: no-store",
                 "Connection: " + ("keep-alive" if keep_alive else "close"),
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def base64_field(body: dict[str, Any], name: str) -> bytes:
    """A required JSON field holding base64 (standard or URL-safe alphabet)."""
    value = body.get(name)
    if not isinstance(value, str):
        raise HttpError(400, "missing_field", f"field {name!r} (base64) is required")
    try:
        if _BASE64URL.match(value) and ("-" in value or "_" in value):
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "bad_base64", f"field {name!r} is not base64") from None
