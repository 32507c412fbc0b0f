"""A thread about to wait for something that is not the CPU (the disk: an audit record's ``fdatasync``) says
so, and the worker pool it belongs to lets another of its threads run meanwhile.

The daemon's workers are few on purpose (the interpreter lock makes more CPU-bound threads only hand it
around), so a worker that sat out a sync would leave fewer records to share the next one: with 2 workers, a
sync could cover at most 2 records. A worker that lends its slot while it waits lets the next request be
signed and appended, so one sync covers every record in flight (agent/daemon/server.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# Per thread, by design: each worker thread registers how it lends its own slot; other threads have none.
_lenders = threading.local()


def lend_with(lend: Callable[[], None]) -> None:
    """Register, for the calling thread, what :func:`about_to_wait` calls."""
    _lenders.lend = lend


def about_to_wait() -> None:
    """The calling thread will now wait for the disk (or another device): let its pool run another thread."""
    lend: Callable[[], None] | None = getattr(_lenders, "lend", None)
    if lend is not None:
        lend()
