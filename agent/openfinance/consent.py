"""The authorization code flow as a sans-I/O state machine: what is kept, what is checked, what is sent.

    flows = PendingAuthorizations()                         # bounded per caller, expiring; shared by processes
    flows.add(PendingAuthorization(...))                    # after PAR: verifier, state, nonce stay here
    url = authorization_url(endpoint, client_id, request_uri)
    grant = flows.take_callback(query, bank)                # the redirect: state, iss (RFC 9207), single use, age
    form = code_exchange_form(grant)                        # + a fresh client assertion, POSTed by the caller
    tokens = TokenAnswer.parse(answer)                      # access/refresh token, authorization_details
    claims = check_id_token_claims(verified.claims, ...)    # after the signature (agent.jose.verify)
    form = refresh_form(refresh_token)                      # the bank may rotate: keep the newest

Nothing here does I/O or touches a key; :mod:`agent.openfinance.authorization` drives it over mTLS.
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.errors import AgentError
from agent.jose.errors import ClaimRejectedError, NonceMismatchError, WrongAudienceError
from agent.jose.verify import LEEWAY

DEFAULT_PENDING_LIFETIME = 600.0  # a customer has ten minutes to consent
DEFAULT_MAX_PENDING = 1024  # per caller (``owner``): one service's flood of PARs never evicts another's
MAX_CALLBACK_LENGTH = 8192


class ConsentFlowError(AgentError):
    """The redirect back from the bank cannot complete a consent."""

    hint = "start the consent again with par; the redirect's state is single-use and expires"


class UnknownStateError(ConsentFlowError):
    """No authorization started here has this state (never, already used, or expired and forgotten)."""


class CallbackExpiredError(ConsentFlowError):
    pass


class StateInUseError(ConsentFlowError):
    """A PAR with a state that is already pending: states are single-use keys, never shared."""

    hint = "let the agent choose the state, or use a fresh random one"


class CallbackIssuerError(ConsentFlowError):
    """``iss`` in the redirect is not the issuer the PAR went to (RFC 9207: a mix-up attack, or a stray redirect)."""

    hint = "do not use this code; check that the redirect came from the bank the consent was started at"


class MalformedCallbackError(ConsentFlowError):
    hint = "pass the redirect's query string exactly as received (code, state, iss or error, error_description)"


class AuthorizationDeniedError(ConsentFlowError):
    """The bank redirected with ``error`` (the customer declined, or the bank refused the request)."""

    def __init__(self, error: str, description: str, state: str) -> None:
        text = f"the bank answered the authorization with {error}" + (f": {description}" if description else "")
        super().__init__(text, hint="show the customer the outcome; start a new consent if they want to retry")
        self.error, self.description, self.state = error, description, state


class TokenAnswerError(AgentError):
    hint = "the bank's token answer is not what the UAE profile describes; ask the bank"


@dataclasses.dataclass(frozen=True)
class PendingAuthorization:
    """What the agent keeps between PAR and the redirect back; the caller only ever sees ``state``."""

    bank: str
    issuer: str
    client_id: str
    state: str
    nonce: str | None  # None without scope openid (no id_token asked, no nonce sent)
    code_verifier: str = dataclasses.field(repr=False)
    redirect_uri: str
    request_uri: str
    scope: str
    max_age: int | None
    created_at: float  # time.time()
    expires_at: float
    owner: str = ""  # who started it (the caller's uid): the bound on pending authorizations is per owner
    # The PAR asked for authorization_details: the token answer must then carry them (RFC 9396 §7). True for a
    # row stored before this field existed: the stricter reading.
    details_requested: bool = True


@dataclasses.dataclass(frozen=True)
class AuthorizationGrant:
    """A callback that passed: the code, and the pending authorization it completes (consumed)."""

    code: str = dataclasses.field(repr=False)
    pending: PendingAuthorization


class PendingStore(Protocol):
    """Where pending authorizations live: this process (:class:`MemoryPendingStore`) or a database the serving
    processes and hosts share (:class:`agent.openfinance.flow_state.StatePendingStore`)."""

    def put(self, pending: PendingAuthorization, *, max_pending: int, now: float) -> bool:
        """Keep ``pending`` (dropping expired ones, then its owner's oldest beyond ``max_pending``); False if
        its state is already pending."""

    def pop(self, state: str, bank: str) -> PendingAuthorization | None:
        """The pending authorization for ``state`` at ``bank``, removed in the same step (two callers: one gets
        it). One of another bank stays: a callback at the wrong bank neither completes nor spoils it."""

    def __len__(self) -> int: ...


class MemoryPendingStore:
    """Pending authorizations in this process's memory (one process, or tests)."""

    def __init__(self) -> None:
        self._pending: OrderedDict[str, PendingAuthorization] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, pending: PendingAuthorization, *, max_pending: int, now: float) -> bool:
        with self._lock:
            if pending.state in self._pending:
                return False
            for state in [s for s, p in self._pending.items() if p.expires_at < now]:
                del self._pending[state]
            owned = [s for s, p in self._pending.items() if p.owner == pending.owner]  # oldest first
            for state in owned[:max(0, len(owned) - max_pending + 1)]:
                del self._pending[state]
            self._pending[pending.state] = pending
            return True

    def pop(self, state: str, bank: str) -> PendingAuthorization | None:
        with self._lock:
            found = self._pending.get(state)
            return self._pending.pop(state) if found is not None and found.bank == bank else None


class PendingAuthorizations:
    """Pending authorizations by state: at most ``max_pending`` per owner, each for ``lifetime`` seconds, each
    taken once.

    When an owner has ``max_pending``, expired entries go first, then its oldest: a flood of PARs makes the
    flooder's old consents fail (and say so), never another caller's, never the store grow without bound. With
    several serving processes, give them one shared ``store``: a callback may reach another process than the
    PAR did.
    """

    def __init__(self, *, store: PendingStore | None = None, lifetime: float = DEFAULT_PENDING_LIFETIME,
                 max_pending: int = DEFAULT_MAX_PENDING, clock: Callable[[], float] = time.time) -> None:
        self.store = store if store is not None else MemoryPendingStore()
        self.lifetime, self.max_pending, self.clock = lifetime, max_pending, clock

    def __len__(self) -> int:
        return len(self.store)

    def new(self, **fields: Any) -> PendingAuthorization:
        """A pending authorization starting now, kept."""
        now = self.clock()
        pending = PendingAuthorization(**fields, created_at=now, expires_at=now + self.lifetime)
        self.add(pending)
        return pending

    def add(self, pending: PendingAuthorization) -> None:
        if not self.store.put(pending, max_pending=self.max_pending, now=self.clock()):
            raise StateInUseError("an authorization with this state is already pending")

    def take(self, state: str, bank: str) -> PendingAuthorization:
        """The pending authorization for ``state`` at ``bank``, removed (single use), if not expired."""
        pending = self.store.pop(state, bank)
        if pending is None:
            raise UnknownStateError("the redirect's state matches no pending authorization "
                                    "(unknown, already used, or forgotten after it expired)")
        if self.clock() > pending.expires_at:
            raise CallbackExpiredError(f"the authorization for this state expired "
                                       f"{int(self.clock() - pending.expires_at)} s ago")
        return pending

    def take_callback(self, query: str | Mapping[str, str], bank: str) -> AuthorizationGrant:
        """Check a redirect's query and consume its pending authorization at ``bank``.

        The state is consumed whatever follows (an error, a wrong ``iss``): a code is only good once, and a
        redirect that failed a check must not be tried again. ``iss`` must be present and equal the issuer the
        PAR went to (kept with the pending authorization).
        """
        params = parse_callback(query)
        state = params.get("state")
        if not state:
            raise MalformedCallbackError("the redirect has no state")
        pending = self.take(state, bank)
        expected = pending.issuer
        # iss before anything else, error answers included (RFC 9207 §2.4): they too can be injected.
        issuer = params.get("iss")
        if issuer is None:
            raise CallbackIssuerError("the redirect has no iss (RFC 9207): it cannot be tied to a bank")
        if not hmac.compare_digest(issuer.encode("utf-8"), expected.encode("utf-8")):
            raise CallbackIssuerError(f"the redirect's iss is {issuer!r}; the consent was started at {expected!r}")
        if "error" in params:
            raise AuthorizationDeniedError(params["error"], params.get("error_description", ""), state)
        code = params.get("code")
        if not code:
            raise MalformedCallbackError("the redirect has neither code nor error")
        return AuthorizationGrant(code, pending)


def parse_callback(query: str | Mapping[str, str]) -> dict[str, str]:
    """The redirect's parameters from its query string (a leading ``?`` or a full URL is accepted) or a mapping."""
    if isinstance(query, str):
        if len(query) > MAX_CALLBACK_LENGTH:
            raise MalformedCallbackError(f"the redirect query is longer than {MAX_CALLBACK_LENGTH} characters")
        text = urllib.parse.urlsplit(query).query if "://" in query else query.removeprefix("?")
        try:
            pairs = urllib.parse.parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            raise MalformedCallbackError("the redirect query is not a form-encoded query string") from None
        if any(len(values) > 1 for values in pairs.values()):
            raise MalformedCallbackError("a parameter is repeated in the redirect query")
        return {name: values[0] for name, values in pairs.items()}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in query.items()):
        raise MalformedCallbackError("the redirect's parameters must be strings")
    return dict(query)


def authorization_url(endpoint: str, client_id: str, request_uri: str, *, openid: bool = True) -> str:
    """``authorization_endpoint?client_id=…&request_uri=…`` (RFC 9126 §4), keeping any query the endpoint has;
    for an OpenID request (``openid``) ``response_type=code&scope=openid`` too, which OIDC Core §6.1 wants
    outside a request object and the UAE examples add. A plain OAuth request gets no openid it did not ask for."""
    parts = urllib.parse.urlsplit(endpoint)
    oidc = {"response_type": "code", "scope": "openid"} if openid else {}
    query = urllib.parse.urlencode({"client_id": client_id, "request_uri": request_uri, **oidc})
    return urllib.parse.urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


def code_exchange_form(grant: AuthorizationGrant) -> dict[str, str]:
    """The token request for a code (client authentication is added by the sender)."""
    return {"grant_type": "authorization_code", "code": grant.code, "redirect_uri": grant.pending.redirect_uri,
            "code_verifier": grant.pending.code_verifier}


def refresh_form(refresh_token: str) -> dict[str, str]:
    if not isinstance(refresh_token, str) or not refresh_token.strip():
        raise TokenAnswerError("a refresh token is required", hint="pass the newest refresh token the bank issued")
    return {"grant_type": "refresh_token", "refresh_token": refresh_token}


@dataclasses.dataclass(frozen=True)
class TokenAnswer:
    """A token answer for a consent: what the caller must keep (``refresh_token`` replaces any older one)."""

    access_token: str = dataclasses.field(repr=False)
    token_type: str
    expires_in: int
    refresh_token: str | None = dataclasses.field(repr=False)
    id_token: str | None = dataclasses.field(repr=False)
    scope: str | None
    authorization_details: list[dict[str, Any]]

    @classmethod
    def parse(cls, answer: Mapping[str, Any], *, where: str = "", details_required: bool = True) -> TokenAnswer:
        """``details_required``: the request had authorization_details, so the answer must say what was granted
        (RFC 9396 §7). Otherwise absent ones are none: a consent by scope alone has none, and a refresh is not
        told what its consent asked (the caller has the details of the code exchange)."""
        access, token_type = answer.get("access_token"), answer.get("token_type")
        if not isinstance(access, str) or not access or not isinstance(token_type, str):
            raise TokenAnswerError(f"the token answer lacks access_token or token_type {where}".strip())
        if token_type.lower() != "bearer":
            raise TokenAnswerError(f"the bank issued a {token_type!r} token; only certificate-bound Bearer tokens "
                                   "are supported")
        expires_in = answer.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in < 0:
            raise TokenAnswerError(f"the token answer's expires_in is {expires_in!r}, not a number of seconds")
        details = answer.get("authorization_details")
        if not details_required and details in (None, []):
            details = []
        elif not isinstance(details, list) or not details or not all(isinstance(d, dict) for d in details):
            raise TokenAnswerError("the token answer has no authorization_details (the consent and its Status) "
                                   f"{where}".strip())
        optional = {name: answer.get(name) for name in ("refresh_token", "id_token", "scope")}
        for name, value in optional.items():
            if value is not None and (not isinstance(value, str) or not value):
                raise TokenAnswerError(f"the token answer's {name} is not a non-empty string")
        return cls(access, token_type, expires_in, optional["refresh_token"], optional["id_token"],
                   optional["scope"], details)


def check_id_token_claims(claims: Mapping[str, Any], *, client_id: str, nonce: str | None, now: float | None = None,
                          max_age: int | None = None, leeway: int = LEEWAY) -> dict[str, Any]:
    """OIDC Core §3.1.3.7 beyond the signature and iss/aud/exp (checked by ``verify_jws``): ``iat``, ``sub``,
    ``azp`` when there are several audiences, the ``nonce`` of the request, ``auth_time`` against ``max_age``."""
    moment = time.time() if now is None else now
    for name in ("sub", "iat", "exp"):
        if name not in claims:
            raise ClaimRejectedError(f"id_token: claim {name!r} is required")
    aud = claims.get("aud")
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != client_id:
        raise WrongAudienceError(f"id_token: several audiences and azp {claims.get('azp')!r} is not {client_id!r}")
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode("utf-8"), nonce.encode("utf-8")):
            raise NonceMismatchError("id_token: its nonce is not the one sent in the authorization request")
    if max_age is not None:
        auth_time = claims.get("auth_time")
        if isinstance(auth_time, bool) or not isinstance(auth_time, int):
            raise ClaimRejectedError("id_token: auth_time is required when max_age was requested")
        if moment - auth_time > max_age + leeway:
            raise ClaimRejectedError(f"id_token: the customer authenticated {int(moment - auth_time)} s ago, "
                                     f"more than max_age {max_age}")
    return dict(claims)
