"""The model bank's authorization code flow: the authorization endpoint, codes, consents, refresh rotation.

Test infrastructure, as strict as a certified FAPI 2.0 authorization server:

* ``GET /authorize?client_id=…&request_uri=…`` only takes a pushed request (PAR is required): the ``request_uri``
  is single-use, unexpired and the same client's. The customer's decision is :attr:`AuthorizationServer.decision`
  (a test sets it): ``"approve"`` redirects with ``code``, ``state`` and ``iss`` (RFC 9207), anything else with
  ``error`` = that value, ``error_description``, ``state`` and ``iss``. A bad ``request_uri`` gets a 400 page, no
  redirect (nothing trustworthy to redirect to). The endpoint does not look at the TLS client certificate (the
  front channel has none); it shares the bank's port, so a headless test drives it with any client.
* ``authorization_code``: the code is single-use (a second use revokes what the first one issued, RFC 6749
  §4.1.2), lives ``code_lifetime`` s, belongs to the client that pushed the request, needs the same
  ``redirect_uri`` and the PKCE ``code_verifier`` whose S256 is the ``code_challenge``.
* Answers: a certificate-bound access token, a refresh token, an id_token (PS256 with the bank's key: ``iss``,
  ``sub``, ``aud`` = [client_id], ``exp``, ``iat``, ``auth_time``, ``nonce``) when the scope has ``openid``, and
  ``authorization_details`` with the consent and its ``Status``.
* ``refresh_token``: rotated at every use; a rotated (old) refresh token presented again revokes the consent: its
  tokens stop working and every later refresh is ``invalid_grant``.

Knobs for the negative tests: ``id_token_lifetime`` (negative: already expired), ``id_token_nonce`` (a wrong one),
``id_token_corrupt`` (a bad signature), ``id_token_key`` (sign with another, e.g. unpublished, key).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
import secrets
import threading
import time
import urllib.parse
import uuid
from typing import Any

from modelbank.jose_bank import BankJose, BankKey
from modelbank.reply import Reply
from modelbank.token_endpoint import Answer, OAuthError, TokenEndpoint

AUTHORIZATION_PATH = "/authorize"
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def _invalid_grant(description: str) -> OAuthError:
    return OAuthError(400, "invalid_grant", description)


@dataclasses.dataclass
class Consent:
    consent_id: str
    client_id: str
    status: str
    authorization_details: list[dict[str, Any]]
    scope: str
    refresh_token: str | None = None  # the current one
    retired: set[str] = dataclasses.field(default_factory=set)  # rotated-out refresh tokens


@dataclasses.dataclass(frozen=True)
class Code:
    client_id: str
    claims: dict[str, Any]  # the request object's
    consent_id: str
    expires_at: float
    auth_time: int


class AuthorizationServer:
    def __init__(self, tokens: TokenEndpoint, jose: BankJose, issuer: Any) -> None:
        self.tokens, self.jose, self._issuer = tokens, jose, issuer
        self.decision = "approve"
        self.code_lifetime = 60
        self.id_token_lifetime = 300
        self.id_token_nonce: str | None = None
        self.id_token_corrupt = False
        self.id_token_key: BankKey | None = None
        self.codes: dict[str, Code] = {}
        self.used_codes: dict[str, str] = {}  # code → consent it issued tokens for
        self.consents: dict[str, Consent] = {}
        self._refresh: dict[str, str] = {}  # every refresh token ever issued → consent id
        self._lock = threading.Lock()
        tokens.grants["authorization_code"] = self._authorization_code
        tokens.grants["refresh_token"] = self._refresh_token

    @property
    def issuer(self) -> str:
        return str(self._issuer())

    # -- front channel ---------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
               cert: bytes | None) -> Reply | None:
        route, _, query = path.partition("?")
        if (method, route) != ("GET", AUTHORIZATION_PATH):
            return None
        params = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
        with self._lock:
            pushed = self.tokens.pushed.pop(params.get("request_uri", ""), None)
        if pushed is None or pushed.expires_at < time.time():
            return Reply.json(400, {"error": "invalid_request_uri", "error_description": "unknown, used or expired"})
        if params.get("client_id") != pushed.client_id:
            return Reply.json(400, {"error": "invalid_request", "error_description": "client_id differs from PAR"})
        claims = pushed.claims
        answer: dict[str, str] = {"state": claims["state"], "iss": self.issuer}
        if self.decision == "approve":
            code = secrets.token_urlsafe(32)
            consent = Consent(str(uuid.uuid4()), pushed.client_id, "Authorized",
                              [dict(d) for d in claims.get("authorization_details") or
                               [{"type": "urn:openfinanceuae:account-access-consent:v2.1"}]], claims["scope"])
            with self._lock:
                self.consents[consent.consent_id] = consent
                self.codes[code] = Code(pushed.client_id, claims, consent.consent_id,
                                        time.time() + self.code_lifetime, int(time.time()))
            answer["code"] = code
        else:
            answer.update(error=self.decision, error_description="the customer did not consent")
        separator = "&" if "?" in claims["redirect_uri"] else "?"
        return Reply.redirect(claims["redirect_uri"] + separator + urllib.parse.urlencode(answer))

    # -- token endpoint grants -------------------------------------------------------
    def _authorization_code(self, form: dict[str, str], client_id: str, cert: bytes) -> Answer:
        code_value = form.get("code", "")
        with self._lock:
            code = self.codes.pop(code_value, None)
            replayed = self.used_codes.get(code_value)
            if code is not None:
                self.used_codes[code_value] = code.consent_id
        if replayed is not None:
            self._revoke(replayed)
            raise _invalid_grant("authorization code already used; the tokens it issued are revoked")
        if code is None or code.expires_at < time.time():
            raise _invalid_grant("unknown or expired authorization code")
        if code.client_id != client_id:
            raise _invalid_grant("the code was issued to another client")
        if form.get("redirect_uri") != code.claims["redirect_uri"]:
            raise _invalid_grant("redirect_uri differs from the authorization request's")
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not _VERIFIER.fullmatch(verifier) or not hmac.compare_digest(challenge, code.claims["code_challenge"]):
            raise _invalid_grant("PKCE: code_verifier does not match the code_challenge")
        consent = self.consents[code.consent_id]
        answer = self._answer(consent, cert)
        if "openid" in consent.scope.split():
            answer["id_token"] = self._id_token(client_id, code)
        answer["state"] = code.claims["state"]
        return 200, answer

    def _refresh_token(self, form: dict[str, str], client_id: str, cert: bytes) -> Answer:
        presented = form.get("refresh_token", "")
        with self._lock:  # check and retire in one step: two refreshes racing with one token get one answer
            consent_id = self._refresh.get(presented)
            consent = self.consents.get(consent_id) if consent_id else None
            if consent is None or consent.client_id != client_id:
                raise _invalid_grant("unknown refresh token")
            replayed = presented in consent.retired
            if not replayed and consent.status == "Authorized":
                consent.retired.add(presented)
                consent.refresh_token = None
        if replayed:
            self._revoke(consent.consent_id)
            raise _invalid_grant("a rotated refresh token was used again: the consent is revoked")
        if consent.status != "Authorized":
            raise _invalid_grant(f"the consent is {consent.status}")
        return 200, self._answer(consent, cert)

    def _answer(self, consent: Consent, cert: bytes) -> dict[str, Any]:
        """Access token and a new refresh token (the previous one retired), with the consent's details."""
        access, _ = self.tokens.issue(consent.client_id, consent.scope, cert, consent.consent_id)
        refresh = secrets.token_urlsafe(32)
        with self._lock:
            if consent.refresh_token is not None:
                consent.retired.add(consent.refresh_token)
            consent.refresh_token = refresh
            self._refresh[refresh] = consent.consent_id
        details = [{**d, "consent": {**d.get("consent", {}), "ConsentId": consent.consent_id,
                                     "Status": consent.status}} for d in consent.authorization_details]
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.tokens.token_lifetime,
                "refresh_token": refresh, "scope": consent.scope, "authorization_details": details}

    def _id_token(self, client_id: str, code: Code) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": f"customer-{code.consent_id[:8]}", "aud": [client_id],
                  "iat": now, "exp": now + self.id_token_lifetime, "auth_time": code.auth_time,
                  "nonce": self.id_token_nonce or code.claims["nonce"]}
        return self.jose.sign(claims, key=self.id_token_key, corrupt=self.id_token_corrupt)

    def _revoke(self, consent_id: str) -> None:
        with self._lock:
            consent = self.consents.get(consent_id)
            if consent is not None:
                consent.status = "Revoked"
        self.tokens.revoke(consent_id)
