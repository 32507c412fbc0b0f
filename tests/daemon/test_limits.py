"""Bad input and overload on the socket: every case answered or refused cleanly; valid clients keep working."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from tests.daemon.conftest import Daemon, read_all, read_response


def _status(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def test_malformed_http_is_400_with_code(daemon: Daemon) -> None:
    for garbage in (b"HELLO\r\n\r\n", b"GET /v1/health HTTP/1.1\r\nNo colon here\r\n\r\n",
                    b"GET nopath HTTP/1.1\r\n\r\n", b"\x00\xff\xfe junk\r\n\r\n"):
        status, body = _status(daemon.raw(garbage))
        assert status == 400 and body["code"] == "malformed_http", garbage
    status, body = _status(daemon.raw(b"GET /v1/health HTTP/2.0\r\n\r\n"))
    assert status == 505 and body["code"] == "unsupported_http_version"


def test_malformed_json_and_fields(daemon: Daemon) -> None:
    cases = [(b"{not json", "malformed_json"), (b"[1, 2]", "malformed_json"), (b"{}", "missing_field"),
             (b'{"alg": "PS256", "data_b64": "%%%"}', "bad_base64"),
             (b'{"alg": "XX999", "data_b64": "aGk="}', "algorithm_not_allowed")]
    for body, code in cases:
        request = (b"POST /v1/keys/signing/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        status, error = _status(daemon.raw(request))
        assert error["code"] == code and status in (400, 403), (body, error)
        assert error["message"] and error["interaction_id"]


def test_huge_body_is_413_before_it_is_read(daemon: Daemon) -> None:
    with daemon.connect() as sock:
        sock.sendall(b"POST /v1/keys/signing/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        status, body = _status(read_all(sock))
    assert status == 413 and body["code"] == "request_too_large"
    status, body = _status(daemon.raw(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"))
    assert status == 431


@pytest.mark.parametrize("answered_first", [False, True], ids=["first-request", "after-a-keep-alive-answer"])
def test_half_sent_request_times_out_with_408_and_holds_no_worker(daemon: Daemon, answered_first: bool) -> None:
    # More stalled clients than workers (4): if a stalled client held a worker, health would hang. After a
    # keep-alive answer the worker waits a moment for the next request itself: a half one must go back too.
    stalled = [daemon.connect() for _ in range(8)]
    for sock in stalled:
        if answered_first:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
        sock.sendall(b"POST /v1/keys/signing/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"al")
    assert daemon.client().health()["status"] == "alive"
    for sock in stalled:
        status, body = _status(read_all(sock))
        assert status == 408 and body["code"] == "request_timeout"
        sock.close()


def test_thousand_connections_at_once_while_a_client_keeps_signing(daemon: Daemon) -> None:
    client = daemon.client()
    client.health()  # its keep-alive connection is open before the flood
    sockets = []
    for _ in range(1000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(daemon.socket_path))
        sockets.append(sock)
    assert client.sign("signing", b"still served", "PS256")
    for sock in sockets:
        with contextlib.suppress(BrokenPipeError):  # refused at accept: the 503 is already waiting to be read
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    statuses: dict[int, int] = {}
    for sock in sockets:
        raw = read_all(sock)
        status = int(raw.split()[1])
        statuses[status] = statuses.get(status, 0) + 1
        if status == 503:
            assert b"Retry-After: 1" in raw and b"too_many_connections" in raw
        sock.close()
    assert set(statuses) <= {200, 503} and sum(statuses.values()) == 1000
    assert statuses.get(503, 0) > 0  # max_connections is 64 in the test config
    assert client.sign("signing", b"still served after", "PS256")
    assert client.ready()["ready"]


def test_idle_keep_alive_connection_is_closed_and_client_reconnects(daemon: Daemon) -> None:
    client = daemon.client()
    client.health()
    with daemon.connect() as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    time.sleep(0.1)
    assert client.health()["status"] == "alive"


def test_keep_alive_requests_pipelined_or_split_are_answered_in_order(daemon: Daemon) -> None:
    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    missing = b"GET /v1/nothing-here HTTP/1.1\r\nHost: x\r\n\r\n"
    with daemon.connect() as sock:
        sock.sendall(health)
        assert read_response(sock)[0] == 200
        sock.sendall(health + missing + health)  # pipelined: answered one by one, in order
        assert [read_response(sock)[0] for _ in range(3)] == [200, 404, 200]
        sock.sendall(missing[:12])  # the next request in two parts, the second long after the worker moved on
        time.sleep(0.2)
        sock.sendall(missing[12:])
        assert read_response(sock)[0] == 404

