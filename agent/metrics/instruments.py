"""Every metric of one process: the hooks that count events, the sampled state, and the scrape.

One :class:`Metrics` per process, made once the process knows whether it shares its numbers with other serving
processes (:func:`shared_directory`). The hooks are on the path of every request: each does a dict lookup and
one or two increments, with the labelled children cached, as ``labels()`` costs more than the increment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from agent.audit import AuditTrail
    from agent.openfinance.service import BankCall
    from pkcs11_backends.sessions import SessionPool

_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus_client's multiprocess values live
# Upper bounds in seconds: a local token signs in 0.1 to 1 ms, a network HSM in milliseconds, a bank in
# tens of milliseconds to seconds.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HSM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BANK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
POOL_STATES = ("new", "ready", "recovering", "unavailable", "hung", "pin-refused", "closed")  # PoolState values
NO_OPERATION = "none"  # a request refused before it named one (404, 405, a malformed request)
EXPIRES_IN = "tpp_agent_certificate_expires_in_seconds"
_NOT_AFTER = "tpp_agent_certificate_not_after_timestamp_seconds"


@contextlib.contextmanager
def shared_directory(base: Path | None = None) -> Iterator[Path]:
    """A private directory (0700, a fresh name) for the serving processes' values while the block runs; set in
    the environment, so that the processes forked inside find it. Removed afterwards, with every value in it:
    the counters of a service start from zero, as Prometheus expects of a restarted target."""
    path = Path(tempfile.mkdtemp(prefix="tpp-agent-metrics.", dir=base))  # mode 0700, a name nobody guessed
    previous = os.environ.get(_DIRECTORY_VARIABLE)
    os.environ[_DIRECTORY_VARIABLE] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(_DIRECTORY_VARIABLE, None)
        else:
            os.environ[_DIRECTORY_VARIABLE] = previous
        shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """``shared``: the directory the serving processes write their values to (None: this process alone)."""

    def __init__(self, shared: Path | None = None) -> None:
        self.shared = shared
        self.sampled = False  # a sampler thread reads the certificates (agent.metrics.sampler)
        # prometheus_client picks its value class once, from the environment, when it is first imported; the
        # agent knows which it needs only once it has read its configuration, so it says so here, before any metric
        # of this process is made (one Metrics per process).
        if shared is not None:
            os.environ[_DIRECTORY_VARIABLE] = str(shared)
            values.ValueClass = values.MultiProcessValue(_ProcessId())  # type: ignore[no-untyped-call]
        else:
            values.ValueClass = values.MutexValue
        # Single process: the metrics are collected from this registry. Shared: from the files, never from here.
        self._registry = CollectorRegistry(auto_describe=True)
        owned = self._registry if shared is None else None
        self.requests = Counter("tpp_agent_requests", "Requests answered on the socket, by operation and status",
                                ["operation", "status"], registry=owned)
        self.request_seconds = Histogram("tpp_agent_request_duration_seconds",
                                         "From a request's first byte to its answer, by operation", ["operation"],
                                         buckets=REQUEST_BUCKETS, registry=owned)
        self.hsm_seconds = Histogram("tpp_agent_hsm_call_duration_seconds",
                                     "Calls to the token (a session borrowed and the call), by call", ["call"],
                                     buckets=HSM_BUCKETS, registry=owned)
        self.hsm_errors = Counter("tpp_agent_hsm_call_errors", "Token calls that failed, by call and error class",
                                  ["call", "error"], registry=owned)
        self.bank_seconds = Histogram("tpp_agent_bank_request_duration_seconds",
                                      "Requests to a bank over mTLS until the whole answer, by bank", ["bank"],
                                      buckets=BANK_BUCKETS, registry=owned)
        self.bank_responses = Counter("tpp_agent_bank_responses", "Answers from banks, by bank and status class",
                                      ["bank", "status_class"], registry=owned)
        self.bank_errors = Counter("tpp_agent_bank_errors",
                                   "Requests to a bank that got no answer, by bank and error class", ["bank", "error"],
                                   registry=owned)
        self.token_cache = Counter("tpp_agent_token_cache_lookups",
                                   "Access token requests, by bank and whether the cache had the token",
                                   ["bank", "result"], registry=owned)
        # Sampled state (agent.metrics.sampler). Gauges say how the processes' values add up.
        self.processes = Gauge("tpp_agent_serving_processes", "Serving processes reporting", registry=owned,
                               multiprocess_mode="livesum")
        self.ready = Gauge("tpp_agent_ready", "1 when every serving process is ready (token logged in, keys checked)",
                           registry=owned, multiprocess_mode="livemin")
        self.pool_state = Gauge("tpp_agent_token_pool_state",
                                "Serving processes whose token session pool is in each state", ["state"],
                                registry=owned, multiprocess_mode="livesum")
        self.sessions = Gauge("tpp_agent_token_sessions", "Token sessions open, lent (in a call) or idle",
                              ["state"], registry=owned, multiprocess_mode="livesum")
        self.sessions_max = Gauge("tpp_agent_token_sessions_max", "Token sessions the pools may open ([pkcs11] "
                                  "max_sessions per serving process)", registry=owned, multiprocess_mode="livesum")
        self.recoveries = Counter("tpp_agent_token_recoveries",
                                  "Times a session pool got the token back (re-login, module re-initialised, a hung "
                                  "call returned)", registry=owned)
        self.audit_records = Counter("tpp_agent_audit_records", "Records appended to the audit trail (key uses, "
                                     "refusals, checkpoints)", registry=owned)
        self.audit_unsynced = Gauge("tpp_agent_audit_unsynced_records",
                                    "Audit records written but not yet on disk (fdatasync)", registry=owned,
                                    multiprocess_mode="livesum")
        self.audit_lag = Gauge("tpp_agent_audit_sync_lag_seconds",
                               "How long the oldest audit record not yet on disk has waited (0: all are)",
                               registry=owned, multiprocess_mode="livemax")
        self.audit_cut = Gauge("tpp_agent_audit_cut", "1 when an audit trail was found cut or replaced: no key "
                               "use until a restart", registry=owned, multiprocess_mode="livemax")
        self.not_after = Gauge(_NOT_AFTER, "notAfter of the certificate in use of each configured key (Unix time)",
                               ["key"], registry=owned, multiprocess_mode="livemax")
        self._answered: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._hsm: dict[str, Any] = {}
        self._banks: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._seen = {"recoveries": 0, "audit": 0}
        self._audit_base: int | None = None  # the trail's last seq when this process first looked

    # -- events: on the path of requests -------------------------------------
    def request(self, operation: str | None, status: int, seconds: float) -> None:
        """A request answered (the server, once the answer is sent or queued)."""
        key = (operation or NO_OPERATION, status)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (self.requests.labels(key[0], str(status)),
                                              self.request_seconds.labels(key[0]))
        children[0].inc()
        children[1].observe(seconds)

    def hsm_call(self, call: str, seconds: float, error: BaseException | None = None) -> None:
        child = self._hsm.get(call)
        if child is None:
            child = self._hsm[call] = self.hsm_seconds.labels(call)
        child.observe(seconds)
        if error is not None:
            self.hsm_errors.labels(call, type(error).__name__).inc()

    def bank_call(self, call: BankCall) -> None:
        """An ``OpenFinance`` observer: every request to a bank, answered or not."""
        found = self._banks.get(call.bank)
        if found is None:
            found = self._banks[call.bank] = (self.bank_seconds.labels(call.bank), {})
        found[0].observe(call.seconds)
        if call.error is not None:
            self.bank_errors.labels(call.bank, call.error).inc()
            return
        status_class = f"{call.status // 100}xx" if call.status else "none"
        counter = found[1].get(status_class)
        if counter is None:
            counter = found[1][status_class] = self.bank_responses.labels(call.bank, status_class)
        counter.inc()

    def token_lookup(self, bank: str, hit: bool) -> None:
        self.token_cache.labels(bank, "hit" if hit else "miss").inc()

    # -- state: sampled -------------------------------------------------------
    def sample(self, pool: SessionPool | None, audit: AuditTrail | None, ready: bool) -> None:
        """This process's state, read from its live objects (cheap: no token call, no I/O)."""
        self.processes.set(1)
        self.ready.set(1 if ready else 0)
        if pool is not None:
            health = pool.health
            for state in POOL_STATES:
                self.pool_state.labels(state).set(1 if health.state.value == state else 0)
            lent, idle = pool.sessions()
            self.sessions.labels("lent").set(lent)
            self.sessions.labels("idle").set(idle)
            self.sessions_max.set(pool.max_sessions)
            self._grow("recoveries", self.recoveries, health.recoveries)
        if audit is not None:
            if self._audit_base is None:
                self._audit_base = audit.first_seq
            self._grow("audit", self.audit_records, audit.last_seq - self._audit_base)
            self.audit_unsynced.set(max(0, audit.last_seq - audit.synced_seq))
            self.audit_lag.set(audit.sync_lag())
            self.audit_cut.set(1 if audit.cut else 0)

    def _grow(self, name: str, counter: Counter, total: int) -> None:
        """Bring ``counter`` up to a count kept elsewhere (that only grows)."""
        if total > self._seen[name]:
            counter.inc(total - self._seen[name])
            self._seen[name] = total

    def certificates(self, not_after: Mapping[str, float]) -> None:
        """Each configured key's certificate end (read on the token by the sampler, never by a scrape)."""
        for key, when in not_after.items():
            self.not_after.labels(key).set(when)

    # -- the scrape -----------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition of every serving process's metrics."""
        if self.shared is None:
            source: Iterable[Metric] = self._registry.collect()
        else:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry, path=str(self.shared))  # type: ignore[no-untyped-call]
            source = registry.collect()
        return generate_latest(_Families(_with_expiry(list(source), time.time())))  # type: ignore[arg-type]


class _ProcessId:
    """``os.getpid()`` read once: prometheus_client asks for it at every increment of a shared value, to notice a
    fork (five system calls per signing request); only a fork changes it, and a forked child reads it again."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._pid = os.getpid()

    def __call__(self) -> int:
        return self._pid


class _Families:
    """Metric families already collected, as ``generate_latest`` wants them: something with ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _with_expiry(families: list[Metric], now: float) -> list[Metric]:
    """The families, and each certificate's seconds left (from its notAfter, at the scrape's time)."""
    expires = GaugeMetricFamily(EXPIRES_IN, "Seconds until the certificate in use of each configured key ends "
                                            "(negative: it has)", labels=["key"])
    for family in families:
        if family.name == _NOT_AFTER:
            for sample in family.samples:
                expires.add_metric([sample.labels["key"]], sample.value - now)
    return [*families, expires]
