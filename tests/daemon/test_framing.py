"""The request reader on bytes alone (no socket): what h11's reader tests check, and what the agent refuses."""

from __future__ import annotations

import pytest

from agent.daemon.errors import HttpError
from agent.daemon.framing import CLOSED, EXPECT_CONTINUE, NEED_DATA, Message, RequestReader, parse_head


def reader() -> RequestReader:
    return RequestReader(max_head_bytes=1024, max_body_bytes=100)


def events(data: bytes, *, eof: bool = False, chunk: int = 0) -> list[Message | str]:
    """Feed ``data`` (in ``chunk``-byte pieces, or whole) and collect every event the reader gives."""
    r, out = reader(), []
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        r.receive(piece)
        while (event := r.next_event()) not in (NEED_DATA, CLOSED):
            out.append(event if isinstance(event, Message) else event.name)
    if eof:
        r.receive(b"")
        while (event := r.next_event()) is not NEED_DATA:
            out.append(event if isinstance(event, Message) else event.name)
            if event is CLOSED:
                break
    return out


def refused(data: bytes) -> HttpError:
    r = reader()
    r.receive(data)
    with pytest.raises(HttpError) as caught:
        r.next_event()
    return caught.value


def test_a_request_split_anywhere_reads_the_same() -> None:
    raw = b"POST /v1/keys/a/jws?x=1&y=%20z HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    for chunk in (0, 1, 3, 7):
        [message] = events(raw, chunk=chunk)
        assert isinstance(message, Message)
        assert (message.head.method, message.head.path, message.body) == ("POST", "/v1/keys/a/jws", b"hello")
        assert message.head.query == {"x": "1", "y": " z"}


def test_pipelined_requests_come_out_one_at_a_time_and_a_repeated_head_is_parsed_once() -> None:
    one = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    first, second, third = events(one * 3)
    assert isinstance(first, Message) and isinstance(second, Message) and isinstance(third, Message)
    assert first.head is second.head is third.head


def test_end_of_file_between_requests_is_closed_and_inside_one_is_an_error() -> None:
    assert events(b"GET / HTTP/1.1\r\n\r\n", eof=True)[-1] == "CLOSED"
    r = reader()
    r.receive(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc")
    assert r.next_event() is NEED_DATA
    r.receive(b"")
    with pytest.raises(HttpError) as caught:
        r.next_event()
    assert caught.value.status == 400 and caught.value.code == "incomplete_request"


def test_expect_continue_is_said_once_before_the_body() -> None:
    raw = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    r = reader()
    r.receive(raw)
    assert r.next_event() is EXPECT_CONTINUE
    assert r.next_event() is NEED_DATA
    r.receive(b"ok")
    message = r.next_event()
    assert isinstance(message, Message) and message.body == b"ok"
    # The body already there: nothing to wait for.
    assert [type(e) for e in events(raw + b"ok")] == [Message]


@pytest.mark.parametrize("target", [
    "//[", "//", "//host/v1/health", "*", "http://agent/v1/health", "v1/health", "/a b", "/a#frag", "/[", "/a]",
    "/%zz", "/%", "/a\\b", "/{x}", "/a\x7f", "/%00", "/%0a", "/%1f", "/%c3", "/%ff%fe",
])
def test_request_targets_that_are_not_origin_form_are_refused(target: str) -> None:
    error = refused(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
    assert error.status == 400 and error.code == "malformed_http" and error.hint


@pytest.mark.parametrize("target,path,query", [
    ("/", "/", {}), ("/v1/keys/a%2Fb/public", "/v1/keys/a/b/public", {}), ("/v1/x?", "/v1/x", {}),
    ("/v1/x?a=1&b", "/v1/x", {"a": "1", "b": ""}), ("/v1/%C3%A9", "/v1/\u00e9", {}),
    ("/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;=", {}),
    ("/x?y=//a?b", "/x", {"y": "//a?b"}),
])
def test_origin_form_targets_split_without_a_url_parser(target: str, path: str, query: dict[str, str]) -> None:
    head = parse_head(f"GET {target} HTTP/1.1\r\nHost: x".encode())
    assert (head.path, head.query) == (path, query)


@pytest.mark.parametrize("query", ["a=1&a=2", "format=jwk&format=pem", "a&a", "&".join(f"p{i}=1" for i in range(65))])
def test_a_query_naming_a_parameter_twice_or_too_many_is_refused(query: str) -> None:
    # One reading only: the route must not take the last "format" where a proxy or a log took the first.
    head = parse_head(f"GET /v1/keys/k/public?{query} HTTP/1.1\r\nHost: x".encode())
    with pytest.raises(HttpError) as refused_query:
        head.query  # noqa: B018 -- parsed on first use
    assert refused_query.value.status == 400 and refused_query.value.code == "bad_query"


@pytest.mark.parametrize("line", [
    b"X-A: a\x00b", b"X-A: a\nb", b"X-A: a\rb", b"X-A: \x1b[31m", b"X-A: a\x7f", b"X-A: caf\xc3\xa9",
    b"Host : x", b"Host\t: x", b"Transfer-Encoding : chunked", b"Content-Length\t: 3", b" X-A: folded",
    b"\tX-A: folded", b"X A: b", b"X-A", b": empty name", b"X-\x00: a",
])
def test_header_lines_with_control_characters_or_bad_names_are_refused(line: bytes) -> None:
    error = refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n")
    assert error.status == 400 and error.code == "malformed_http"


def test_a_bare_lf_ending_the_head_is_not_a_request_separator() -> None:
    # "\n\n" ends nothing: a reader that took it would see a different request than a proxy in front.
    r = reader()
    r.receive(b"GET / HTTP/1.1\nHost: x\n\n")
    assert r.next_event() is NEED_DATA
    r.receive(b"\r\n\r\n")
    with pytest.raises(HttpError):
        r.next_event()


@pytest.mark.parametrize("headers,status,code", [
    (b"Content-Length: 1\r\nContent-Length: 1", 400, "malformed_http"),
    (b"Host: y", 400, "malformed_http"),
    (b"Transfer-Encoding: chunked", 411, "length_required"),
    (b"Content-Length: -1", 400, "bad_content_length"),
    (b"Content-Length: 1e3", 400, "bad_content_length"),
    (b"Content-Length: 0x10", 400, "bad_content_length"),
    (b"Content-Length: 101", 413, "request_too_large"),
    (b"Content-Length: 99999999999999999999", 400, "bad_content_length"),
])
def test_framing_headers_that_could_desynchronise_the_stream_are_refused(headers: bytes, status: int,
                                                                           code: str) -> None:
    error = refused(b"POST / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n\r\n")
    assert (error.status, error.code) == (status, code)


def test_request_line_and_version() -> None:
    assert refused(b"GET / HTTP/2.0\r\n\r\n").status == 505
    assert refused(b"GET / FTP/1.0\r\n\r\n").status == 400
    for line in (b"GET  / HTTP/1.1", b"GET / HTTP/1.1 x", b"G(T / HTTP/1.1", b"\x00 / HTTP/1.1", b"GET /\xff HTTP/1.1"):
        assert refused(line + b"\r\n\r\n").code == "malformed_http", line


def test_limits_on_the_head() -> None:
    assert refused(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000).status == 431  # no end in sight and already too long
    many = b"".join(b"X-%d: a\r\n" % i for i in range(101))
    assert refused(b"GET / HTTP/1.1\r\n" + many + b"\r\n").status == 431


def test_values_are_trimmed_and_repeated_fields_joined() -> None:
    head = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: a \t\r\naccept:\tb\r\nEmpty:")
    assert head.headers["accept"] == "a, b" and head.headers["empty"] == ""


def test_keep_alive_follows_the_version_and_connection_header() -> None:
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive").keep_alive
