"""Each bank's places for requests in flight (``max_in_flight``), counted for the whole agent.

    places = BankPlaces()                  # before the serving processes are forked: they share it
    with places.hold("bank1", 4, url, interaction_id):   # else BankBusyError
        ...                                # the request, or a wait for another caller's answer

With ``[daemon] processes = N`` the serving processes share one table, so a slow bank holds at most
``max_in_flight`` bank workers in all, not N times that. The table is memory the supervisor maps before it
forks (a memfd, ``MAP_SHARED``): one row per bank (keyed by the SHA-256 of its name, so any name fits and a bank
a reload added gets a row like the others), one entry per place held: who holds it (pid, and the process's start
time so that a pid used again is not taken for its old holder) and since when (``CLOCK_MONOTONIC``, one clock for
every process). It is locked with a POSIX record lock (``fcntl``), which the kernel drops when its holder dies:
a serving process killed with SIGKILL leaves no lock behind, and the places it held are taken back by the next
request that finds the bank full. A row with no place held carries no state and serves the next bank that
needs one.

A request over the limit waits at most :data:`BUSY_PATIENCE` for a place, and not at all once the places have
been held that long (a slow bank): a flood of requests to it keeps no worker waiting. A place freed in this
process wakes its waiters at once, one freed in another is seen within :data:`_POLL` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator

from agent.transport import errors

# Longer than a healthy bank takes to answer: a request over the bank's max_in_flight waits this long at most for
# a place, and not at all once the requests holding them have been under way for this long.
BUSY_PATIENCE = 0.5
MOST_PLACES = 256  # max_in_flight's upper bound ([banks.NAME], agent/transport/tls.py)
# Banks with requests in flight at once, in all processes. A row is in use only while a place in it is held, by a
# thread: more than this many banks under way at once would need more bank workers than any host runs.
ROWS = 512
_POLL = 0.02  # how soon a waiter sees a place another process freed
_HEAD = struct.Struct("=32sI")  # the bank's key, how many places are held (entries packed at the row's start)
_ENTRY = struct.Struct("=iIQd")  # pid, ticket, the holder's start time (clock ticks since boot), taken since
_ROW = _HEAD.size + MOST_PLACES * _ENTRY.size


class BankPlaces:
    """The table; ``rows``: how many banks may have requests in flight at once."""

    def __init__(self, rows: int = ROWS) -> None:
        self.rows = rows
        self._fd = os.memfd_create("tpp-agent-bank-places")
        os.ftruncate(self._fd, rows * _ROW)  # zeroes: every row free
        self._map = mmap.mmap(self._fd, rows * _ROW)
        # POSIX record locks exclude other processes, not this one's threads: those take this first. The
        # condition wakes this process's waiters when one of its places is freed.
        self._freed = threading.Condition()
        self._tickets = itertools.count(1)
        self._row_of: dict[bytes, int] = {}  # where each bank's row was last found (checked under the lock)
        self._holding = threading.local()  # the banks this thread holds a place at
        self._me = (0, 0)  # (pid, start time) of this process, read again after a fork

    @contextlib.contextmanager
    def hold(self, bank: str, limit: int, what: str = "-", interaction_id: str = "-") -> Iterator[None]:
        """One of ``bank``'s ``limit`` places for this thread until the block ends, else
        :class:`~agent.transport.errors.BankBusyError`. A thread that holds one there already (an operation that
        waits for another's answer before it sends, as the token cache does) uses it again."""
        mine: set[str] = self._holding.__dict__.setdefault("banks", set())
        if bank in mine:
            yield
            return
        key = hashlib.sha256(bank.encode("utf-8", "surrogatepass")).digest()
        row, ticket = self._take(key, bank, min(limit, MOST_PLACES), what, interaction_id)
        mine.add(bank)
        try:
            yield
        finally:
            mine.discard(bank)
            self._give_back(row, ticket)

    def held(self, bank: str) -> int:
        """Places held at ``bank`` now, by living processes."""
        key = hashlib.sha256(bank.encode("utf-8", "surrogatepass")).digest()
        with self._locked():
            row = self._find(key, claim=False)
            return 0 if row is None else len(self._living(row, reclaim=True))

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    # -- under the lock ------------------------------------------------------
    def _take(self, key: bytes, bank: str, limit: int, what: str, interaction_id: str) -> tuple[int, int]:
        # A bank whose places are all held by quick requests is busy, not slow: wait a moment for one. Once they
        # have been held for BUSY_PATIENCE, the bank is slow: refuse at once.
        give_up = time.monotonic() + BUSY_PATIENCE
        while True:
            with self._locked():
                row = self._find(key, claim=True)
                if row is None:
                    raise errors.BankBusyError(f"{self.rows} banks already have requests under way", bank=bank,
                                               url=what, interaction_id=interaction_id)
                entries = self._entries(row)
                if len(entries) >= limit:  # only then is it worth asking whether their holders still live
                    entries = self._living(row, reclaim=True)
                now = time.monotonic()
                if len(entries) < limit:
                    ticket = next(self._tickets) & 0xFFFFFFFF
                    pid, started = self._identity()
                    _ENTRY.pack_into(self._map, row + _HEAD.size + len(entries) * _ENTRY.size,
                                     pid, ticket, started, now)
                    _HEAD.pack_into(self._map, row, key, len(entries) + 1)
                    return row, ticket
                oldest = min(taken for _, _, _, taken in entries)
            if now - oldest >= BUSY_PATIENCE or now >= give_up:
                raise errors.BankBusyError(
                    f"{len(entries)} requests are already under way at this bank, the oldest for "
                    f"{now - oldest:.1f} s (max_in_flight)", bank=bank, url=what, interaction_id=interaction_id)
            with self._freed:
                self._freed.wait(max(0.0, min(give_up, oldest + BUSY_PATIENCE, now + _POLL) - now))

    def _give_back(self, row: int, ticket: int) -> None:
        pid, _ = self._identity()
        with self._locked():
            entries = self._entries(row)
            kept = [entry for entry in entries if (entry[0], entry[1]) != (pid, ticket)]
            self._store(row, kept)
        with self._freed:
            self._freed.notify()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._freed:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _find(self, key: bytes, claim: bool) -> int | None:
        """The offset of the bank's row; with ``claim``, a free one made its own if it has none."""
        known = self._row_of.get(key)
        if known is not None and self._map[known:known + len(key)] == key:
            return known
        free: int | None = None
        for offset in range(0, self.rows * _ROW, _ROW):
            found, count = _HEAD.unpack_from(self._map, offset)
            if found == key:
                self._row_of[key] = offset
                return offset
            if free is None and count == 0:
                free = offset
        if not claim:
            return None
        if free is None:  # rows whose holders all died: the first one emptied is ours
            free = next((offset for offset in range(0, self.rows * _ROW, _ROW)
                         if not self._living(offset, reclaim=True)), None)
            if free is None:
                return None
        _HEAD.pack_into(self._map, free, key, 0)
        self._row_of[key] = free
        return free

    def _entries(self, row: int) -> list[tuple[int, int, int, float]]:
        _, count = _HEAD.unpack_from(self._map, row)
        start = row + _HEAD.size
        return [_ENTRY.unpack_from(self._map, start + i * _ENTRY.size) for i in range(count)]

    def _living(self, row: int, reclaim: bool) -> list[tuple[int, int, int, float]]:
        """The row's entries whose holders still run; with ``reclaim``, the others are removed."""
        entries = self._entries(row)
        me = self._identity()
        alive = [entry for entry in entries if (entry[0], entry[2]) == me or _runs(entry[0], entry[2])]
        if reclaim and len(alive) < len(entries):
            self._store(row, alive)
        return alive

    def _store(self, row: int, entries: list[tuple[int, int, int, float]]) -> None:
        key, _ = _HEAD.unpack_from(self._map, row)
        for i, entry in enumerate(entries):
            _ENTRY.pack_into(self._map, row + _HEAD.size + i * _ENTRY.size, *entry)
        _HEAD.pack_into(self._map, row, key, len(entries))

    def _identity(self) -> tuple[int, int]:
        pid = os.getpid()
        if self._me[0] != pid:  # first use, or a process forked since
            self._me = (pid, _start_time(pid) or 0)  # a process may always read its own /proc entry
        return self._me


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None if it has ended (or is a zombie)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def _runs(pid: int, started: int) -> bool:
    """Whether the process that took a place still runs."""
    try:
        return _start_time(pid) == started
    except OSError:  # gone; or hidden (ProtectProc=invisible): another user's, so not a serving process
        return False
