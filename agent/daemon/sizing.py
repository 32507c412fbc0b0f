"""How many request workers keep the CPUs busy: as many as the CPUs when requests compute, more when they block.

With a local token a request is CPU work from end to end (SoftHSM2 signs on the calling thread), and more
threads than CPUs only hand the interpreter lock around: with 8 workers per serving process instead of 1 the
throughput profile signed 20 to 25% slower. A network HSM turns each signature into a wait of milliseconds
during which the worker holds no CPU; with workers sized for the CPUs, two token calls at a time were in flight
however many sessions the pool had (ES256 at 790 to 830 signatures/s with 2 ms per signature, where 8 sessions
allow 3,450). An audit record ``fdatasync``'ed before the answer blocks the same way.

By Little's law, ``base`` CPUs stay busy with ``base * (cpu + blocked) / cpu`` workers, where ``cpu`` and
``blocked`` are what a request spends on a CPU and blocked (waiting on the token, a sync, a lock). The server
measures a sample of its requests (one in :data:`SAMPLE_EVERY` per worker) and resizes the lane after every
:data:`WINDOW` samples, from ``base`` up to ``ceiling`` (the pool's sessions plus ``base``: a worker holds a
session only inside its token call, and more would wait for one), with the median CPU time and the lower quartile
of blocked time: what nearly every request blocks for, a network HSM's round trip or a sync, and not the waits for
the interpreter lock that some requests have when several workers compute (counted, they would keep a lane wide
because it is wide). A request's time waiting for a CPU (runnable but not running, when the host is busy) is not
blocking: more threads would not get more CPU; the kernel counts it per thread in ``/proc/thread-self/schedstat``
(the second field), which the clock subtracts.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

SAMPLE_EVERY = 8  # a worker measures one request in this many (each measure costs ~3 µs: four clock reads)
WINDOW = 32  # samples per decision: enough for the medians to ignore a stall, few enough to follow a change


class ThreadClock:
    """The calling thread's CPU time and the time it waited for a CPU, in ns. Made and read on one thread."""

    __slots__ = ("_schedstat",)

    def __init__(self) -> None:
        try:  # /proc/thread-self names the thread that opens it; the descriptor stays that thread's
            self._schedstat: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # a kernel without scheduler statistics: waiting for a CPU then counts as blocked
            self._schedstat = None

    def read(self) -> tuple[int, int]:
        """(CPU time, time runnable but not running) so far."""
        # The CPU time from clock_gettime, not schedstat's first field: that one is only brought up to date at
        # a tick or a switch, so a running thread reads a stale value.
        cpu = time.thread_time_ns()
        if self._schedstat is None:
            return cpu, 0
        return cpu, int(os.pread(self._schedstat, 96, 0).split()[1])

    def close(self) -> None:
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None


class Sizing:
    """The workers wanted by one lane, from samples of its requests' CPU and blocked time (thread-safe)."""

    def __init__(self, base: int, ceiling: int, *, every: int = SAMPLE_EVERY, window: int = WINDOW) -> None:
        if not 1 <= base <= ceiling:
            raise ValueError(f"worker sizing needs 1 <= base <= ceiling, got {base} and {ceiling}")
        self.base, self.ceiling = base, ceiling
        self.every, self.window = every, window
        self._lock = threading.Lock()
        self._cpu: list[int] = []
        self._blocked: list[int] = []
        self._last = base  # what the window before wanted

    def wanted(self, cpu_ns: float, blocked_ns: float) -> int:
        """Workers that keep ``base`` CPUs busy when each request computes ``cpu_ns`` and blocks ``blocked_ns``."""
        if cpu_ns <= 0:
            return self.ceiling if blocked_ns > 0 else self.base
        # Rounded to the nearest: a request that blocks a little (a lock, the interpreter lock) is no reason
        # for one more thread.
        return max(self.base, min(self.ceiling, round(self.base * (cpu_ns + blocked_ns) / cpu_ns)))

    def add(self, cpu_ns: int, blocked_ns: int) -> int | None:
        """One request's sample; at the end of a window, the workers wanted (else None): at once more, but fewer
        only once two windows in a row want fewer, so that a lane at the edge does not start and retire a
        worker every window."""
        with self._lock:
            self._cpu.append(cpu_ns)
            self._blocked.append(blocked_ns)
            if len(self._cpu) < self.window:
                return None
            wanted = self.wanted(statistics.median(self._cpu), sorted(self._blocked)[len(self._blocked) // 4])
            self._cpu.clear()
            self._blocked.clear()
            wanted, self._last = max(wanted, self._last), wanted
        return wanted

    def meter(self) -> Meter:
        """For one worker thread (call on that thread)."""
        return Meter(self)


class Meter:
    """One worker's measure of a request in every ``sizing.every``: ``begin()`` before it, ``end()`` after."""

    __slots__ = ("_clock", "_left", "_sizing", "_started")

    def __init__(self, sizing: Sizing) -> None:
        self._sizing = sizing
        self._clock = ThreadClock()
        self._left = sizing.every
        self._started: tuple[int, int, int] | None = None

    def begin(self) -> None:
        self._left -= 1
        if self._left:
            return
        self._left = self._sizing.every
        cpu, waited = self._clock.read()
        self._started = (time.monotonic_ns(), cpu, waited)

    def end(self) -> int | None:
        """The workers wanted, when this request completed a window; else None."""
        if self._started is None:
            return None
        wall0, cpu0, waited0 = self._started
        self._started = None
        cpu, waited = self._clock.read()
        wall = time.monotonic_ns() - wall0
        cpu -= cpu0
        return self._sizing.add(cpu, max(0, wall - cpu - (waited - waited0)))

    def close(self) -> None:
        self._clock.close()
