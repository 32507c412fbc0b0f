"""One attempt at a request to a bank, as the socket layer sees it, and the deadline that ends it.

    with watchdog.guard(Exchange(deadline=time.monotonic() + 30)) as exchange:
        ...  urllib3 sends and reads; our socket reports to ``current()`` ...
    exchange.expired, exchange.sent_whole, exchange.reused

A socket timeout bounds one ``recv``; a bank that sends a byte now and then resets it every
time and holds the caller (and a bank worker) for as long as it likes. So each request has a
total deadline, and the :class:`Watchdog`'s one thread shuts down the socket of any exchange
still under way when its deadline passes: a read or write blocked anywhere (TLS handshake,
status line, headers, body) returns at once, whatever urllib3 or http.client are doing.

The socket layer (``pool.py``) learns which exchange it serves from :func:`current`: urllib3
and http.client pass no context down, and each request runs on its caller's thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import socket
import threading
import time
from collections.abc import Iterator

# The exchange under way on each thread (see the module docstring: nothing else reaches the socket layer).
_local = threading.local()


@dataclasses.dataclass(eq=False)
class Exchange:
    deadline: float                    # time.monotonic()
    sock: socket.socket | None = None  # the raw socket in use, once there is one
    reused: bool = False               # on a connection that served a request before
    reading: bool = False              # reading the answer: http.client reads once it has sent everything
    send_failed: bool = False          # a write failed (urllib3 then reads what the bank may have answered)
    expired: bool = False              # the watchdog cut it

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def sent_whole(self) -> bool:
        """The whole request went out: the bank may have acted on it."""
        return self.reading and not self.send_failed


def current() -> Exchange | None:
    return getattr(_local, "exchange", None)


def use_socket(sock: socket.socket) -> None:
    """The current exchange now runs on ``sock``; cut at once if its deadline has passed meanwhile."""
    exchange = current()
    if exchange is not None and exchange.sock is not sock:
        exchange.sock = sock
        if exchange.expired:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing left to stop
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Cuts the socket of every exchange still under way at its deadline. One thread, started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._heap: list[tuple[float, int, Exchange]] = []
        self._armed: set[Exchange] = set()
        self._counter = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wakes_at = math.inf  # when the thread wakes by itself next: an exchange due later needs no wake-up

    @contextlib.contextmanager
    def guard(self, exchange: Exchange) -> Iterator[Exchange]:
        """``exchange`` is current on this thread and watched until the block ends."""
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"deadline-{self._name}", daemon=True)
                self._thread.start()
            self._counter += 1
            heapq.heappush(self._heap, (exchange.deadline, self._counter, exchange))
            self._armed.add(exchange)
            # Deadlines are the bank's one request_timeout after each start, so a new one is almost never the
            # earliest: waking the thread for every request cost a thread switch and the interpreter lock twice.
            if exchange.deadline < self._wakes_at:
                self._wake.notify()
        _local.exchange = exchange
        try:
            yield exchange
        finally:
            _local.exchange = None
            with self._wake:  # after this, the watchdog never touches the socket (it may go back to the pool)
                self._armed.discard(exchange)
                exchange.sock = None
                self._forget_ended()

    def _forget_ended(self) -> None:
        """Drop the entries of exchanges that ended (under the lock): those at the front of the heap, and all of
        them when they outnumber the ones under way (one slow request must not keep every later one's entry)."""
        heap = self._heap
        while heap and heap[0][2] not in self._armed:
            heapq.heappop(heap)
        if len(heap) > 2 * len(self._armed) + 64:
            self._heap = [entry for entry in heap if entry[2] in self._armed]
            heapq.heapify(self._heap)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2] not in self._armed):
                    _, _, exchange = heapq.heappop(self._heap)
                    if exchange in self._armed:
                        exchange.expired = True
                        self._armed.discard(exchange)
                        if exchange.sock is not None:
                            _cut(exchange.sock)
                self._wakes_at = self._heap[0][0] if self._heap else math.inf
                self._wake.wait(self._wakes_at - now if self._heap else None)
