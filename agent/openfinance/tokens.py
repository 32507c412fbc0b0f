"""Access tokens and pushed authorization requests at one bank, with ``private_key_jwt`` over mTLS.

* ``client_credentials`` at the bank's ``token_endpoint``: a fresh client assertion (signed on the token) per
  request, sent over the same mTLS transport as everything else, so the bank binds the token to the transport
  certificate (RFC 8705).
* Tokens are cached in memory only, per bank and scope, until ``refresh_margin`` seconds (at most half the
  lifetime) before ``expires_in``; the next caller then gets a new one. One request per bank and scope is in
  flight at a time: concurrent callers wait for it instead of each asking the bank (past half a second, each
  wait takes one of the bank's ``max_in_flight`` places). Tokens are never written to disk nor logged.
* PAR: a signed request object plus a client assertion; the bank's ``request_uri`` and the PKCE verifier,
  state and nonce go back to the caller.

``[tokens]`` settings::

    [tokens]
    client_id = "…"            # the application's client ID in the directory (the transport certificate's CN)
    signing_key = "signing"    # alias or pkcs11: URI of the JWS signing key
    encryption_key = "encryption"  # alias of the key (purpose = "encryption") the bank's events are encrypted to
    refresh_margin = 30        # seconds before expiry a cached token is replaced
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from agent import jose
from agent.config import Config
from agent.errors import AgentError, ConfigError
from agent.openfinance.client import LimitedBankHttp
from agent.transport.places import BUSY_PATIENCE
from pkcs11_backends.keys import KeyStore

DEFAULT_SIGNING_KEY = "signing"
DEFAULT_ENCRYPTION_KEY = "encryption"
DEFAULT_REFRESH_MARGIN = 30.0
MAX_SCOPE_LENGTH = 1024  # characters: far more than any real set of scopes, far less than a request can carry
MAX_CACHED_SCOPES = 256  # distinct scopes whose tokens a bank's cache keeps (least recently used go first)
_FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}


class TokenError(AgentError):
    """The bank answered a token or PAR request with an error, or with something that is not a token."""

    hint = "read the bank's error above; the x-fapi-interaction-id lets the bank find the request in its logs"


class InvalidGrantError(TokenError):
    """``invalid_grant``: the code or refresh token is used, expired, revoked, or not this client's."""

    hint = ("the grant is gone: an authorization code is single-use; a refresh token is replaced at each refresh "
            "(keep the newest) and a replayed old one revokes the consent: the customer must consent again")


_HINTS = {
    "invalid_client": ("the bank did not accept the client authentication: check [tokens] client_id, that the "
                       "signing key's kid is in the directory's JWKS for this client, the transport certificate, "
                       "and that this host's clock is right"),
    "invalid_scope": "ask only for scopes the bank supports (scopes_supported in its discovery document)",
    "invalid_request_object": ("the bank refused the request object: check scope, redirect_uri and "
                               "authorization_details against what the bank registered for this client"),
}


class BankMetadata(Protocol):
    """What is needed from the bank's discovery document."""

    @property
    def issuer(self) -> str: ...

    def endpoint(self, name: str, use_mtls_aliases: bool) -> str: ...


@dataclasses.dataclass(frozen=True)
class TokenSettings:
    client_id: str | None = None
    signing_key: str = DEFAULT_SIGNING_KEY
    refresh_margin: float = DEFAULT_REFRESH_MARGIN
    encryption_key: str = DEFAULT_ENCRYPTION_KEY

    @classmethod
    def from_config(cls, config: Config) -> TokenSettings:
        raw = config.section("tokens")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [tokens]",
                              hint="known settings: client_id, signing_key, encryption_key, refresh_margin")
        for name in ("client_id", "signing_key", "encryption_key"):
            if name in raw and (not isinstance(raw[name], str) or not raw[name].strip()):
                raise ConfigError(f"[tokens] {name} must be a non-empty string")
        margin = raw.get("refresh_margin", DEFAULT_REFRESH_MARGIN)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 3600:
            raise ConfigError("[tokens] refresh_margin must be a number of seconds from 0 to 3600")
        return cls(raw.get("client_id"), raw.get("signing_key", DEFAULT_SIGNING_KEY), float(margin),
                   raw.get("encryption_key", DEFAULT_ENCRYPTION_KEY))


@dataclasses.dataclass(frozen=True)
class AccessToken:
    bank: str
    scope: str
    access_token: str = dataclasses.field(repr=False)
    token_type: str
    expires_at: float  # time.time() seconds
    interaction_id: str

    def expires_in(self, now: float | None = None) -> int:
        return max(0, int(self.expires_at - (time.time() if now is None else now)))

    def as_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "scope": self.scope, "access_token": self.access_token,
                "token_type": self.token_type, "expires_in": self.expires_in(),
                "interaction_id": self.interaction_id}


@dataclasses.dataclass(frozen=True)
class PushedAuthorization:
    bank: str
    request_uri: str
    expires_in: int
    code_verifier: str = dataclasses.field(repr=False)
    state: str
    nonce: str | None  # None without scope openid
    interaction_id: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Cached:
    token: AccessToken
    refresh_at: float


class _ScopeLock:
    """A scope's lock, in a weak-value map: it goes when no request for that scope holds it."""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class TokenClient:
    """Tokens and PAR for one bank over its transport. Keep one per bank: the cache lives here."""

    def __init__(self, store: KeyStore, config: Config, bank: str, http: LimitedBankHttp, *,
                 metadata: Callable[[], BankMetadata], client_id: str, use_mtls_aliases: bool = False,
                 settings: TokenSettings | None = None, clock: Callable[[], float] = time.time,
                 on_lookup: Callable[[bool], None] | None = None) -> None:
        self.store, self.config, self.bank, self.http = store, config, bank, http
        self.metadata = metadata
        self.client_id = client_id
        self.use_mtls_aliases = use_mtls_aliases
        self.settings = settings or TokenSettings.from_config(config)
        self.clock = clock
        self.requests = 0  # token requests actually sent to the bank
        self._on_lookup = on_lookup  # told of each lookup: whether the cache had the token
        # Scopes are the caller's choice: the cache keeps the most recently used MAX_CACHED_SCOPES, and a scope's
        # lock lives only while a request for it is under way (weakly held), so neither grows with callers' junk.
        self._cache: collections.OrderedDict[str, _Cached] = collections.OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, _ScopeLock] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def client_assertion(self, metadata: BankMetadata | None = None) -> str:
        """A fresh signed assertion for this bank (``aud`` = its issuer from discovery)."""
        audience = (metadata or self.metadata()).issuer
        return jose.client_assertion(self.store, self.config, self.settings.signing_key, self.client_id, audience)

    def token(self, scope: str, *, refresh: bool = False) -> AccessToken:
        """A valid access token for ``scope``: the cached one, or a new one when it is close to expiry."""
        scope = normalise_scope(scope)
        if not refresh and (cached := self._fresh(scope)) is not None:
            self._looked_up(True)
            return cached  # no bank call, so no place among the bank's requests in flight
        with self._lock:
            held = self._locks.get(scope)
            if held is None:
                held = self._locks[scope] = _ScopeLock()
        with self._turn(held.lock):
            if not refresh and (cached := self._fresh(scope)) is not None:
                self._looked_up(True)
                return cached  # the request waited for brought it
            self._looked_up(False)
            with self._lock:
                self._cache.pop(scope, None)
            token, lifetime = self._request_token(scope)
            if lifetime > 0:
                margin = min(self.settings.refresh_margin, lifetime / 2)
                with self._lock:
                    self._cache[scope] = _Cached(token, token.expires_at - margin)
                    while len(self._cache) > MAX_CACHED_SCOPES:
                        self._cache.popitem(last=False)
            return token

    def _looked_up(self, hit: bool) -> None:
        if self._on_lookup is not None:
            self._on_lookup(hit)

    @contextlib.contextmanager
    def _turn(self, lock: threading.Lock) -> Iterator[None]:
        """The scope's lock. Waiting longer than a healthy bank takes counts as a request at the bank (one of its
        places in flight, or ``BankBusyError``): a slow bank must not gather every bank worker in this wait."""
        if lock.acquire(timeout=BUSY_PATIENCE):
            try:
                yield
            finally:
                lock.release()
            return
        with self.http.slot("token request"), lock:
            yield

    def _fresh(self, scope: str) -> AccessToken | None:
        with self._lock:
            cached = self._cache.get(scope)
            if cached is None or self.clock() >= cached.refresh_at:
                return None
            self._cache.move_to_end(scope)  # recently used: the last to go when the cache is full
            return cached.token

    def forget(self) -> None:
        """Drop every cached token (e.g. after the transport certificate changed)."""
        with self._lock:
            self._cache.clear()

    def push_authorization(self, *, scope: str, redirect_uri: str,
                           authorization_details: Sequence[Mapping[str, Any]] | None = None,
                           state: str | None = None, nonce: str | None = None,
                           parameters: Mapping[str, Any] | None = None) -> PushedAuthorization:
        """Sign a request object, push it with a client assertion, return the bank's ``request_uri``.

        ``parameters``: the optional request parameters (``resource``, ``prompt``, ``max_age``, ``acr_values``,
        ``claims``), checked by :func:`agent.jose.assertions.check_authorization_parameters`.
        """
        metadata = self.metadata()
        made = jose.request_object(self.store, self.config, self.settings.signing_key, self.client_id,
                                   metadata.issuer, scope=normalise_scope(scope), redirect_uri=redirect_uri,
                                   authorization_details=authorization_details, state=state, nonce=nonce,
                                   parameters=parameters)
        url = metadata.endpoint("pushed_authorization_request_endpoint", self.use_mtls_aliases)
        answer, interaction_id = self._post(url, {"client_id": self.client_id, "request": made.request,
                                                  **self._client_auth(metadata)},
                                            "pushed authorization request", (200, 201))
        request_uri, expires_in = answer.get("request_uri"), answer.get("expires_in")
        if not isinstance(request_uri, str) or not request_uri or isinstance(expires_in, bool) \
                or not isinstance(expires_in, int):
            raise TokenError(f"bank {self.bank!r}: the PAR answer lacks request_uri or expires_in "
                             f"(x-fapi-interaction-id {interaction_id})")
        return PushedAuthorization(self.bank, request_uri, expires_in, made.code_verifier, made.state, made.nonce,
                                   interaction_id)

    def exchange(self, form: Mapping[str, str], what: str) -> tuple[dict[str, Any], str]:
        """POST a grant (``authorization_code``, ``refresh_token``) with a fresh client assertion to the token
        endpoint; the JSON answer and the interaction id. Not cached: the caller owns what comes back."""
        metadata = self.metadata()
        url = metadata.endpoint("token_endpoint", self.use_mtls_aliases)
        self.requests += 1
        return self._post(url, {**form, "client_id": self.client_id, **self._client_auth(metadata)}, what, (200,))

    # -- internals ---------------------------------------------------------------------
    def _client_auth(self, metadata: BankMetadata) -> dict[str, str]:
        return {"client_assertion_type": jose.CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(metadata)}

    def _request_token(self, scope: str) -> tuple[AccessToken, int]:
        metadata = self.metadata()
        url = metadata.endpoint("token_endpoint", self.use_mtls_aliases)
        form = {"grant_type": "client_credentials", "scope": scope, "client_id": self.client_id,
                **self._client_auth(metadata)}
        sent_at = self.clock()
        self.requests += 1
        answer, interaction_id = self._post(url, form, "token request", (200,))
        access, token_type, expires_in = answer.get("access_token"), answer.get("token_type"), answer.get("expires_in")
        if not isinstance(access, str) or not access or not isinstance(token_type, str):
            raise TokenError(f"bank {self.bank!r}: the token answer lacks access_token or token_type "
                             f"(x-fapi-interaction-id {interaction_id})")
        if token_type.lower() != "bearer":
            raise TokenError(f"bank {self.bank!r} issued a {token_type!r} token; only certificate-bound Bearer "
                             "tokens are supported")
        # No expires_in (it is only RECOMMENDED): lifetime 0, so the token is used once and not cached.
        lifetime = expires_in if isinstance(expires_in, int) and not isinstance(expires_in, bool) else 0
        granted = normalise_scope(answer["scope"]) if isinstance(answer.get("scope"), str) else scope
        # Counted from when the request left: the bank's clock for it started no earlier.
        return AccessToken(self.bank, granted, access, token_type, sent_at + lifetime, interaction_id), lifetime

    def _post(self, url: str, form: Mapping[str, str], what: str,
              success: tuple[int, ...]) -> tuple[dict[str, Any], str]:
        response = self.http.request("POST", url, body=urllib.parse.urlencode(form).encode("ascii"), headers=_FORM)
        where = f"(x-fapi-interaction-id {response.interaction_id})"
        try:
            answer = json.loads(response.body) if response.body else {}
        except ValueError:
            answer = None
        if response.status not in success:
            error = answer.get("error") if isinstance(answer, dict) else None
            description = answer.get("error_description", "") if isinstance(answer, dict) else ""
            detail = (f": {error}" + (f": {description}" if description else "")) if error else ""
            refusal = InvalidGrantError if error == "invalid_grant" else TokenError
            raise refusal(f"bank {self.bank!r} refused the {what}: HTTP {response.status}{detail} {where}",
                          hint=_HINTS.get(str(error)))
        if not isinstance(answer, dict):
            raise TokenError(f"bank {self.bank!r} answered the {what} without a JSON object {where}")
        return answer, response.interaction_id


def normalise_scope(scope: str) -> str:
    """One spelling per set of scopes (order and repeats do not matter), so the cache finds it."""
    if len(scope) > MAX_SCOPE_LENGTH:
        raise TokenError(f"the scope has {len(scope)} characters, more than the {MAX_SCOPE_LENGTH} allowed",
                         hint="ask for the scopes the bank defines, e.g. accounts")
    parts = sorted(set(scope.split()))
    if not parts:
        raise TokenError("a scope is required", hint="pass --scope, e.g. --scope accounts")
    return " ".join(parts)
