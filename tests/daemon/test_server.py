"""The HTTP server on its own (a real Unix socket, a handler that only answers): how workers are shared."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import parse
from agent.daemon.http import HttpError, Request, Response
from agent.daemon.limits import Limits
from agent.daemon.settings import DaemonSettings
from agent.errors import ConfigError
from tests.daemon.conftest import http_server, read_response, running_server

LINGER = 30.0  # far longer than the test may take: a request that waits it out fails the test


@pytest.fixture(params=[0.0, LINGER], ids=["sleeping", "busy-polling"])
def one_worker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """One worker that lingers on its last client: asleep, or busy polling all the while."""
    def answer(request: Request) -> Response:
        return Response.json(200, {"path": request.path})

    with http_server(tmp_path / "s.sock", answer, Limits(workers=1, linger=LINGER, busy_poll=request.param,
                                                          drain_timeout=1.0)) as path:
        yield path


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


def test_signing_goes_on_while_an_operators_long_step_runs_on_the_only_worker(tmp_path: Path) -> None:
    # One worker per serving process is the default: a step that generates a key (seconds on some HSMs) must not
    # hold every caller's signatures behind it.
    step_started, step_may_end = threading.Event(), threading.Event()

    def answer(request: Request) -> Response:
        if request.path == "/step":
            step_started.set()
            step_may_end.wait(30)
        return Response.json(200, {"path": request.path})

    limits = Limits(workers=1, in_flight_per_uid=2, drain_timeout=1.0, log_successes=False)
    with http_server(tmp_path / "s.sock", answer, limits, routine=lambda request: request.path != "/step") as path, \
            socket.socket(socket.AF_UNIX) as operator, socket.socket(socket.AF_UNIX) as service:
        operator.settimeout(30)
        service.settimeout(5)  # signatures held behind the step would time out here
        operator.connect(str(path))
        service.connect(str(path))
        operator.sendall(b"GET /step HTTP/1.1\r\nHost: x\r\n\r\n")
        assert step_started.wait(10)
        assert [_ask(service, f"/sign/{n}") for n in range(3)] == ["/sign/0", "/sign/1", "/sign/2"]
        step_may_end.set()
        status, _, body = read_response(operator)
        assert status == 200 and json.loads(body) == {"path": "/step"}


def test_a_request_stuck_on_the_io_thread_is_answered_and_a_new_io_thread_serves_the_rest(tmp_path: Path) -> None:
    # With one worker the I/O thread answers routine requests itself: a token call that hangs there must not stop
    # the loop. The session pool's watch thread answers for it at call_timeout (answer_for), as here.
    stuck_on: list[int] = []
    hanging, released = threading.Event(), threading.Event()

    def answer(request: Request) -> Response:
        if request.path == "/hangs":
            stuck_on.append(threading.get_ident())
            hanging.set()
            released.wait(30)
        return Response.json(200, {"path": request.path})

    with running_server(tmp_path / "s.sock", answer, Limits(workers=1, drain_timeout=1.0)) as server, \
            socket.socket(socket.AF_UNIX) as stuck, socket.socket(socket.AF_UNIX) as other:
        stuck.settimeout(10)
        other.settimeout(10)
        stuck.connect(str(tmp_path / "s.sock"))
        stuck.sendall(b"GET /hangs HTTP/1.1\r\nHost: x\r\n\r\n")
        assert hanging.wait(10)
        server.answer_for(stuck_on[0], HttpError(503, "token_unavailable", "the token did not answer within 0.5s"))
        assert read_response(stuck)[0] == 503
        other.connect(str(tmp_path / "s.sock"))  # accepted and answered while the old thread is still stuck
        assert [_ask(other, f"/after/{n}") for n in range(3)] == ["/after/0", "/after/1", "/after/2"]
        released.set()  # the stuck call returns: its late answer is dropped, the new thread goes on
        assert _ask(other, "/later") == "/later"


def _busy_poll(tmp_path: Path, daemon: dict[str, object]) -> float:
    return DaemonSettings.parse(parse({"state": {"dir": str(tmp_path)}, "daemon": daemon})).limits.busy_poll


def test_busy_poll_is_set_in_microseconds_and_zero_turns_it_off(tmp_path: Path) -> None:
    assert _busy_poll(tmp_path, {}) == pytest.approx(50e-6)
    assert _busy_poll(tmp_path, {"busy_poll_us": 0}) == 0
    assert _busy_poll(tmp_path, {"busy_poll_us": 1000}) == pytest.approx(1e-3)


@pytest.mark.parametrize("value,message", [
    (-1, "busy_poll_us must be from 0 to 1000, got -1"),
    (5000, "busy_poll_us must be from 0 to 1000, got 5000"),
    (2.5, "busy_poll_us must be a whole number, got 2.5"),
    ("50", "busy_poll_us must be a whole number, got '50'"),
])
def test_bad_busy_poll_says_what_is_allowed(tmp_path: Path, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _busy_poll(tmp_path, {"busy_poll_us": value})


@pytest.mark.parametrize("log_successes,logged", [(True, [200, 404]), (False, [404])], ids=["all", "failures"])
def test_request_log_failures_only_leaves_out_the_answered_requests(tmp_path: Path, log_successes: bool,
                                                                   logged: list[int]) -> None:
    def answer(request: Request) -> Response:
        if request.path != "/ok":
            raise HttpError(404, "not_found", f"no endpoint {request.path}")
        return Response.json(200, {"path": request.path})

    limits = Limits(workers=1, drain_timeout=1.0, log_successes=log_successes)
    with capture_logs() as logs, http_server(tmp_path / "s.sock", answer, limits) as path:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            for target, status in (("/ok", 200), ("/missing", 404)):
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert read_response(sock)[0] == status
        deadline = time.monotonic() + 10  # the 404's line, written after its answer, comes last
        while not any(line.get("status") == 404 for line in logs) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [line["status"] for line in logs if line["event"] == "request"] == logged


def _request_log(tmp_path: Path, daemon: dict[str, object]) -> bool:
    return DaemonSettings.parse(parse({"state": {"dir": str(tmp_path)}, "daemon": daemon})).limits.log_successes


def test_request_log_is_all_by_default_and_failures_leaves_successes_out(tmp_path: Path) -> None:
    assert _request_log(tmp_path, {}) is True
    assert _request_log(tmp_path, {"request_log": "all"}) is True
    assert _request_log(tmp_path, {"request_log": "failures"}) is False


@pytest.mark.parametrize("value,message", [
    ("none", "request_log must be one of 'all', 'failures', got 'none'"),
    (False, "request_log must be a non-empty string"),
])
def test_bad_request_log_says_what_is_allowed(tmp_path: Path, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _request_log(tmp_path, {"request_log": value})
