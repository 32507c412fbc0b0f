"""Banks as a running agent sees them: one pooled mTLS transport per bank, built on first
use, and the discovery, registration, registration log and access tokens that run over it.

``client_id`` (for client assertions and request objects) is ``[tokens] client_id``, else the CN of the bank's
transport certificate: the directory issues that certificate with CN = the application's client ID, one per
application and the same at every bank, so it is one setting, not one per bank.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from cryptography.x509.oid import NameOID

from agent import interaction, log
from agent.errors import ConfigError
from agent.jose.errors import JwksError
from agent.openfinance.authorization import ConsentClient
from agent.openfinance.banks import BankConfig, find_bank, https_origin
from agent.openfinance.consent import PendingAuthorizations
from agent.openfinance.discovery import Discovery
from agent.openfinance.events import ReplayGuard
from agent.openfinance.flow_state import StatePendingStore, StateReplayStore
from agent.openfinance.jwks import BankJwks
from agent.openfinance.records import RegistrationLog
from agent.openfinance.registration import Identity, Registrar
from agent.openfinance.tokens import TokenClient
from agent.runtime import Runtime
from agent.state import StateStore, open_state
from agent.transport.client import AnswerLimit, BankTransport, Response, open_transport
from agent.transport.tls import TlsSettings

if TYPE_CHECKING:
    from agent.audit import AuditedKeyStore
    from agent.sections import Sections

_logger = log.get_logger("openfinance")
# Told of each access token lookup: the bank, and whether its cache had the token (agent.metrics).
TokenLookups = Callable[[str, bool], None]


class OpenFinance:
    """``sections`` names the banks, the token settings and the state dir; the token is the runtime's.

    ``signer`` signs client assertions and request objects, every signature audited (there is no other way to
    sign here). ``observer`` hears of every request sent with the transport key (the audit trail records each:
    a use of that key, whether or not it needed a new handshake).
    """

    def __init__(self, runtime: Runtime, sections: Sections, *, signer: AuditedKeyStore,
                 observer: BankCallObserver, token_lookups: TokenLookups | None = None,
                 transport_key: Callable[[BankConfig], str] | None = None) -> None:
        self.runtime = runtime
        # The key a bank's TLS is built with (a rotation switches banks one by one): its client_key by default.
        self.transport_key = transport_key or (lambda bank: bank.tls.client_key)
        self.sections = sections
        self.config = sections.config
        self.signer = signer
        self.observer = observer
        self.token_lookups = token_lookups
        self._transports: dict[str, BankTransport] = {}
        self._tokens: dict[str, TokenClient] = {}
        self._discoveries: dict[str, Discovery] = {}
        self._jwks: dict[str, BankJwks] = {}
        self._lock = threading.RLock()  # daemon workers share one OpenFinance; tokens() calls transport()
        self._side_transports: list[BankTransport] = []

    @functools.cached_property
    def state(self) -> StateStore:
        return open_state(self.config)

    @functools.cached_property
    def records(self) -> RegistrationLog:
        return RegistrationLog(self.state)

    @functools.cached_property
    def pending(self) -> PendingAuthorizations:
        """Authorizations between PAR and callback, in the state store: the serving processes (and a fleet's
        hosts) share them, since a callback may reach another one than its PAR did."""
        return PendingAuthorizations(store=StatePendingStore(self.state))

    def bank(self, name: str) -> BankConfig:
        return find_bank(self.sections.banks, name)

    def transport(self, name: str) -> BankTransport:
        """The bank's transport; rebuilt when the PKCS#11 module was re-initialised since it was made.

        A token that is away fails here, fast, with the pool's ``TokenUnavailableError``,
        not later as a TLS handshake error that would send the operator to the bank.
        """
        self.runtime.pool.ensure_ready()
        with self._lock:
            transport, settings = self._follow_rotation(name)
            if transport is not None and transport.tls.module_generation != self.runtime.module.generation:
                # Its key's handles died with C_Finalize: a new handshake with it could only fail, or
                # worse, reach whatever session or object now has the same handle number.
                _logger.info("transport_renewed", bank=name, reason="PKCS#11 module re-initialised")
                transport.close()
                transport = None
            if transport is None:
                transport = self._transports[name] = open_transport(self.runtime, settings)
            return transport

    def _follow_rotation(self, name: str) -> tuple[BankTransport | None, TlsSettings]:
        """The bank's transport unless its key was switched since it was built (then it is closed, and the
        bank's cached access tokens, bound to the old certificate, go with it); the settings to build one with."""
        bank = self.bank(name)
        key = self.transport_key(bank)
        settings = bank.tls if key == bank.tls.client_key else dataclasses.replace(bank.tls, client_key=key)
        transport = self._transports.get(name)
        if transport is not None and transport.settings.client_key != key:
            _logger.info("transport_renewed", bank=name, reason="rotation: the bank gets the successor's certificate",
                         key=key)
            transport.close()
            del self._transports[name]
            self._tokens.pop(name, None)
            transport = None
        return transport, settings

    def registrar_with(self, name: str, key: str) -> Registrar:
        """A registrar for ``bank`` presenting ``key``'s certificate (a rotation's successor), on a transport of
        its own: until the switch, every other request still goes with the bank's current key."""
        transport = open_transport(self.runtime, dataclasses.replace(self.bank(name).tls, client_key=key))
        identity = Identity(transport.tls.certificate_sha256, transport.tls.certificate.subject.rfc4514_string())
        with self._lock:
            self._side_transports.append(transport)  # closed with the others: its connection may be pooled
        return Registrar(self.bank(name), self.discovery(name), ObservedTransport(self, name, transport),
                         self.records, identity)

    def http(self, name: str) -> ObservedTransport:
        """Requests to the bank, on its transport as of each request, told to the observer."""
        return ObservedTransport(self, name)

    def discovery(self, name: str) -> Discovery:
        """The bank's discovery, one per bank for the life of this object (it keeps the cached document read).

        A fresh cached document needs no connection, so no PIN and no handshake either."""
        with self._lock:
            found = self._discoveries.get(name)
            if found is None:
                found = self._discoveries[name] = Discovery(self.bank(name), self.config.state_dir, self.http(name))
            return found

    def registrar(self, name: str) -> Registrar:
        transport = self.transport(name)
        identity = Identity(transport.tls.certificate_sha256, transport.tls.certificate.subject.rfc4514_string())
        return Registrar(self.bank(name), self.discovery(name), self.http(name), self.records, identity)

    def tokens(self, name: str) -> TokenClient:
        """The bank's token client; one per bank for the life of this object, so its token cache is shared."""
        with self._lock:
            self._follow_rotation(name)  # a switched bank's tokens are bound to the old certificate: not used again
            if name not in self._tokens:
                settings = self.sections.tokens
                transport = self.transport(name)
                self._tokens[name] = TokenClient(
                    self.signer, self.config, name, self.http(name),
                    metadata=lambda: self.discovery(name).get(),
                    client_id=settings.client_id or _common_name(transport),
                    use_mtls_aliases=self.bank(name).use_mtls_aliases, settings=settings,
                    on_lookup=(functools.partial(self.token_lookups, name) if self.token_lookups else None))
            return self._tokens[name]

    def jwks(self, name: str) -> BankJwks:
        """The bank's JWKS from its discovery's ``jwks_uri``; one per bank, so its cache is shared."""
        with self._lock:
            found = self._jwks.get(name)
            if found is None:
                found = self._jwks[name] = BankJwks(name, self.http(name), lambda: self._jwks_uri(name),
                                                    ttl=self.bank(name).jwks_ttl)
            return found

    def _jwks_uri(self, name: str) -> str:
        uri = self.discovery(name).get().endpoint("jwks_uri", False)
        if https_origin(uri) is None:
            raise JwksError(f"bank {name!r}: the jwks_uri of its discovery document is no https URL: {uri[:80]!r}")
        return uri

    def replay(self, name: str) -> ReplayGuard:
        """The bank's seen event ``jti`` values, in the shared state store (a fleet sees one delivery once)."""
        return ReplayGuard(store=StateReplayStore(self.state, name))

    def consents(self, name: str) -> ConsentClient:
        """The consent flow at the bank: its token client, its JWKS, the shared pending authorizations."""
        return ConsentClient(self.tokens(name), self.jwks(name), self.pending)

    def close(self) -> None:
        for transport in [*self._transports.values(), *self._side_transports]:
            transport.close()
        self._transports.clear()
        self._side_transports.clear()
        self._tokens.clear()
        self._jwks.clear()


def _common_name(transport: BankTransport) -> str:
    names = transport.tls.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigError(f"bank {transport.bank!r}: the transport certificate has no CN to use as client_id",
                         hint="set [tokens] client_id to the application's client ID from the directory")
    return str(names[0].value)


@dataclasses.dataclass(frozen=True)
class BankCall:
    """One request sent to a bank with the transport key, and how it ended."""

    bank: str
    key: str
    method: str
    url: str
    body: bytes | None
    interaction_id: str | None
    result: str
    seconds: float = 0.0  # until the whole answer, or the failure
    status: int | None = None  # the answer's HTTP status; None: no answer
    error: str | None = None  # the failure's class name (TransportError subclasses: agent/transport/errors.py)


class BankCallObserver(Protocol):
    def bank_call(self, call: BankCall) -> None: ...


class BankCallObservers:
    """Several observers, each told of every call in turn (the audit trail, the metrics)."""

    def __init__(self, *observers: BankCallObserver) -> None:
        self.observers = observers

    def bank_call(self, call: BankCall) -> None:
        for observer in self.observers:
            observer.bank_call(call)


class ObservedTransport:
    """A bank's transport as of each request: opened at the first one, renewed after a module re-initialisation
    (a token client or discovery object outlives transports), every request told to the observer.

    A request sent while an operation runs carries that operation's interaction id unless it names one, and the
    id the bank answers with is noted for its answer (agent/interaction.py).
    """

    def __init__(self, owner: OpenFinance, bank: str, fixed: BankTransport | None = None) -> None:
        self.owner = owner
        self.bank = bank
        self.fixed = fixed  # a transport of its own (a successor key's registration), else the bank's current one

    def _transport(self) -> BankTransport:
        return self.fixed or self.owner.transport(self.bank)

    def request(self, method: str, url: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None,
                limit: AnswerLimit = "max_response_bytes") -> Response:
        observer = self.owner.observer
        # The record says which host was called: the caller chose the URL (forward), within the bank's origins.
        host = _origin(url)
        started = time.monotonic()
        served = interaction.current()
        if interaction_id is None and served is not None:
            interaction_id = served.id
        try:
            response = self._transport().request(method, url, body=body, headers=headers,
                                                               interaction_id=interaction_id, limit=limit)
        except Exception as exc:
            error = type(exc).__name__
            observer.bank_call(dataclasses.replace(
                self._call(method, url, body, interaction_id, f"error: {error} at {host}"),
                seconds=time.monotonic() - started, error=error))
            raise
        echoed = response.bank_interaction_id
        if served is not None:
            served.bank_answered(echoed)
        observer.bank_call(dataclasses.replace(
            self._call(method, url, body, response.interaction_id, f"http {response.status} from {host}"
                       + (f" (its x-fapi-interaction-id {echoed[:64]})" if echoed else "")),
            seconds=time.monotonic() - started, status=response.status))
        return response

    def slot(self, what: str = "-", interaction_id: str = "-") -> AbstractContextManager[None]:
        return self._transport().slot(what, interaction_id)

    def _call(self, method: str, url: str, body: bytes | None, interaction_id: str | None, result: str) -> BankCall:
        fixed = self.fixed
        client_key = fixed.settings.client_key if fixed else self.owner.transport_key(self.owner.bank(self.bank))
        key = self.owner.runtime.keys.aliases.get(client_key, client_key)
        return BankCall(self.bank, key, method, url, body, interaction_id, result)


def _origin(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "an unparsable URL"
    return f"{parts.scheme}://{parts.netloc}"
