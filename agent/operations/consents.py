"""The consent flow (authorization code flow with PAR and PKCE) as operations: start, complete, refresh.

``par`` signs and pushes the request and keeps the PKCE verifier, state and nonce inside the agent (the state
store: any serving process or host can take the callback); ``consent_callback`` checks the redirect and
exchanges its code; ``consent_refresh`` swaps a refresh token for new tokens. Each is its own grant and its own
audit records: a service that only completes consents needs ``consent_callback``, not ``forward`` nor
``client_assertion``. The tokens go back to the caller and nowhere else (not the log, not the audit trail).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from agent.audit import KeyUse
from agent.jose.errors import JoseError
from agent.openfinance.authorization import ConsentTokens, StartedConsent
from agent.openfinance.banks import https_origin
from agent.openfinance.consent import MAX_CALLBACK_LENGTH, ConsentFlowError, TokenAnswerError
from agent.openfinance.tokens import MAX_SCOPE_LENGTH
from agent.operations.banks import granted_scope
from agent.operations.core import Context
from agent.operations.inputs import InvalidInput, text
from agent.operations.spec import Operation, Resource, Spec

MAX_REFRESH_TOKEN = 4096
T = TypeVar("T")


class IdTokenRefusedError(TokenAnswerError):
    """The bank's id_token did not verify (signature, key, iss, aud, exp, iat, nonce, auth_time): the tokens
    that came with it are not used, and are not handed out."""

    hint = "do not use this consent; start it again, and ask the bank if it keeps happening"


@dataclasses.dataclass(frozen=True)
class ParInput:
    scope: str = text(MAX_SCOPE_LENGTH)
    redirect_uri: str = text(2048)
    state: str | None = text(512, None)  # default: 128 random bits, chosen by the agent
    nonce: str | None = text(512, None)
    authorization_details: list[dict[str, Any]] | None = dataclasses.field(default=None, metadata={"max": 64})
    # The optional request parameters a bank may require (agent.jose.assertions.AUTHORIZATION_PARAMETERS).
    resource: list[str] | None = dataclasses.field(default=None, metadata={"max": 16})
    prompt: str | None = text(128, None)
    max_age: int | None = None
    acr_values: str | None = text(1024, None)
    claims: dict[str, Any] | None = dataclasses.field(default=None, metadata={"max": 2})

    def check(self) -> None:
        if https_origin(self.redirect_uri) is None:
            raise InvalidInput("bad_field",
                               f"field 'redirect_uri' must be an https URL, got {self.redirect_uri[:80]!r}")
        if self.nonce is not None and "openid" not in self.scope.split():
            raise InvalidInput("bad_field", "field 'nonce' is an OpenID Connect parameter and the scope has no "
                               "openid", hint="add openid to the scope, or leave nonce out")
        if self.resource is not None and not self.resource:
            raise InvalidInput("bad_field", "field 'resource' must list at least one absolute URI, or be left out")

    def parameters(self) -> dict[str, Any]:
        """The optional parameters given; one resource as a string (how banks read a single value)."""
        found: dict[str, Any] = {"prompt": self.prompt, "max_age": self.max_age, "acr_values": self.acr_values,
                 "claims": self.claims}
        if self.resource is not None:
            found["resource"] = self.resource[0] if len(self.resource) == 1 else list(self.resource)
        return {name: value for name, value in found.items() if value is not None}


def par(context: Context, given: ParInput) -> dict[str, Any]:
    """Sign a request object and push it; the authorization URL for the customer (the secrets stay here)."""
    scope = granted_scope(context, given.scope)
    started = context.core.banks.consents(context.bank_name).par(
        scope=scope, redirect_uri=given.redirect_uri, authorization_details=given.authorization_details,
        parameters=given.parameters() or None, state=given.state, nonce=given.nonce,
        owner=str(context.caller.uid))
    return started.as_dict()


@dataclasses.dataclass(frozen=True)
class CallbackInput:
    """The redirect back, as received: its URL (or query string), or its parameters already parsed."""

    url: str | None = text(MAX_CALLBACK_LENGTH, None)
    params: dict[str, str] | None = dataclasses.field(default=None, metadata={"max": 16})

    def check(self) -> None:
        if (self.url is None) == (self.params is None):
            raise InvalidInput("missing_field", "give exactly one of 'url' (the redirect URL or its query string, "
                               "as received) or 'params' (its code, state, iss or error, error_description)")


def consent_callback(context: Context, given: CallbackInput) -> dict[str, Any]:
    """Check the redirect (state, iss, single use, age), exchange the code over mTLS, verify the id_token."""
    consents = context.core.banks.consents(context.bank_name)
    redirect = given.url if given.url is not None else given.params
    assert redirect is not None  # CallbackInput.check: exactly one
    try:
        tokens = _id_token_checked(lambda: consents.callback(redirect))
    except ConsentFlowError as exc:
        # No key was used, yet a refused redirect (a mix-up, a replay, a forged state) is worth a record.
        _audit_refusal(context, type(exc).__name__)
        raise
    return tokens.as_dict()


@dataclasses.dataclass(frozen=True)
class RefreshInput:
    refresh_token: str = dataclasses.field(metadata={"max": MAX_REFRESH_TOKEN})

    def check(self) -> None:
        if not self.refresh_token.strip():
            raise InvalidInput("missing_field", "field 'refresh_token' is empty",
                               hint="pass the newest refresh token the bank issued for the consent")


def consent_refresh(context: Context, given: RefreshInput) -> dict[str, Any]:
    """New tokens for a consent; the answer's ``refresh_token`` replaces the one given, always."""
    consents = context.core.banks.consents(context.bank_name)
    return _id_token_checked(lambda: consents.refresh(given.refresh_token)).as_dict()


def _id_token_checked(exchange: Callable[[], T]) -> T:
    """An exchange whose id_token failed a check is the bank's answer refused, not the caller's input."""
    try:
        return exchange()
    except JoseError as exc:
        raise IdTokenRefusedError(f"the bank's id_token was refused: {exc}") from exc


def _audit_refusal(context: Context, reason: str) -> None:
    caller = context.caller
    context.core.signer.audit.record(KeyUse(caller.uid, caller.pid, f"bank:{context.bank_name}",
                                            context.spec.operation.value, "-", b"redirect back from the bank",
                                            f"refused: {reason}", caller.interaction_id))


SPECS: tuple[Spec[Any], ...] = (
    Spec("par", Operation.PAR, "push an authorization request (signed request object, PKCE); its URL",
         Resource.BANK, ParInput, par, calls_bank=True, result=StartedConsent),
    Spec("consent_callback", Operation.CONSENT_CALLBACK,
         "complete a consent: check the redirect, exchange the code, verify the id_token", Resource.BANK,
         CallbackInput, consent_callback, calls_bank=True, result=ConsentTokens),
    Spec("consent_refresh", Operation.CONSENT_REFRESH, "new tokens for a consent (refresh_token grant, rotated)",
         Resource.BANK, RefreshInput, consent_refresh, calls_bank=True, result=ConsentTokens),
)
