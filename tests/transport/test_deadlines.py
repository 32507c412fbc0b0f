"""The watchdog that ends a bank request at its total deadline (agent/transport/exchange.py), on real sockets.

It is not woken for each request (deadlines come one request_timeout after each start, so a new one is almost
never the earliest); these check that every exchange is still cut on time, whichever order the deadlines come in,
and that the exchanges that ended leave nothing behind.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.transport.exchange import Exchange, Watchdog


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    dog = Watchdog("test")
    yield dog
    dog.close()


def cut_within(sock: socket.socket, seconds: float) -> None:
    """A read on ``sock`` returns because the watchdog shut it down, within ``seconds`` (else a timeout)."""
    sock.settimeout(seconds)
    assert sock.recv(1) == b""  # shut down: end of file


def test_an_exchange_due_after_the_one_the_watchdog_sleeps_for_is_cut_at_its_own_deadline(
        watchdog: Watchdog) -> None:
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    with first, first_peer, second, second_peer, watchdog.guard(Exchange(time.monotonic() + 0.3, sock=first)), \
            watchdog.guard(Exchange(time.monotonic() + 2.0, sock=second)) as later:
        cut_within(first, 5)
        assert not later.expired  # cut at its own deadline, not with the first one
        cut_within(second, 5)  # the watchdog was not woken for it: it still cuts it
        assert later.expired


def test_an_exchange_due_before_the_one_the_watchdog_sleeps_for_wakes_it(watchdog: Watchdog) -> None:
    slow, slow_peer = socket.socketpair()
    quick, quick_peer = socket.socketpair()
    with slow, slow_peer, quick, quick_peer, watchdog.guard(Exchange(time.monotonic() + 30, sock=slow)) as waiting:
        time.sleep(0.1)  # the watchdog now sleeps until 30 s from now
        with watchdog.guard(Exchange(time.monotonic() + 0.3, sock=quick)) as due:
            cut_within(quick, 5)  # not 30 s
            assert due.expired
        assert not waiting.expired


def test_exchanges_that_ended_leave_no_entry_behind_while_a_slow_one_is_under_way(watchdog: Watchdog) -> None:
    """Memory: a bank request held for its whole timeout must not keep an entry for every request after it."""
    slow, slow_peer = socket.socketpair()
    with slow, slow_peer, watchdog.guard(Exchange(time.monotonic() + 30, sock=slow)):
        for _ in range(10_000):
            with watchdog.guard(Exchange(time.monotonic() + 30)):
                pass
        assert len(watchdog._heap) < 200
    assert not watchdog._heap


def switches(thread_id: int | None) -> int:
    text = Path(f"/proc/self/task/{thread_id}/status").read_text()
    status = dict(line.split(":", 1) for line in text.splitlines())
    return int(status["voluntary_ctxt_switches"])


def test_the_watchdog_thread_sleeps_through_requests_that_end_before_their_deadline(watchdog: Watchdog) -> None:
    """Each wake-up of its thread took the interpreter lock from the request's thread, twice per bank call."""
    with watchdog.guard(Exchange(time.monotonic() + 30)):
        pass
    time.sleep(0.1)  # the thread has started and sleeps
    assert watchdog._thread is not None
    before = switches(watchdog._thread.native_id)
    for _ in range(1_000):
        with watchdog.guard(Exchange(time.monotonic() + 30)):
            time.sleep(0)  # what a request does meanwhile: the thread could run
    assert switches(watchdog._thread.native_id) - before < 20
