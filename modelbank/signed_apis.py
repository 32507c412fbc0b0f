"""The model bank's APIs whose requests and answers are signed JWS: payments, refunds and Confirmation of Payee.

Test infrastructure. ``POST /payments`` and ``POST /confirmation`` take ``Content-Type: application/jwt``: a JWT
the TPP signed (PS256, a ``kid`` of its directory JWKS) with ``iss`` = client_id, ``aud`` the bank's issuer (an
array for payments, a string for CoP), ``exp``, ``nbf``, and the payload under ``message``; CoP adds a ``jti``.
Payments also need a certificate-bound access token of an ``Authorized`` consent and an ``x-idempotency-key``
(≤ 40 characters, no whitespace; a retry with the same key and body gets the same payment).
``POST /payments/{PaymentId}/refunds`` (same token and body rules; ``message.Data.Amount``) refunds a payment of
that consent, at most its amount in all.

Every answer, errors included, is a JWS signed by the bank (``iss`` = issuer, ``aud`` = client_id when known,
``iat``, ``exp``, ``message``), as the UAE standards describe. ``answer_corrupt`` and ``answer_key`` make forged or
unknown-key answers for the negative tests; ``received`` keeps the verified requests.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from typing import Any

from modelbank.authorization import AuthorizationServer
from modelbank.jose_bank import BankJose, BankKey
from modelbank.reply import Reply
from modelbank.token_endpoint import OAuthError, TokenEndpoint, x5t_s256

PAYMENTS_PATH = "/payments"
CONFIRMATION_PATH = "/confirmation"
REFUNDS = re.compile(r"^/payments/([0-9a-f-]{36})/refunds$")
_IDEMPOTENCY = re.compile(r"\S{1,40}")


class SignedApis:
    def __init__(self, tokens: TokenEndpoint, authorization: AuthorizationServer, jose: BankJose,
                 issuer: Any) -> None:
        self.tokens, self.authorization, self.jose, self._issuer = tokens, authorization, jose, issuer
        self.answer_corrupt = False
        self.answer_key: BankKey | None = None
        self.received: list[dict[str, Any]] = []
        self._payments: dict[tuple[str, str], dict[str, Any]] = {}  # (consent, idempotency key) → Data
        self.refunds: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
               cert: bytes | None) -> Reply | None:
        route = path.split("?", 1)[0].removeprefix("/mtls")
        refund = REFUNDS.match(route)
        if method != "POST" or (route not in (PAYMENTS_PATH, CONFIRMATION_PATH) and refund is None):
            return None
        client_id: str | None = None
        try:
            if headers.get("content-type", "").split(";")[0].strip() != "application/jwt":
                raise OAuthError(415, "invalid_request", "Content-Type must be application/jwt")
            if refund is not None:
                consent_id, client_id = self._authorized(headers.get("authorization", ""), cert)
                claims = self._claims(body, client_id, "refund")
                return self._signed(201, client_id, {"Data": self._refund(consent_id, refund[1],
                                                                          claims["message"]["Data"])})
            if route == PAYMENTS_PATH:
                consent_id, client_id = self._authorized(headers.get("authorization", ""), cert)
                claims = self._claims(body, client_id, "payment")
                data = self._payment(consent_id, headers.get("x-idempotency-key", ""), claims["message"])
                return self._signed(201, client_id, {"Data": data})
            client_id = self._client_of(cert)
            claims = self._claims(body, client_id, "confirmation of payee")
            if not isinstance(claims.get("aud"), str) or not claims.get("jti"):
                raise OAuthError(400, "invalid_request", "CoP: aud must be a string and jti is required")
            return self._signed(200, client_id, {"Data": {"Match": True, "Name": claims["message"].get("Data")}})
        except OAuthError as exc:
            return self._signed(exc.status, client_id, {"Errors": [{"Code": exc.error, "Message": exc.description}]})

    def _authorized(self, authorization: str, cert: bytes | None) -> tuple[str, str]:
        scheme, _, token = authorization.partition(" ")
        issued = self.tokens.issued.get(token) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires_at < time.time() or issued.consent_id is None:
            raise OAuthError(401, "invalid_token", "an access token of an authorized consent is required")
        if cert is None or x5t_s256(cert) != issued.cnf_x5t_s256:
            raise OAuthError(401, "invalid_token", "token is bound to another client certificate (cnf.x5t#S256)")
        consent = self.authorization.consents.get(issued.consent_id)
        if consent is None or consent.status != "Authorized":
            raise OAuthError(403, "consent_not_authorized", "the consent is not Authorized")
        return issued.consent_id, issued.client_id

    def _client_of(self, cert: bytes | None) -> str:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        if cert is None:
            raise OAuthError(401, "invalid_client", "mutual TLS is required")
        names = x509.load_der_x509_certificate(cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise OAuthError(401, "invalid_client", "the client certificate has no CN")
        return str(names[0].value)

    def _claims(self, body: bytes, client_id: str, what: str) -> dict[str, Any]:
        if client_id not in self.tokens.clients:
            raise OAuthError(401, "invalid_client", f"unknown client {client_id!r}")
        claims = self.tokens.verify_client_jwt(body.decode("ascii", "replace"), client_id, what, 400,
                                               "invalid_request")
        message = claims.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("Data"), dict):
            raise OAuthError(400, "invalid_request", f"{what}: message.Data is required")
        with self._lock:
            self.received.append(claims)
        return claims

    def _payment(self, consent_id: str, idempotency_key: str, message: dict[str, Any]) -> dict[str, Any]:
        if not _IDEMPOTENCY.fullmatch(idempotency_key):
            raise OAuthError(400, "invalid_request", "x-idempotency-key: 1 to 40 characters, no whitespace")
        with self._lock:
            known = self._payments.get((consent_id, idempotency_key))
            if known is not None:
                if known["Initiation"] != message["Data"]:
                    raise OAuthError(422, "idempotency_conflict", "same x-idempotency-key, another payment")
                return known
            data = {"PaymentId": str(uuid.uuid4()), "ConsentId": consent_id, "Status": "Pending",
                    "Initiation": message["Data"]}
            self._payments[(consent_id, idempotency_key)] = data
            return data

    def _refund(self, consent_id: str, payment_id: str, data: dict[str, Any]) -> dict[str, Any]:
        amount = data.get("Amount")
        with self._lock:
            payment = next((p for (consent, _), p in self._payments.items()
                            if consent == consent_id and p["PaymentId"] == payment_id), None)
            if payment is None:
                raise OAuthError(404, "not_found", f"no payment {payment_id} under this consent")
            paid = float(payment["Initiation"]["InstructedAmount"]["Amount"])
            refunded = sum(float(r["Amount"]) for r in self.refunds if r["PaymentId"] == payment_id)
            try:
                wanted = float(amount) if isinstance(amount, str) else -1.0
            except ValueError:
                wanted = -1.0
            if not 0 < wanted <= paid - refunded:
                raise OAuthError(422, "invalid_amount", f"refund Amount {amount!r}: more than left to refund, "
                                                        "or not a positive decimal string")
            made = {"RefundId": str(uuid.uuid4()), "PaymentId": payment_id, "Amount": amount, "Status": "Pending"}
            self.refunds.append(made)
            return made

    def _signed(self, status: int, client_id: str | None, message: dict[str, Any]) -> Reply:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": str(self._issuer()), "iat": now, "nbf": now, "exp": now + 300,
                                  "jti": str(uuid.uuid4()), "message": message}
        if client_id is not None:
            claims["aud"] = client_id
        return Reply.jwt(status, self.jose.sign(claims, key=self.answer_key, corrupt=self.answer_corrupt))
