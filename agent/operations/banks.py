"""Bank operations: discovery, registration, client assertions, tokens and the forward call (the consent flow,
PAR included, is agent/operations/consents.py).

Each acts on one configured bank and may call it (so the server runs it on the bank workers). The forward
call is no open proxy: its URL must be on an origin the configuration or the verified discovery document
names for that bank (issuer, discovery URL, registration, token and PAR endpoints, their mTLS aliases, and
``[banks.NAME] api_origins``) — never any other string of the document; redirects come back to the caller,
never followed; the audit record names the host called.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from agent.errors import InputError
from agent.jose import CLIENT_ASSERTION_TYPE
from agent.openfinance.banks import https_origin
from agent.openfinance.discovery import ENDPOINTS
from agent.openfinance.payloads import check_idempotency_key
from agent.openfinance.records import Attempt
from agent.openfinance.tokens import MAX_SCOPE_LENGTH, normalise_scope
from agent.operations.core import Context
from agent.operations.errors import PolicyDenied
from agent.operations.inputs import InvalidInput, Nothing, base64_bytes, text
from agent.operations.spec import Operation, Resource, Spec

MAX_FORWARD_BODY = 1 << 20
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")  # no control characters (CR, LF, NUL...)
# Set by the transport, or meaningless across the hop.
_DROPPED_HEADERS = frozenset({"host", "connection", "keep-alive", "content-length", "transfer-encoding", "upgrade",
                              "proxy-authorization", "te", "trailer", "x-fapi-interaction-id"})


class BankAnswer(TypedDict):
    """What every bank operation's answer carries (agent/interaction.py): the id of this interaction, sent to the
    bank on every request the operation made, and the bank's own when it answered with another."""

    interaction_id: Annotated[str, "this request's x-fapi-interaction-id: the caller's, else the agent's"]
    bank_interaction_id: NotRequired[Annotated[str, "the x-fapi-interaction-id the bank answered with, when it "
                                                    "is not interaction_id"]]


class DiscoveryAnswer(BankAnswer):
    bank: str
    url: Annotated[str, "where the document was fetched"]
    fetched_at: Annotated[str, "ISO 8601"]
    document: Annotated[dict[str, Any], "the bank's OpenID discovery document, its issuer checked"]
    fetched_now: Annotated[bool, "false: from the cache (no request to the bank)"]
    cache_file: str
    use_mtls_aliases: bool


class RegistrationAnswer(BankAnswer):
    bank: str
    endpoint: str
    status: Annotated[int, "the bank's HTTP status (0 when nothing was sent)"]
    duration_ms: float
    already_registered: Annotated[Attempt | None, "the earlier success that stands: nothing was sent"]


class ClientAssertionAnswer(BankAnswer):
    bank: str
    client_id: str
    client_assertion: Annotated[str, "a signed JWT, aud the bank's issuer"]
    client_assertion_type: Literal["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]


class TokenAnswer(BankAnswer):
    bank: str
    scope: Annotated[str, "as granted, in one spelling"]
    access_token: str
    token_type: Annotated[str, "Bearer (as the bank spells it): only certificate-bound Bearer tokens are taken"]
    expires_in: Annotated[int, "seconds from now"]
    token_interaction_id: Annotated[str, "the interaction in which the bank issued the token: this one, or an "
                                         "earlier one when it came from the cache"]


class ForwardAnswer(BankAnswer):
    status: Annotated[int, "the bank's HTTP status: any status is an answer"]
    headers: Annotated[dict[str, str], "the bank's header fields, names in lower case"]
    body_b64: Annotated[str, "the bank's body, base64"]
    url: Annotated[str, "the URL called"]


@dataclasses.dataclass(frozen=True)
class DiscoveryInput:
    refresh: bool = False


def discovery(context: Context, given: DiscoveryInput) -> dict[str, Any]:
    found = context.core.banks.discovery(context.bank_name)
    before = found.cached()
    document = found.get(refresh=given.refresh)
    return {**document.as_dict(), "fetched_now": before is None or before.fetched_at != document.fetched_at,
            "cache_file": str(found.cache_file), "use_mtls_aliases": found.bank.use_mtls_aliases}


@dataclasses.dataclass(frozen=True)
class RegisterInput:
    force: bool = False


def register(context: Context, given: RegisterInput) -> dict[str, Any]:
    return dict(context.core.banks.registrar(context.bank_name).register(force=given.force).as_dict())



def client_assertion(context: Context, _: Nothing) -> dict[str, Any]:
    """A fresh client assertion (``aud`` = the bank's issuer), for a caller that posts to the bank itself."""
    tokens = context.core.banks.tokens(context.bank_name)
    return {"bank": context.bank_name, "client_id": tokens.client_id, "client_assertion": tokens.client_assertion(),
            "client_assertion_type": CLIENT_ASSERTION_TYPE}


@dataclasses.dataclass(frozen=True)
class TokenInput:
    """client_credentials only: any other grant's fields (grant_type, code...) are unknown fields, refused."""

    scope: str = text(MAX_SCOPE_LENGTH)
    refresh: bool = False


def token(context: Context, given: TokenInput) -> dict[str, Any]:
    """An access token for the scope: cached per bank and scope, else fetched with a fresh assertion.

    The token goes back to the caller (that is the point) and nowhere else: not the log, not the audit trail.
    """
    scope = granted_scope(context, given.scope)
    context.log["scope"] = scope
    issued = context.core.banks.tokens(context.bank_name).token(scope, refresh=given.refresh)
    # A cached token was issued in an earlier interaction: the answer's interaction_id is this one's.
    return {**issued.as_dict(), "token_interaction_id": issued.interaction_id}


def granted_scope(context: Context, scope: str) -> str:
    """The scope in one spelling, if the caller's rules allow every scope in it (``scopes = [...]``)."""
    if not scope.strip():
        raise InvalidInput("missing_field", "field 'scope' (space-separated scopes, e.g. \"accounts\") is required")
    normal = normalise_scope(scope)
    allowed = context.grants.scopes(context.spec.operation, context.bank_name)
    if allowed is not None:
        extra = sorted(set(normal.split()) - allowed)
        if extra:
            raise PolicyDenied(f"scope {extra[0][:80]!r} is not among the scopes the caller may ask bank "
                               f"{context.bank_name!r} for ({', '.join(sorted(allowed)) or 'none'})",
                               hint="add it to the rule's scopes = [...] if the service needs it")
    return normal


@dataclasses.dataclass(frozen=True)
class ForwardInput:
    method: str = text(8)
    path: str | None = text(4096, None)
    url: str | None = text(4096, None)
    headers: dict[str, str] = dataclasses.field(default_factory=dict, metadata={"max": 64})
    body_b64: bytes | None = base64_bytes(MAX_FORWARD_BODY, None)

    def check(self) -> None:
        if self.method not in _METHODS:
            raise InvalidInput("bad_field", f"field 'method' must be one of {', '.join(sorted(_METHODS))}")
        if (self.path is None) == (self.url is None):
            raise InvalidInput("missing_field", "give exactly one of 'path' (on the bank's issuer host) or 'url'")
        for name, value in self.headers.items():
            if not _HEADER_NAME.match(name):
                raise InvalidInput("bad_field", f"header name {name[:40]!r} is not an HTTP token",
                                   hint="names are letters, digits and !#$%&'*+.^_`|~- only (no spaces)")
            if not _HEADER_VALUE.match(value):
                bad = next(c for c in value if not _HEADER_VALUE.match(c))
                raise InvalidInput("bad_field", f"header {name!r} holds the control character {bad!r}",
                                   hint="header values are text without line breaks, NUL or other controls")
            if name.lower() == "x-idempotency-key":
                try:  # sent as given, so a retry with the same key is the same payment to the bank
                    check_idempotency_key(value)
                except InputError as exc:
                    raise InvalidInput("bad_idempotency_key", str(exc), exc.hint) from None


def forward(context: Context, given: ForwardInput) -> dict[str, Any]:
    origins = allowed_origins(context)
    url = _bank_url(context.bank_name, origins, given.path, given.url)
    sent = {k: v for k, v in given.headers.items() if k.lower() not in _DROPPED_HEADERS}
    context.log["method_forwarded"] = given.method
    answer = context.core.banks.http(context.bank_name).request(given.method, url, body=given.body_b64, headers=sent,
                                                                interaction_id=context.caller.interaction_id)
    return {"status": answer.status, "headers": dict(answer.headers),
            "body_b64": base64.b64encode(answer.body).decode("ascii"),
            "interaction_id": answer.interaction_id, "url": url}


def allowed_origins(context: Context) -> list[str]:
    """Where requests to the bank may go: its configured origins and its verified discovery document's
    named endpoints (the first: the issuer's, where a ``path`` goes)."""
    bank = context.core.bank(context.bank_name)
    urls: list[object] = [bank.issuer, bank.discovery_url, *bank.api_origins]
    cached = context.core.banks.discovery(context.bank_name).cached()
    if cached is not None:
        document = cached.document
        aliases = document.get("mtls_endpoint_aliases")
        urls += [document.get(name) for name in ENDPOINTS]
        if isinstance(aliases, dict):
            urls += list(aliases.values())
    origins: list[str] = []
    for url in urls:
        origin = https_origin(url) if isinstance(url, str) else None
        if origin is not None and origin not in origins:
            origins.append(origin)
    return origins


def _bank_url(bank: str, origins: list[str], path: str | None, url: str | None) -> str:
    if path is not None:
        if not path.startswith("/") or path.startswith("//") or any(c in path for c in " \r\n#\\"):
            raise InvalidInput("bad_path", f"path {path[:80]!r} must be an absolute path like /open-finance/...")
        return origins[0] + path
    assert url is not None  # ForwardInput.check: exactly one of path and url
    origin = https_origin(url)
    if origin is None or origin not in origins or any(c in url for c in " \r\n\t\\"):
        shown = origin or url[:80]
        raise InvalidInput("host_not_allowed", f"{shown} is not an endpoint of bank {bank!r}",
                           hint=f"the agent forwards only to {', '.join(origins)}")
    return url.split("#", 1)[0]


SPECS: tuple[Spec[Any], ...] = (
    Spec("discovery", Operation.DISCOVERY, "the bank's verified discovery document", Resource.BANK,
         DiscoveryInput, discovery, calls_bank=True, result=DiscoveryAnswer),
    Spec("register", Operation.REGISTER, "register the application with the bank", Resource.BANK, RegisterInput,
         register, calls_bank=True, result=RegistrationAnswer),
    # It may fetch discovery for the audience: a bank operation.
    Spec("client_assertion", Operation.CLIENT_ASSERTION, "a client assertion for the bank", Resource.BANK, Nothing,
         client_assertion, calls_bank=True, result=ClientAssertionAnswer),
    Spec("token", Operation.TOKEN, "a client_credentials access token", Resource.BANK, TokenInput, token,
         calls_bank=True, result=TokenAnswer),
    Spec("forward", Operation.FORWARD, "a request to the bank over mTLS", Resource.BANK, ForwardInput, forward,
         calls_bank=True, result=ForwardAnswer),
)
