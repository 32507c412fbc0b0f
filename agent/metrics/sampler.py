"""The state metrics, read from a process's live objects: its session pool, audit trail, certificates.

A scrape samples the process it lands in (no token call, no I/O). With several serving processes the others
are sampled by a thread of their own each second (:class:`Sampler`), so a scrape sees them at most that old.
Certificates are read on the token, so never by a scrape in the daemon: the sampler reads them at start and
every minute (a certificate imported meanwhile shows within that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.log import get_logger
from pkcs11_backends.errors import Pkcs11Error

if TYPE_CHECKING:
    from agent.operations.core import Core

log = get_logger("tpp-agent.metrics")
STATE_SECONDS = 1.0
CERTIFICATE_SECONDS = 60.0


def sample(core: Core) -> None:
    """This process's state into its metrics; what it has not opened (a CLI's pool, audit trail) is left out."""
    pool = core.runtime.pool if "pool" in core.runtime.__dict__ else None
    audit = core.signer.audit if "signer" in core.__dict__ else None
    core.metrics.sample(pool, audit, core.readiness().ready)


def read_certificates(core: Core) -> dict[str, float]:
    """notAfter (Unix time) of each configured key's certificate in use; a key whose read fails is left out."""
    found: dict[str, float] = {}
    for alias in core.config.keys:
        try:
            certificate = core.keys.info(alias).certificate
        except (AgentError, Pkcs11Error) as exc:
            log.debug("certificate_not_read", key=alias, error=str(exc))
            continue
        if certificate is not None:
            found[alias] = certificate.not_after.timestamp()
    return found


def scrape(core: Core, *, certificates: bool) -> bytes:
    """The text exposition, this process sampled first; ``certificates``: read them on the token too (the CLI,
    where no sampler runs)."""
    if certificates:
        core.metrics.certificates(read_certificates(core))
    sample(core)
    return core.metrics.render()


class Sampler:
    """A serving process's thread: its state every ``state_seconds`` (None: only its own scrapes sample it, as
    when it is the only process), its certificates every ``certificate_seconds``."""

    def __init__(self, core: Callable[[], Core], *, state_seconds: float | None,
                 certificate_seconds: float = CERTIFICATE_SECONDS) -> None:
        self._core = core  # the current core: a reload replaces it
        self._state_seconds = state_seconds
        self._certificate_seconds = certificate_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def start(self) -> None:
        self._core().metrics.sampled = True  # scrapes leave the token to this thread
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, and wait for a token read under way (at most ``timeout``: a hung one is the pool's to handle)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        tick = min(self._state_seconds or self._certificate_seconds, self._certificate_seconds)
        next_read = 0.0
        while True:
            try:
                core = self._core()
                if time.monotonic() >= next_read:
                    next_read = time.monotonic() + self._certificate_seconds
                    core.metrics.certificates(read_certificates(core))
                if self._state_seconds is not None:
                    sample(core)
            except Exception as exc:  # a metric is never worth a serving process
                log.warning("metrics_sample_failed", error=repr(exc)[:200])
            if self._stop.wait(tick):
                return
