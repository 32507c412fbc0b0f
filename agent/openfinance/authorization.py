"""The consent flow at one bank over mTLS: PAR, the redirect back, the code exchange, refresh.

    consents = ConsentClient(token_client, bank_jwks, pending)
    started = consents.par(scope="openid accounts", redirect_uri=..., authorization_details=[...])
    # the customer's browser goes to started.authorization_url; the bank redirects back with a query
    tokens = consents.callback(query)         # checked, exchanged, id_token verified
    tokens = consents.refresh(tokens.refresh_token)

The PKCE verifier, state and nonce never leave the agent: :class:`~agent.openfinance.consent.PendingAuthorizations`
keeps them. The checks live in :mod:`agent.openfinance.consent` (sans-I/O); this module only sends and receives.

What a caller must persist: the newest ``refresh_token`` of each consent, replacing the previous one at once
(before using the new access token). A bank that rotates refresh tokens treats a second use of an old one as
theft and revokes the whole consent (:class:`~agent.openfinance.tokens.InvalidGrantError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from agent.jose.verify import verify_jws
from agent.openfinance.consent import (
    PendingAuthorizations,
    TokenAnswer,
    TokenAnswerError,
    authorization_url,
    check_id_token_claims,
    code_exchange_form,
    refresh_form,
)
from agent.openfinance.jwks import BankJwks
from agent.openfinance.tokens import TokenClient, normalise_scope


@dataclasses.dataclass(frozen=True)
class StartedConsent:
    """What ``par`` returns: where to send the customer, and the state to expect back (no PKCE verifier)."""

    bank: str
    authorization_url: str
    request_uri: str
    expires_in: int
    state: str
    interaction_id: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConsentTokens:
    """Tokens of one consent; ``refresh_token`` is the one to keep (``rotated``: the bank issued a new one)."""

    bank: str
    access_token: str = dataclasses.field(repr=False)
    token_type: str
    expires_in: int
    refresh_token: str | None = dataclasses.field(repr=False)
    rotated: bool
    id_token_claims: dict[str, Any] | None
    authorization_details: list[dict[str, Any]]
    scope: str | None
    interaction_id: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConsentClient:
    """Consents at the bank of ``tokens`` (its client assertion, transport and discovery)."""

    def __init__(self, tokens: TokenClient, jwks: BankJwks, pending: PendingAuthorizations) -> None:
        self.tokens, self.jwks, self.pending = tokens, jwks, pending

    def par(self, *, scope: str, redirect_uri: str, authorization_details: Sequence[Mapping[str, Any]] | None = None,
            parameters: Mapping[str, Any] | None = None, state: str | None = None, nonce: str | None = None,
            owner: str = "") -> StartedConsent:
        """Push the authorization request and keep its secrets; the authorization URL for the customer.

        ``owner`` (the caller) bounds how many authorizations one caller may have pending."""
        metadata = self.tokens.metadata()
        endpoint = metadata.endpoint("authorization_endpoint", False)  # front channel: the browser, no mTLS
        pushed = self.tokens.push_authorization(scope=scope, redirect_uri=redirect_uri,
                                                authorization_details=authorization_details, parameters=parameters,
                                                state=state, nonce=nonce)
        max_age = (parameters or {}).get("max_age")
        self.pending.new(bank=self.tokens.bank, issuer=metadata.issuer, client_id=self.tokens.client_id,
                         state=pushed.state, nonce=pushed.nonce, code_verifier=pushed.code_verifier,
                         redirect_uri=redirect_uri, request_uri=pushed.request_uri, scope=normalise_scope(scope),
                         max_age=max_age, owner=owner, details_requested=authorization_details is not None)
        url = authorization_url(endpoint, self.tokens.client_id, pushed.request_uri,
                                openid="openid" in scope.split())
        return StartedConsent(self.tokens.bank, url, pushed.request_uri, pushed.expires_in, pushed.state,
                              pushed.interaction_id)

    def callback(self, query: str | Mapping[str, str]) -> ConsentTokens:
        """Check the redirect (state, ``iss``, single use, age), exchange its code, verify the id_token."""
        grant = self.pending.take_callback(query, self.tokens.bank)
        answer, interaction_id = self.tokens.exchange(code_exchange_form(grant), "authorization code exchange")
        where = f"(x-fapi-interaction-id {interaction_id})"
        tokens = TokenAnswer.parse(answer, where=where, details_required=grant.pending.details_requested)
        wants_id_token = "openid" in grant.pending.scope.split()
        if wants_id_token and tokens.id_token is None:
            raise TokenAnswerError(f"the bank answered a scope=openid code exchange without an id_token {where}")
        claims = self._id_token(tokens.id_token, grant.pending.nonce, grant.pending.max_age) \
            if tokens.id_token is not None else None
        return self._result(tokens, tokens.refresh_token, claims, interaction_id, rotated=False)

    def refresh(self, refresh_token: str) -> ConsentTokens:
        """A new access token for a consent; the answer's refresh token (if any) replaces ``refresh_token``."""
        answer, interaction_id = self.tokens.exchange(refresh_form(refresh_token), "refresh")
        tokens = TokenAnswer.parse(answer, where=f"(x-fapi-interaction-id {interaction_id})",
                                   details_required=False)
        # OIDC Core §12.2: an id_token on refresh carries no nonce of ours, the rest is checked as usual.
        claims = self._id_token(tokens.id_token, None, None) if tokens.id_token is not None else None
        newest = tokens.refresh_token or refresh_token
        return self._result(tokens, newest, claims, interaction_id, rotated=newest != refresh_token)

    def _id_token(self, id_token: str, nonce: str | None, max_age: int | None) -> dict[str, Any]:
        client_id = self.tokens.client_id
        verified = verify_jws(id_token, self.jwks.signing_key, issuer=self.tokens.metadata().issuer,
                              audience=client_id, require=("iss", "aud", "exp", "iat", "sub"), what="id_token")
        return check_id_token_claims(verified.claims, client_id=client_id, nonce=nonce, max_age=max_age)

    def _result(self, tokens: TokenAnswer, refresh_token: str | None, claims: dict[str, Any] | None,
                interaction_id: str, *, rotated: bool) -> ConsentTokens:
        return ConsentTokens(self.tokens.bank, tokens.access_token, tokens.token_type, tokens.expires_in,
                             refresh_token, rotated, claims, tokens.authorization_details, tokens.scope,
                             interaction_id)
