"""How a daemon worker and the audit trail share the wait for the disk (an audit record's ``fdatasync``).

The daemon's workers are few on purpose (the interpreter lock makes more CPU-bound threads only hand it
around). A worker that sat out each sync would leave at most ``workers`` records to share one. So the workers
that sign locally (their signatures leave only in their answers) defer instead, set up per worker thread by
agent/daemon/server.py: the trail does not wait for the sync inside :meth:`~agent.audit.AuditTrail.record`; it
notes the record in :func:`deferred`, the server hands the finished answer to the trail (``when_durable``),
and the worker moves on to the next request. The trail's committer thread syncs everything appended
meanwhile and sends every answer that sync covered: one sync per batch, however many records it holds.
Workers that call banks (a signature there leaves in a request to the bank) still wait in ``record``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

# Per thread, by design: each worker thread registers how it waits; other threads have nothing here.
_worker = threading.local()


class Durable(Protocol):
    """What records were deferred to: an audit trail."""

    def when_durable(self, seq: int, then: Callable[[Exception | None], None]) -> None:
        """Call ``then(None)`` once record ``seq`` is durable, ``then(error)`` if it cannot be."""


def defer_here() -> None:
    """The calling thread answers only through :func:`take_deferred`'s trail: records need not wait."""
    _worker.deferred = []


def deferred() -> list[tuple[Durable, int]] | None:
    """Where a record made on this thread notes itself instead of waiting (None: wait for it)."""
    found: list[tuple[Durable, int]] | None = getattr(_worker, "deferred", None)
    return found


def take_deferred() -> list[tuple[Durable, int]]:
    """The records noted since the last call (the request just handled), forgotten here."""
    found: list[tuple[Durable, int]] = getattr(_worker, "deferred", None) or []
    if found:
        _worker.deferred = []
    return found
