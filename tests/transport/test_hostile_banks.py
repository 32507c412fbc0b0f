"""Banks that answer too much, too slowly, or close a pooled connection under a request: every request to a bank
is bounded in size, in total time and in number at once, and is sent again only when that is safe."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.runtime import Runtime
from agent.transport import errors
from agent.transport.client import BankTransport, open_transport
from tests.transport.conftest import TestCa, client_identity, settings_for
from tests.transport.hostile import HostileBank, Peer, Seen, closes_reused, drip, echo, held, huge, idle_closer, rss_kb

MB = 1 << 20


@pytest.fixture(scope="module")
def key(shared_runtime: Runtime, bank_ca: TestCa) -> str:
    return client_identity(shared_runtime, bank_ca)


@pytest.fixture
def make(shared_runtime: Runtime, bank_ca: TestCa, key: str) -> Iterator[Any]:
    """``make(**settings) -> BankTransport`` with a token-held client key."""
    made: list[BankTransport] = []

    def build(**settings: Any) -> BankTransport:
        made.append(open_transport(shared_runtime, settings_for("bank1", bank_ca, key, **settings)))
        return made[-1]

    yield build
    for transport in made:
        transport.close()


# -- item 2: answers are read up to a limit ------------------------------------------------------------------------

@pytest.mark.parametrize("declare", [False, True], ids=["chunked", "content-length"])
def test_a_300_mb_answer_is_cut_at_the_limit_with_flat_memory(make: Any, hostile: HostileBank, declare: bool) -> None:
    transport = make()
    hostile.answer = huge(300 * MB, declare=declare)
    before = rss_kb()
    with pytest.raises(errors.ResponseTooLargeError) as caught:
        transport.get(hostile.url("/huge"))
    grown_mb = (rss_kb() - before) / 1024
    assert "bank 'bank1'" in str(caught.value) and f"max_response_bytes = {4 * MB}" in str(caught.value)
    assert "max_response_bytes" in caught.value.hint
    assert grown_mb < 32, f"RSS grew by {grown_mb:.0f} MB"  # before: by the whole answer, 300 MB and more
    assert hostile.bytes_sent < 64 * MB  # the rest was never read: the connection was dropped, not drained
    hostile.answer = echo
    assert transport.get(hostile.url("/after")).status == 200


def test_the_limit_is_per_bank_and_discovery_has_a_smaller_one(make: Any, hostile: HostileBank) -> None:
    transport = make(max_response_bytes=MB, max_discovery_bytes=300 << 10)
    hostile.answer = huge(MB)
    assert len(transport.get(hostile.url("/exactly-the-limit")).body) == MB
    hostile.answer = huge(400 << 10)
    with pytest.raises(errors.ResponseTooLargeError, match=f"max_discovery_bytes = {300 << 10}"):
        transport.get(hostile.url("/.well-known/openid-configuration"), limit="max_discovery_bytes")
    hostile.answer = huge(200 << 10)
    assert len(transport.get(hostile.url("/.well-known/openid-configuration"), limit="max_discovery_bytes").body) \
        == 200 << 10


# -- item 3: a total deadline, and a limit on requests in flight ---------------------------------------------------

@pytest.mark.parametrize("path", ["/head", "/post"])
def test_a_bank_that_drips_its_answer_meets_the_total_deadline(make: Any, hostile: HostileBank, path: str) -> None:
    # Each byte comes well within read_timeout: only a total deadline ends this.
    transport = make(read_timeout=2, request_timeout=1.5)
    hostile.answer = drip(seconds=20, every=0.1)
    started = time.monotonic()
    with pytest.raises(errors.RequestDeadlineError) as caught:
        transport.request("GET" if path == "/head" else "POST", hostile.url(path), body=b"{}")
    took = time.monotonic() - started
    assert "request_timeout = 1.5 s" in str(caught.value) and "bank 'bank1'" in str(caught.value)
    assert took < 10, f"took {took:.1f} s"  # before: the whole 20 s drip
    assert len(hostile.requests) == 1  # a deadline is not a reason to send again
    hostile.answer = echo
    assert transport.get(hostile.url("/after")).status == 200


def test_a_bank_that_never_finishes_the_handshake_meets_the_deadline(make: Any) -> None:
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        transport = make(connect_timeout=30, request_timeout=1)
        started = time.monotonic()
        with pytest.raises(errors.RequestDeadlineError):
            transport.get(f"https://localhost:{silent.getsockname()[1]}/x")
        assert time.monotonic() - started < 10


def test_a_bank_gets_at_most_max_in_flight_requests_at_once(make: Any, hostile: HostileBank) -> None:
    transport = make(max_in_flight=2)
    release = threading.Event()
    hostile.answer = held(release)
    with ThreadPoolExecutor(2) as pool:
        holding = [pool.submit(transport.get, hostile.url(f"/slow{i}")) for i in range(2)]
        deadline = time.monotonic() + 10
        while len(hostile.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(errors.BankBusyError) as caught:
            transport.get(hostile.url("/third"))
        assert time.monotonic() - started < 3  # refused within BUSY_PATIENCE, not queued behind the slow ones
        assert "max_in_flight" in str(caught.value) and "bank 'bank1'" in str(caught.value)
        assert len(hostile.requests) == 2
        release.set()
        assert [f.result(timeout=20).status for f in holding] == [200, 200]
    assert transport.get(hostile.url("/after")).status == 200  # slots come back


def test_a_busy_but_quick_bank_serves_more_callers_than_max_in_flight(make: Any, hostile: HostileBank) -> None:
    transport = make(max_in_flight=2)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: transport.get(hostile.url(f"/quick{i}")).status, range(40)))
    assert statuses == [200] * 40  # the ones over the limit waited a moment for a place


# -- item 5: a bank closing an idle keep-alive connection -----------------------------------------------------------

def test_the_banks_keep_alive_timeout_is_honoured(make: Any, hostile: HostileBank) -> None:
    transport = make()
    hostile.answer = idle_closer(timeout=1.0)  # sends Keep-Alive: timeout=1 and cuts a request after 1 s idle
    assert transport.post(hostile.url("/par"), body=b"{}").status == 200
    time.sleep(0.2)
    assert transport.post(hostile.url("/par"), body=b"{}").json() == {"connection": 1}  # reused within the limit
    time.sleep(1.2)
    # Before: sent on the old connection, cut by the bank, lost (a POST is not sent again).
    assert transport.post(hostile.url("/par"), body=b"{}").json() == {"connection": 2}
    assert [s.connection for s in hostile.requests] == [1, 1, 2]


def test_the_configured_idle_limit_applies_without_a_keep_alive_header(make: Any, hostile: HostileBank) -> None:
    transport = make(idle_timeout=0.5)
    hostile.answer = idle_closer(timeout=0.8, announce=False)
    assert transport.post(hostile.url("/par"), body=b"{}").status == 200
    time.sleep(1.0)
    assert transport.post(hostile.url("/par"), body=b"{}").json() == {"connection": 2}


def test_a_get_cut_on_a_reused_connection_is_sent_again_on_a_new_one(make: Any, hostile: HostileBank) -> None:
    transport = make()
    hostile.answer = closes_reused(read_body=True)
    assert transport.get(hostile.url("/a")).status == 200
    assert transport.get(hostile.url("/b")).json() == {"connection": 2}
    assert [(s.path, s.connection) for s in hostile.requests] == [("/a", 1), ("/b", 1), ("/b", 2)]


def test_a_post_that_may_have_landed_is_not_sent_again(make: Any, hostile: HostileBank) -> None:
    transport = make()
    hostile.answer = closes_reused(read_body=True)
    assert transport.post(hostile.url("/par"), body=b"{}").status == 200
    with pytest.raises(errors.ConnectionLostError) as caught:
        transport.post(hostile.url("/par"), body=b'{"n":2}', interaction_id="iid-maybe")
    assert "iid-maybe" in caught.value.hint
    assert [(s.body, s.connection) for s in hostile.requests] == [(b"{}", 1), (b'{"n":2}', 1)]  # once, not twice


def test_a_post_cut_before_it_was_sent_whole_is_sent_again(make: Any, hostile: HostileBank) -> None:
    transport = make()
    hostile.answer = closes_reused(read_body=False)  # cut after the head: the body is still on its way
    assert transport.post(hostile.url("/small"), body=b"{}").status == 200
    body = b"x" * (16 * MB)  # more than the socket buffers hold, so the write itself fails
    answer = transport.post(hostile.url("/big"), body=body)
    assert answer.json() == {"connection": 2}
    assert [(s.path, s.connection, len(s.body)) for s in hostile.requests] == \
        [("/small", 1, 2), ("/big", 1, 0), ("/big", 2, len(body))]


def cut_in_the_head(peer: Peer, seen: Seen) -> bool:
    """Header lines, then the end of the connection: no blank line, no body."""
    peer.read_body(seen)
    with contextlib.suppress(OSError):
        peer.sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Part: 1\r\n")
    return False


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_answer_whose_head_is_cut_short_is_an_error_not_an_empty_answer(make: Any, hostile: HostileBank,
                                                                            method: str) -> None:
    # http.client reads header lines until a blank line *or the end of the stream*: a bank (or a proxy) dying
    # there looked like "201 Created" with an empty body, which a registration would have taken as done.
    transport = make()
    hostile.answer = cut_in_the_head
    with pytest.raises(errors.ConnectionLostError, match="middle of its answer's head"):
        transport.request(method, hostile.url("/tpp-registration"), body=b"{}" if method == "POST" else None)
    hostile.answer = echo
    assert transport.get(hostile.url("/after")).status == 200  # and the transport goes on


# -- the log line of each bank call ---------------------------------------------------------------------------------

def refused(peer: Peer, seen: Seen) -> bool:
    peer.read_body(seen)
    peer.send(404, b'{"error": "not_found"}')
    return True


@pytest.mark.parametrize("log_successes,logged", [(True, [200, 404]), (False, [404])], ids=["all", "failures"])
def test_a_bank_call_gets_a_log_line_unless_the_agent_logs_failures_only(
        shared_runtime: Runtime, make: Any, hostile: HostileBank, monkeypatch: pytest.MonkeyPatch,
        log_successes: bool, logged: list[int]) -> None:
    """``[daemon] request_log = "failures"``: a bank's 2xx is no line (the call is in the audit trail), its 4xx is."""
    monkeypatch.setattr(shared_runtime, "log_bank_successes", log_successes)
    transport = make()
    with capture_logs() as logs:
        assert transport.get(hostile.url("/fine")).status == 200
        hostile.answer = refused
        assert transport.get(hostile.url("/missing")).status == 404
    assert [line["status"] for line in logs if line["event"] == "http.request"] == logged
