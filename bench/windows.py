"""Measuring windows, shared by the bench process and the load generator.

A load is driven in windows: a short warm-up that is not counted, then the measured window. What counts is
what completes inside the window (a closed loop has no ramp-up or drain in it), and between two windows the
load is idle, so that two loads can take turns on the machine (:func:`bench.common.interleave`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

Work = Callable[[], object]
# The longest the driver waits for the threads beyond a window's end (or for their set-up): a thread stuck in a
# call that never returns fails the benchmark with this instead of holding it for ever.
STUCK_SECONDS = 120.0


class Window(NamedTuple):
    start: float  # time.monotonic() when counting starts
    end: float

    @classmethod
    def after(cls, warmup: float, seconds: float) -> Window:
        start = time.monotonic() + warmup
        return cls(start, start + seconds)

    def holds(self, moment: float) -> bool:
        return self.start <= moment <= self.end


def p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    """The median and 99th percentile of ``latencies`` (seconds), in ms; NaN when there are none."""
    ordered = sorted(latencies)
    if not ordered:
        return float("nan"), float("nan")
    def at(pct: int) -> float:
        return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)] * 1000

    return at(50), at(99)


def process_cpu() -> float:
    """CPU seconds of this process, all threads, user and system."""
    times = os.times()
    return times.user + times.system


def measure(window: Window, run: Callable[[Window], None], at_start: Callable[[], None] = lambda: None,
            at_end: Callable[[], None] = lambda: None) -> float:
    """Run ``run(window)`` on a thread of its own; call ``at_start``/``at_end`` when the window opens and closes;
    return once ``run`` has returned, with this process's CPU seconds inside the window."""
    driver = threading.Thread(target=run, args=(window,))
    driver.start()
    time.sleep(max(0.0, window.start - time.monotonic()))
    cpu = process_cpu()
    at_start()
    time.sleep(max(0.0, window.end - time.monotonic()))
    cpu = process_cpu() - cpu
    at_end()
    driver.join()
    return cpu


class ClosedLoopThreads:
    """Threads that each call their own ``work`` (from ``setup``, on the thread) back to back during a window,
    and wait between windows. ``latencies``: every call completed inside a window, in seconds."""

    def __init__(self, threads: int, setup: Callable[[], Work]) -> None:
        self.latencies: list[float] = []  # list.append is atomic: one list for all threads
        self.errors: list[str] = []
        self._setup = setup
        self._window: Window | None = None  # None: the threads end
        self._set_up = threading.Barrier(threads + 1)
        self._go = threading.Barrier(threads + 1)
        self._done = threading.Barrier(threads + 1)
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()
        # every thread has its work (a session, a pool) before the first window
        self._wait(self._set_up, STUCK_SECONDS, "setting up")

    def run(self, window: Window) -> None:
        """Drive one window; return once every thread is idle again."""
        self._window = window
        self._go.wait()
        try:
            self._wait(self._done, window.end - time.monotonic() + STUCK_SECONDS, "in a call")
        except RuntimeError as exc:  # on the driver's thread: reported through errors, as the threads' are
            self.errors.append(str(exc))

    def close(self) -> None:
        self._window = None
        if self._go.broken:  # a thread is stuck: it cannot be joined (the threads are daemons)
            return
        self._go.wait()
        for thread in self._threads:
            thread.join()

    def _wait(self, barrier: threading.Barrier, seconds: float, doing: str) -> None:
        try:
            barrier.wait(max(0.0, seconds))
        except threading.BrokenBarrierError:
            self._go.abort()
            raise RuntimeError(f"a load thread is still {doing} after {seconds:.0f} s: the token stopped "
                               "answering") from None

    def _loop(self) -> None:
        try:
            work: Work | None = self._setup()
        except Exception as exc:  # reported by the caller, and the benchmark fails loudly
            self.errors.append(f"{type(exc).__name__}: {exc}")
            work = None
        try:
            self._loop_windows(work)
        except threading.BrokenBarrierError:  # the driver gave up on a stuck thread (:meth:`_wait`)
            return

    def _loop_windows(self, work: Work | None) -> None:
        self._set_up.wait()
        while True:
            self._go.wait()
            window = self._window
            if window is None:
                return
            try:
                while work is not None and (started := time.monotonic()) < window.end:
                    work()
                    done = time.monotonic()
                    if window.holds(done):
                        self.latencies.append(done - started)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                work = None
            self._done.wait()
