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
* Every request carries ``x-fapi-interaction-id``: the caller's, else a new UUIDv4.
* One log line per request: method, URL, status, duration, interaction id (never
  bodies, headers with credentials or the PIN).
* HTTP statuses are returned, not raised: what a 4xx/5xx means is the caller's
  business. Anything below HTTP raises a :class:`TransportError` subclass from
  ``errors.py``. Nothing is retried: a POST that reached the bank must not be
  sent twice behind the caller's back.
"""

from __future__ import annotations

import dataclasses
import json as jsonlib
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import urllib3
from urllib3 import exceptions as u3
from urllib3.util.ssl_match_hostname import CertificateError

from agent import log
from agent.lifecycle.validity import validity_problem
from agent.runtime import Runtime
from agent.transport import errors
from agent.transport.pool import (
    X509_V_ERR_HOSTNAME_MISMATCH,
    X509_V_ERR_IP_ADDRESS_MISMATCH,
    BankSslContext,
    HandshakeError,
    HandshakeStats,
)
from agent.transport.tls import TlsContext, TlsSettings, build_context

INTERACTION_HEADER = "x-fapi-interaction-id"
USER_AGENT = "tpp-agent"

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

    def json(self) -> Any:
        return jsonlib.loads(self.body)


class BankTransport:
    """All HTTP traffic to one bank: pooled mTLS connections with the bank's TLS context."""

    def __init__(self, settings: TlsSettings, tls: TlsContext) -> None:
        self.bank = settings.bank
        self.settings = settings
        self.tls = tls
        self._ssl = BankSslContext(tls)
        self._pools = urllib3.PoolManager(
            num_pools=8, maxsize=settings.max_connections, block=False, ssl_context=self._ssl,
            retries=False, timeout=urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout),
            headers={"User-Agent": USER_AGENT},
        )

    @property
    def stats(self) -> HandshakeStats:
        return self._ssl.stats

    def request(self, method: str, url: str, *, body: bytes | None = None, json: Any = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None,
                connect_timeout: float | None = None, read_timeout: float | None = None) -> Response:
        if not url.startswith("https://"):
            raise errors.ConnectFailedError("only https:// URLs are allowed for banks", bank=self.bank, url=url,
                                            interaction_id=interaction_id or "-")
        interaction_id = interaction_id or str(uuid.uuid4())
        problem = validity_problem(self.tls.certificate)  # a context outlives its certificate's validity
        if problem is not None:
            raise errors.ClientCertNotPresentedError(f"the client certificate is {problem}", bank=self.bank, url=url,
                                                     interaction_id=interaction_id)
        sent = {k.lower(): v for k, v in (headers or {}).items()}
        sent[INTERACTION_HEADER] = interaction_id
        if json is not None:
            if body is not None:
                raise ValueError("pass body or json, not both")
            body = jsonlib.dumps(json, separators=(",", ":")).encode("utf-8")
            sent.setdefault("content-type", "application/json")
        timeout = urllib3.Timeout(connect=connect_timeout or self.settings.connect_timeout,
                                  read=read_timeout or self.settings.read_timeout)
        started = time.monotonic()
        try:
            raw = self._pools.request(method, url, body=body, headers=sent, timeout=timeout, redirect=False,
                                      preload_content=True)
        except (u3.HTTPError, OSError) as exc:
            duration = (time.monotonic() - started) * 1000
            error = classify(exc, bank=self.bank, url=url, interaction_id=interaction_id)
            _logger.warning("http.request", bank=self.bank, method=method, url=url, status=None,
                            duration_ms=round(duration, 1), interaction_id=interaction_id,
                            error=type(error).__name__, detail=error.detail)
            raise error from exc
        duration = (time.monotonic() - started) * 1000
        _logger.info("http.request", bank=self.bank, method=method, url=url, status=raw.status,
                     duration_ms=round(duration, 1), interaction_id=interaction_id)
        return Response(method, url, raw.status, {k.lower(): v for k, v in raw.headers.items()}, raw.data,
                        interaction_id, duration)

    def get(self, url: str, **kwargs: Any) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self._pools.clear()

    def __enter__(self) -> BankTransport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_transport(runtime: Runtime, settings: TlsSettings) -> BankTransport:
    return BankTransport(settings, build_context(runtime, settings))


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
