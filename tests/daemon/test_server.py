"""The HTTP server on its own (a real Unix socket, a handler that only answers): how workers are shared."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.http import Request, Response
from agent.daemon.server import Limits, Server
from tests.daemon.conftest import read_response

LINGER = 30.0  # far longer than the test may take: a request that waits it out fails the test


@pytest.fixture
def one_worker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def answer(request: Request) -> Response:
        return Response.json(200, {"path": request.path})

    server = Server(listener, answer, Limits(workers=1, linger=LINGER, drain_timeout=1.0))
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield path
    server.stop()
    thread.join(10)
    listener.close()


def _ask(sock: socket.socket, path: str) -> str:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, body = read_response(sock)
    assert status == 200
    return str(json.loads(body)["path"])


def test_a_worker_waiting_on_its_last_client_serves_another_client_at_once(one_worker: Path) -> None:
    with socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
        first.connect(str(one_worker))
        second.connect(str(one_worker))
        assert _ask(first, "/a") == "/a"  # the only worker now lingers on `first`
        started = time.monotonic()
        assert _ask(second, "/b") == "/b"
        assert time.monotonic() - started < LINGER / 3
        assert _ask(first, "/c") == "/c"  # and `first` is still served
