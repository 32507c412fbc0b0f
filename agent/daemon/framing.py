"""HTTP/1.1 request framing as a sans-I/O reader: bytes in, requests (or one error) out.

Modelled on h11's reader: :meth:`RequestReader.receive` takes what the socket gave
(``b""`` for end of file) and :meth:`RequestReader.next_event` says what is whole:
:data:`NEED_DATA`, :data:`EXPECT_CONTINUE` (once, when a client waits for ``100
Continue`` before its body), a :class:`Message`, or :data:`CLOSED`. Anything the
stream can never recover from raises :class:`HttpError`; the connection must then
be answered and closed. No socket, no clock: the server owns those.

What is refused, and why:
- request targets that are not origin-form (RFC 9112 §3.2.1), ``//`` first included
  (a URL parser reads that as an authority), and any byte outside RFC 3986's path
  and query characters: a target is matched against routes, logged, and never
  needs more;
- header names outside RFC 9110's token grammar, values with control characters
  (NUL, a bare CR or LF: RFC 9110 §5.5), obsolete line folding;
- more than one Content-Length or Host, any Transfer-Encoding (bodies are small and
  always sent with a length), and lengths over the configured limits.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from urllib.parse import parse_qsl, unquote

from agent.daemon.errors import HttpError

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MAX_QUERY_FIELDS = 64
# RFC 3986 pchar (unreserved, pct-encoded, sub-delims, ":" and "@") plus "/" in the path and "?" in the query.
_TARGET = re.compile(r"/(?!/)(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*"
                     r"(?:\?(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?")
# Field values: visible ASCII, space and tab (RFC 9110 §5.5); obs-text is refused as the head must be ASCII.
_VALUE = re.compile(r"[\t\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_HEADERS = 100
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


@dataclasses.dataclass(frozen=True)
class Head:
    """A parsed request head; a connection's requests may share one (clients repeat their heads)."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    path: str = ""  # percent-decoded, as routes match it
    query_string: str = ""

    @functools.cached_property
    def query(self) -> dict[str, str]:
        """The query's parameters, each named once (``?format=jwk&format=pem`` could be read either way)."""
        try:
            pairs = parse_qsl(self.query_string, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS)
        except ValueError:
            raise HttpError(400, "bad_query", f"more than {_MAX_QUERY_FIELDS} query parameters") from None
        query: dict[str, str] = {}
        for name, value in pairs:
            if name in query:
                raise HttpError(400, "bad_query", f"query parameter {name!r} appears twice", "give each once")
            query[name] = value
        return query

    @functools.cached_property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return "keep-alive" in tokens if self.version == "HTTP/1.0" else "close" not in tokens

    def content_length(self, limit: int) -> int:
        if "transfer-encoding" in self.headers:
            raise HttpError(411, "length_required", "chunked request bodies are not accepted",
                            "send the body with a Content-Length header")
        raw = self.headers.get("content-length", "0")
        if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
            raise HttpError(400, "bad_content_length", f"Content-Length {raw[:40]!r} is not a number",
                            "send the body's length in bytes")
        length = int(raw)
        if length > limit:
            raise HttpError(413, "request_too_large", f"request body of {length} bytes exceeds the limit of {limit}",
                            "send a smaller body (raise [daemon] max_request_bytes if this is expected)")
        return length


def parse_head(raw: bytes) -> Head:
    """Parse the request line and header fields (``raw`` ends before the blank line)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "malformed_http", "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HttpError(400, "malformed_http", f"malformed request line {lines[0][:80]!r}",
                        "send 'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version not in _VERSIONS:
        raise HttpError(505 if version.startswith("HTTP/") else 400, "unsupported_http_version",
                        f"unsupported protocol {version[:20]!r}", "use HTTP/1.1")
    path, query = _split_target(target)
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too_many_headers", f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed_http", f"malformed header line {line[:80]!r}",
                            "header names are tokens followed directly by ':'")
        value = value.strip(" \t")
        if not _VALUE.fullmatch(value):
            raise HttpError(400, "malformed_http", f"header {name[:40]!r} holds a control character",
                            "header values are visible ASCII, spaces and tabs")
        key = name.lower()
        if key in headers:
            if key in ("content-length", "host"):
                raise HttpError(400, "malformed_http", f"duplicate {name} header")
            value = f"{headers[key]}, {value}"
        headers[key] = value
    if version == "HTTP/1.1" and "host" not in headers:
        # curl and every HTTP/1.1 library send it; a missing Host is a hand-made request, accept it anyway.
        headers["host"] = "localhost"
    return Head(method, target, version, headers, path, query)


def _split_target(target: str) -> tuple[str, str]:
    """The decoded path and the raw query of an origin-form target."""
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "malformed_http", f"request target {target[:80]!r} is not an origin-form path",
                        "send a path such as /v1/health, percent-encoding any other character")
    path, _, query = target.partition("?")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "malformed_http", "request path is not UTF-8 once percent-decoded",
                        "percent-encode the path's characters as UTF-8") from None
    if _CONTROL.search(decoded):
        raise HttpError(400, "malformed_http", "request path holds a control character once percent-decoded",
                        "remove %00-%1F and %7F from the path")
    return decoded, query


class Event(enum.Enum):
    NEED_DATA = "need data"
    EXPECT_CONTINUE = "expect continue"  # the client waits for "100 Continue" before sending its body
    CLOSED = "closed"  # the client ended the stream between requests


NEED_DATA, EXPECT_CONTINUE, CLOSED = Event.NEED_DATA, Event.EXPECT_CONTINUE, Event.CLOSED


@dataclasses.dataclass(frozen=True)
class Message:
    head: Head
    body: bytes


class RequestReader:
    """One connection's request stream; pipelined requests come out one :meth:`next_event` at a time."""

    def __init__(self, max_head_bytes: int, max_body_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._head: Head | None = None  # of the request under way, once its head is whole
        self._body_start = 0
        self._length = 0
        self._continued = False
        self._eof = False
        self._last_raw = b""  # the last head parsed, and what it parsed to: keep-alive clients repeat theirs
        self._last_head: Head | None = None

    @property
    def in_progress(self) -> bool:
        """Part of a request has arrived (its deadline runs)."""
        return bool(self._buffer) or self._head is not None

    @property
    def head_headers(self) -> dict[str, str]:
        """The header fields of the request under way, once its head is parsed (to answer an error with)."""
        return self._head.headers if self._head is not None else {}

    def receive(self, data: bytes) -> None:
        """What the peer sent; ``b""`` when it closed its side."""
        if data:
            if self._eof:
                raise RuntimeError("data received after end of file")
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Message | Event:
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            limit = self.max_head_bytes
            if end > limit or (end < 0 and len(self._buffer) > limit):
                raise HttpError(431, "header_too_large", f"request head exceeds {limit} bytes",
                                "send fewer or shorter header fields")
            if end < 0:
                return self._starved()
            raw = bytes(self._buffer[:end])
            head = self._last_head
            if head is None or raw != self._last_raw:
                head = self._last_head = parse_head(raw)
                self._last_raw = raw
            self._length = head.content_length(self.max_body_bytes)
            self._head, self._body_start, self._continued = head, end + 4, False
        total = self._body_start + self._length
        if len(self._buffer) < total:
            if not self._continued and self._head.headers.get("expect", "").lower() == "100-continue":
                self._continued = True
                return EXPECT_CONTINUE
            return self._starved()
        message = Message(self._head, bytes(self._buffer[self._body_start:total]))
        del self._buffer[:total]
        self._head = None
        return message

    def _starved(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if self.in_progress:
            raise HttpError(400, "incomplete_request", "the connection ended in the middle of a request",
                            "send the whole request before closing the connection")
        return CLOSED
