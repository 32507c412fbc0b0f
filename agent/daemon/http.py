"""The HTTP/1.1 pieces the daemon needs: request heads, responses, JSON errors with stable codes."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any

from agent import strict_json
from agent.daemon.errors import HttpError
from agent.daemon.framing import Head
from agent.daemon.policy import Peer

__all__ = ["INTERACTION_HEADER", "HttpError", "Request", "Response", "interaction_id",
           "new_interaction_id", "reply_interaction_id"]

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
INTERACTION_HEADER = "x-fapi-interaction-id"
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # one for every answer: json.dumps with options makes one each
_MAX_JSON_DEPTH = 32  # deeper than any request the agent takes; json's own limit is the interpreter's stack


def interaction_id(headers: dict[str, str]) -> str:
    """The caller's ``x-fapi-interaction-id`` (a UUID, as FAPI asks), else a new one; HttpError if malformed."""
    given = headers.get(INTERACTION_HEADER)
    if given is None:
        return new_interaction_id()
    try:
        return str(uuid.UUID(given))
    except ValueError:
        raise HttpError(400, "bad_interaction_id", f"{INTERACTION_HEADER} {given[:60]!r} is not a UUID",
                        "send a UUID (RFC 4122), or leave the header out and the agent makes one") from None


def reply_interaction_id(headers: dict[str, str]) -> str:
    """The id to answer a refused request with: the caller's if it is a UUID, else a new one."""
    try:
        return interaction_id(headers)
    except HttpError:
        return new_interaction_id()


def new_interaction_id() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())`` at half the cost: most requests need one."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _depth(value: Any) -> int:
    """How deeply ``value``'s containers nest, stopping as soon as the limit is passed."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level > _MAX_JSON_DEPTH:
                return level
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@dataclasses.dataclass
class Request:
    head: Head
    body: bytes
    peer: Peer
    interaction_id: str
    # What the request log line should say about the operation (filled in by the handler).
    log: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Why a well-framed request is answered without reaching the handler (a malformed interaction id, say).
    refusal: HttpError | None = None

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def query(self) -> dict[str, str]:
        return self.head.query

    def json(self) -> dict[str, Any]:
        content_type = self.head.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HttpError(415, "unsupported_media_type", f"expected application/json, got {content_type!r}")
        hint = "send a JSON object, e.g. {\"alg\": \"PS256\", \"data_b64\": \"...\"}"
        try:
            value = strict_json.loads(self.body)
        except RecursionError:
            raise HttpError(400, "malformed_json", "request body nests too deeply", hint) from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, "malformed_json", f"request body is not valid JSON: {exc}", hint) from None
        if self.body.count(b"{") + self.body.count(b"[") > _MAX_JSON_DEPTH and _depth(value) > _MAX_JSON_DEPTH:
            raise HttpError(400, "malformed_json", f"request body nests deeper than {_MAX_JSON_DEPTH} levels", hint)
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
        if error.bank_interaction_id:
            body["bank_interaction_id"] = error.bank_interaction_id
        return cls.json(error.status, body, error.headers)

    def render(self, interaction: str, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}",
                 f"{INTERACTION_HEADER}: {interaction}", "Cache-Control: no-store",
                 "Connection: " + ("keep-alive" if keep_alive else "close"),
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body

