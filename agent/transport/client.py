"""HTTP to one bank over mutual TLS with the token key, through a pool of keep-alive connections.

    transport = open_transport(runtime, settings)            # or BankTransport(settings, build_context(...))
    response = transport.request("GET", url)                 # -> Response (any HTTP status)
    response = transport.request("POST", url, json={}, interaction_id=iid)
    response.status, response.json(), response.interaction_id, response.duration_ms
    transport.stats.full                                     # full TLS handshakes = token signatures so far
    transport.close()

* Connections are kept alive and reused, per host, up to ``max_connections``: a
  handshake (and so a signature on the token) is paid per connection, not per
  request; a new connection resumes the last TLS session where the bank allows.
* Every request carries ``x-fapi-interaction-id``: the caller's, else a new UUIDv4,
  and the caller's other header fields only as ``headers.py`` lets them through.
* Every request is bounded whatever the bank does: ``request_timeout`` for all of it
  (``exchange.py`` cuts the socket at the deadline), ``max_response_bytes`` for the
  answer (read in pieces; past the limit the connection is dropped), and at most
  ``max_in_flight`` requests at the bank at once (the next one fails with
  :class:`~agent.transport.errors.BankBusyError`: at once when those have been under way
  for half a second, else once it has waited that long for a place), so one slow or
  hostile bank holds no more than that many of the caller's threads for long, counted for every serving process
  of the agent (``places.py``). An operation that waits before it sends (for another caller's token request)
  takes its place first: :meth:`BankTransport.slot`.
* One log line per request: method, URL, status, duration, interaction id (never
  bodies, headers with credentials or the PIN); with ``log_successes`` off (the daemon's
  ``request_log = "failures"``), only for failures and answers of 400 and above.
* HTTP statuses are returned, not raised: what a 4xx/5xx means is the caller's
  business. Anything below HTTP raises a :class:`TransportError` subclass from
  ``errors.py``. A request is sent again only when a pooled connection broke under it
  (the bank closed it while idle) and it cannot have reached the bank whole, or its
  method is idempotent: a POST that may have reached the bank is never sent twice
  behind the caller's back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json as jsonlib
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import urllib3
from urllib3 import exceptions as u3
from urllib3.util.ssl_match_hostname import CertificateError

from agent import log
from agent.lifecycle.validity import validity_problem
from agent.transport import errors
from agent.transport.exchange import Exchange, Watchdog
from agent.transport.headers import INTERACTION_HEADER, outgoing
from agent.transport.places import BankPlaces
from agent.transport.pool import (
    X509_V_ERR_HOSTNAME_MISMATCH,
    X509_V_ERR_IP_ADDRESS_MISMATCH,
    BankConnection,
    BankConnectionPool,
    BankSslContext,
    HandshakeError,
    HandshakeStats,
    idle_limit,
)
from agent.transport.tls import TlsContext, TlsSettings, build_context

if TYPE_CHECKING:  # agent.runtime imports agent.transport.places
    from agent.runtime import Runtime

# Which [banks.NAME] setting bounds an answer's body.
AnswerLimit = Literal["max_response_bytes", "max_discovery_bytes"]
# RFC 9110 §9.2.2: sending one of these twice has the effect of sending it once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_READ_SIZE = 64 << 10

_logger = log.get_logger("transport.http")


@dataclasses.dataclass(frozen=True)
class Response:
    method: str
    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    interaction_id: str
    duration_ms: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def bank_interaction_id(self) -> str | None:
        """The bank's ``x-fapi-interaction-id`` when it is not the one sent (FAPI asks banks to echo ours)."""
        echoed = self.headers.get(INTERACTION_HEADER)
        return echoed if echoed and echoed.lower() != self.interaction_id.lower() else None

    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """A request as the transport sends it (again, if a stale connection broke under it)."""

    method: str
    url: str
    body: bytes | None
    headers: dict[str, str]
    where: dict[str, str]  # bank, url, interaction id: for errors
    deadline: float        # time.monotonic()
    connect_timeout: float
    read_timeout: float
    limit: AnswerLimit


class BankTransport:
    """All HTTP traffic to one bank: pooled mTLS connections with the bank's TLS context."""

    def __init__(self, settings: TlsSettings, tls: TlsContext, places: BankPlaces | None = None,
                 log_successes: bool = True) -> None:
        self.bank = settings.bank
        self._log_successes = log_successes  # False: a line only for failures and answers of 400 and above
        self.settings = settings
        self.tls = tls
        self._ssl = BankSslContext(tls)
        self._pools = urllib3.PoolManager(
            num_pools=8, maxsize=settings.max_connections, block=False, ssl_context=self._ssl,
            retries=False, timeout=urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout),
        )
        self._pools.pool_classes_by_scheme = {"https": BankConnectionPool}
        # Counted here, where every request to the bank passes, whichever operation sends it; in the agent's
        # table when it has one (shared by its serving processes), else in one of this transport's own.
        self._own_places = places is None
        self.places = BankPlaces(rows=1) if places is None else places
        self._watchdog = Watchdog(settings.bank)

    @property
    def stats(self) -> HandshakeStats:
        return self._ssl.stats

    def request(self, method: str, url: str, *, body: bytes | None = None, json: Any = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None,
                connect_timeout: float | None = None, read_timeout: float | None = None,
                limit: AnswerLimit = "max_response_bytes") -> Response:
        """One request; the answer must arrive whole within ``request_timeout`` and ``limit`` bytes.

        A request that failed on a pooled connection the bank had closed is sent again on a new one
        when it cannot have reached the bank whole, or when its method is idempotent; never otherwise.
        """
        if not url.startswith("https://"):
            raise errors.ConnectFailedError("only https:// URLs are allowed for banks", bank=self.bank, url=url,
                                            interaction_id=interaction_id or "-")
        sent = outgoing(headers)
        interaction_id = interaction_id or str(uuid.uuid4())
        problem = validity_problem(self.tls.certificate)  # a context outlives its certificate's validity
        if problem is not None:
            raise errors.ClientCertNotPresentedError(f"the client certificate is {problem}", bank=self.bank, url=url,
                                                     interaction_id=interaction_id)
        sent[INTERACTION_HEADER] = interaction_id
        if json is not None:
            if body is not None:
                raise ValueError("pass body or json, not both")
            body = jsonlib.dumps(json, separators=(",", ":")).encode("utf-8")
            sent.setdefault("content-type", "application/json")
        where = {"bank": self.bank, "url": url, "interaction_id": interaction_id}
        started = time.monotonic()
        try:
            with self.slot(url, interaction_id):
                raw, data = self._send(_Attempt(
                    method, url, body, sent, where, started + self.settings.request_timeout,
                    connect_timeout or self.settings.connect_timeout, read_timeout or self.settings.read_timeout,
                    limit))
        except errors.TransportError as error:
            _logger.warning("http.request", bank=self.bank, method=method, url=url, status=None,
                            duration_ms=round((time.monotonic() - started) * 1000, 1),
                            interaction_id=interaction_id, error=type(error).__name__, detail=error.detail)
            raise
        duration = (time.monotonic() - started) * 1000
        if self._log_successes or raw.status >= 400:
            _logger.info("http.request", bank=self.bank, method=method, url=url, status=raw.status,
                         duration_ms=round(duration, 1), interaction_id=interaction_id)
        return Response(method, url, raw.status, {k.lower(): v for k, v in raw.headers.items()}, data,
                        interaction_id, duration)

    def slot(self, what: str = "-", interaction_id: str = "-") -> contextlib.AbstractContextManager[None]:
        """One of the bank's ``max_in_flight`` places for this thread until the block ends, counted for the whole
        agent (:mod:`agent.transport.places`), else :class:`~agent.transport.errors.BankBusyError` (at once if
        the bank is slow, after at most :data:`~agent.transport.places.BUSY_PATIENCE` if it is only busy). A thread
        that holds one already (an operation that waits for another's answer before it sends, as the token cache
        does) uses it again."""
        return self.places.hold(self.bank, self.settings.max_in_flight, what, interaction_id)

    def _send(self, attempt: _Attempt) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        where = attempt.where
        # Each failed attempt discards one stale pooled connection: at most the pool's worth, then a new one.
        for tries_left in range(self.settings.max_connections, -1, -1):
            with self._watchdog.guard(Exchange(attempt.deadline)) as exchange:
                left = exchange.remaining()
                if left <= 0:
                    raise self._deadline_passed(where)
                timeout = urllib3.Timeout(connect=min(attempt.connect_timeout, left),
                                          read=min(attempt.read_timeout, left))
                try:
                    raw = self._pools.request(attempt.method, attempt.url, body=attempt.body, headers=attempt.headers,
                                              timeout=timeout, redirect=False, preload_content=False,
                                              decode_content=False)
                except (u3.HTTPError, OSError) as exc:
                    error = self._failure(exc, exchange, where)
                    if tries_left and _resendable(attempt.method, exchange, error):
                        _logger.info("http.resend", bank=self.bank, method=attempt.method, url=attempt.url,
                                     interaction_id=where["interaction_id"], detail=error.detail,
                                     sent_whole=exchange.sent_whole)
                        continue
                    raise error from exc
                try:
                    body = self._answer(raw, attempt.limit, where)
                except (u3.HTTPError, OSError) as exc:
                    raise (self._failure(exc, exchange, where)) from exc
                if exchange.expired:  # http.client takes a head cut short for a whole one: the cut is ours
                    raise self._deadline_passed(where)
                return raw, body
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _answer(self, raw: urllib3.BaseHTTPResponse, limit: AnswerLimit, where: dict[str, str]) -> bytes:
        """The whole body, read up to the limit; past it the connection is dropped, not drained."""
        connection = raw.connection
        if isinstance(connection, BankConnection):
            connection.idle_limit = idle_limit(raw.headers.get("keep-alive"), self.settings.idle_timeout)
        most = getattr(self.settings, limit)
        body = bytearray()
        try:
            announced = raw.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > most:
                raise errors.ResponseTooLargeError(f"the answer announces {int(announced)} bytes, more than "
                                                   f"{limit} = {most}", **where)
            while chunk := raw.read(_READ_SIZE, decode_content=False):
                body += chunk
                if len(body) > most:
                    raise errors.ResponseTooLargeError(f"the answer is larger than {limit} = {most} bytes", **where)
        except BaseException:
            raw.close()  # with what is left unread: the connection cannot carry another request
            raw.release_conn()
            raise
        raw.release_conn()
        return bytes(body)

    def _failure(self, exc: BaseException, exchange: Exchange, where: dict[str, str]) -> errors.TransportError:
        # Past the deadline, whatever broke (the watchdog's cut, or a timeout clipped to it) broke because of it.
        return self._deadline_passed(where) if exchange.expired or exchange.remaining() <= 0 \
            else classify(exc, **where)

    def _deadline_passed(self, where: dict[str, str]) -> errors.RequestDeadlineError:
        limit = self.settings.request_timeout
        return errors.RequestDeadlineError(f"no whole answer within request_timeout = {limit:g} s", **where)

    def get(self, url: str, **kwargs: Any) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self._pools.clear()
        self._watchdog.close()
        if self._own_places:
            self.places.close()

    def __enter__(self) -> BankTransport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _resendable(method: str, exchange: Exchange, error: errors.TransportError) -> bool:
    """A pooled connection broke under a request the bank cannot have acted on, or may see twice."""
    return (isinstance(error, errors.ConnectionLostError) and exchange.reused
            and (not exchange.sent_whole or method in IDEMPOTENT_METHODS))


def open_transport(runtime: Runtime, settings: TlsSettings) -> BankTransport:
    return BankTransport(settings, build_context(runtime, settings), runtime.places, runtime.log_bank_successes)


# -- mapping failures ------------------------------------------------------------

_CLIENT_CERT_ALERTS: tuple[tuple[str, type[errors.TransportError]], ...] = (
    ("alert certificate expired", errors.ClientCertExpiredError),
    ("alert certificate revoked", errors.ClientCertRevokedError),
    ("alert unknown ca", errors.ClientCertUnknownCaError),
    ("alert bad certificate", errors.ClientCertRejectedError),
    ("alert unsupported certificate", errors.ClientCertRejectedError),
    ("alert certificate unknown", errors.ClientCertRejectedError),
    ("alert certificate required", errors.ClientCertRejectedError),
    ("alert access denied", errors.ClientCertRejectedError),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes, and exceptions urllib3 keeps in ``args`` or ``reason``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [current.__cause__, current.__context__, getattr(current, "reason", None),
                  *(a for a in current.args if isinstance(a, BaseException))]
        todo.extend(e for e in nested if isinstance(e, BaseException))


def classify(exc: BaseException, *, bank: str, url: str, interaction_id: str) -> errors.TransportError:
    """One of ``errors.py``'s classes for a urllib3/pyOpenSSL/socket failure."""
    chain = list(_chain(exc))
    text = " | ".join(str(e) for e in chain).lower()
    where = {"bank": bank, "url": url, "interaction_id": interaction_id}
    handshake = next((e for e in chain if isinstance(e, HandshakeError)), None)
    if handshake is not None and handshake.verify_code != 0:
        if handshake.verify_code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH):
            return errors.HostnameMismatchError(f"server certificate does not match the host name: "
                                                f"{handshake.verify_message}", **where)
        return errors.ServerUntrustedError(f"server certificate not trusted: {handshake.verify_message}", **where)
    for alert, cls in _CLIENT_CERT_ALERTS:
        if alert in text:
            return cls(f"the server refused our client certificate (TLS {alert})", **where)
    if any(isinstance(e, CertificateError | ssl.CertificateError) for e in chain):
        return errors.HostnameMismatchError(f"server certificate does not match the host name: {exc}", **where)
    if handshake is None and "unexpected eof while reading" in text:
        # The bank closed the connection under a request, after the handshake: OpenSSL 3.5 (Debian 13) says so as
        # an SSL error where 3.0 (Debian 12) gave ECONNRESET or EPIPE. No handshake failed.
        return errors.ConnectionLostError("the bank closed the connection (TLS: unexpected EOF)", **where)
    if handshake is not None or any(isinstance(e, u3.SSLError) for e in chain):
        reason = "; ".join(handshake.reasons) if handshake else str(exc)
        return errors.HandshakeFailedError(f"TLS handshake failed: {reason}", **where)
    # urllib3's NewConnectionError subclasses its ConnectTimeoutError: test it first.
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return errors.ConnectRefusedError("connection refused", **where)
    if any(isinstance(e, u3.NewConnectionError | u3.NameResolutionError) for e in chain):
        return errors.ConnectFailedError(f"cannot connect: {exc}", **where)
    if any(isinstance(e, u3.ConnectTimeoutError) for e in chain) or "handshake timed out" in text:
        return errors.ConnectTimeoutError("no connection within the connect timeout", **where)
    if any(isinstance(e, u3.ReadTimeoutError | TimeoutError) for e in chain):
        return errors.ReadTimeoutError("no answer within the read timeout", **where)
    return errors.ConnectionLostError(f"connection failed: {exc}", **where)
