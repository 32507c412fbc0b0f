"""Hostile callers on the socket: no request ends the agent, one caller cannot starve the others.

The first tests run a real daemon; the fairness ones run its HTTP server alone, with a handler that
records the order it is asked in (an ordering, not a timing, is what they assert).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.http import Request, Response
from agent.daemon.limits import Limits
from tests.daemon.conftest import Daemon, http_server, read_all, read_response

HOSTILE_TARGETS = [b"//[", b"//", b"//x/v1/health", b"/[", b"/v1/keys/%zz/public", b"/v1/health#x", b"*",
                   b"http://[::1/v1/health", b"/v1/keys/%00/public", b"/v1/%ff/health", b"/v1/health?a=[",
                   b"/" + b"%" * 300]


def _status(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def test_request_targets_that_broke_the_url_parser_are_400_and_the_agent_goes_on(daemon: Daemon) -> None:
    for target in HOSTILE_TARGETS:
        status, body = _status(daemon.raw(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 400 and body["code"] == "malformed_http", target
        assert daemon.proc.poll() is None, target
    # The exact 21 bytes of the report, on a connection that then stays unanswered by nothing else.
    assert _status(daemon.raw(b"GET //[ HTTP/1.1\r\n\r\n"))[0] == 400
    assert daemon.client().health()["status"] == "alive"


def test_a_malformed_interaction_id_is_400_and_the_connection_goes_on(daemon: Daemon) -> None:
    with daemon.connect() as sock:
        for value in (b"not-a-uuid", b"'; DROP TABLE", b"1" * 200):
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nx-fapi-interaction-id: " + value + b"\r\n\r\n")
            status, headers, body = read_response(sock)
            assert status == 400 and json.loads(body)["code"] == "bad_interaction_id"
            assert headers["x-fapi-interaction-id"] != value.decode()
        given = "0F6B1D0C-6B2A-4E5F-9A1B-2C3D4E5F6A7B"
        sock.sendall(f"GET /v1/health HTTP/1.1\r\nHost: x\r\nx-fapi-interaction-id: {given}\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
        assert status == 200 and headers["x-fapi-interaction-id"] == given.lower()


@pytest.mark.parametrize("body", [b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 50 + b"1" + b"}" * 50,
                                  b'{"alg": "PS256", "data_b64": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}'])
def test_json_nested_too_deep_or_with_nan_is_400(daemon: Daemon, body: bytes) -> None:
    request = (b"POST /v1/keys/signing/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    status, error = _status(daemon.raw(request))
    assert status == 400 and error["code"] == "malformed_json", error


# -- fairness, on the server alone ----------------------------------------------------------------------------
class Recorder:
    """A handler that notes each path it answers, after a little work, with an answer of ``size`` bytes."""

    def __init__(self, size: int = 10) -> None:
        self.seen: list[str] = []
        self.size = size
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        time.sleep(0.0005)
        with self.lock:
            self.seen.append(request.path)
        return Response(200, b"x" * self.size, "text/plain")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def one_worker(tmp_path: Path, recorder: Recorder) -> Iterator[Path]:
    with http_server(tmp_path / "s.sock", recorder, Limits(workers=1, drain_timeout=1.0, log_successes=False,
                                                           write_timeout=120)) as path:
        yield path


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def test_a_pipelining_caller_that_never_reads_cannot_hold_the_only_worker(tmp_path: Path) -> None:
    # 64 KiB answers: the flood's socket buffer fills after a few, and a worker that waited for it to drain
    # (write_timeout, two minutes here) would leave the other caller unanswered.
    recorder = Recorder(size=64 << 10)
    limits = Limits(workers=1, drain_timeout=1.0, log_successes=False, write_timeout=120)
    with http_server(tmp_path / "s.sock", recorder, limits) as path, _connect(path) as flood, _connect(path) as other:
        flood.sendall(b"".join(b"GET /flood/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(500)))
        while len(recorder.seen) < 3:
            time.sleep(0.01)
        other.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(other)  # a blocked worker: the 30 s socket timeout fails the test
        assert status == 200 and len(body) == 64 << 10


def test_requests_of_two_callers_take_turns_on_the_worker(one_worker: Path, recorder: Recorder) -> None:
    with _connect(one_worker) as flood, _connect(one_worker) as other:
        flood.sendall(b"".join(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n" for _ in range(2000)))
        while len(recorder.seen) < 5:
            time.sleep(0.001)
        other.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(other)[0] == 200
        position = recorder.seen.index("/other")
        # Served within a couple of the flood's requests, not after the rest of its 2,000.
        assert position < len(recorder.seen) and recorder.seen[:position].count("/flood") < 50, position


def test_connections_beyond_a_callers_share_are_refused_and_others_still_connect(tmp_path: Path) -> None:
    limits = Limits(workers=1, drain_timeout=1.0, connections_per_uid=3, max_connections=100)
    with http_server(tmp_path / "s.sock", Recorder(), limits) as path:
        idle = [_connect(path) for _ in range(3)]
        time.sleep(0.2)
        with _connect(path) as extra:
            status, body = _status(read_all(extra))
        assert status == 503 and body["code"] == "too_many_connections" and "already has 3" in str(body["message"])
        idle.pop().close()
        time.sleep(0.2)
        with _connect(path) as again:
            again.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(again).startswith(b"HTTP/1.1 200 ")
        for sock in idle:
            sock.close()


def test_a_caller_no_rule_names_gets_a_small_quota(tmp_path: Path) -> None:
    limits = Limits(workers=2, drain_timeout=1.0, stranger_connections=2, stranger_in_flight=1)
    with http_server(tmp_path / "s.sock", Recorder(), limits, known=lambda peer: False) as path:
        first, second = _connect(path), _connect(path)
        time.sleep(0.2)
        with _connect(path) as third:
            status, body = _status(read_all(third))
        assert status == 503 and "health" in str(body["hint"])
        first.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(first)[0] == 200
        first.close()
        second.close()
