"""The model bank's event sender: a signed event, encrypted to the TPP's encryption key, POSTed to its webhook.

Test infrastructure. :meth:`EventSender.make` builds what the hub sends (a JWE, RSA-OAEP-256 / A256GCM,
``cty: JWT``, around a PS256 JWS with ``iss``, ``aud`` = [client_id], ``iat``, ``nbf``, ``exp``, ``jti`` and
``message {Data, Meta{EventDateTime, EventResource, EventType, ConsentId}}``); :meth:`EventSender.deliver` POSTs
it with ``Content-Type: application/jwe`` to a webhook URL on loopback and returns the HTTP status. A test that
has no webhook takes the JWE from ``make`` directly. Keyword arguments override claims for the negative cases.
"""

from __future__ import annotations

import datetime
import http.client
import ssl
import time
import urllib.parse
import uuid
from typing import Any

from modelbank.jose_bank import BankJose, BankKey


class EventSender:
    def __init__(self, jose: BankJose, issuer: Any, recipients: dict[str, dict[str, Any]] | None = None) -> None:
        self.jose, self._issuer = jose, issuer
        self.recipients = recipients if recipients is not None else {}  # client id → its use: enc JWK
        self.sent: list[str] = []

    def claims(self, client_id: str, consent_id: str, event_type: str = "Consent.StatusUpdated",
               **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": str(self._issuer()), "aud": [client_id], "iat": now, "nbf": now - 10, "exp": now + 300,
            "jti": str(uuid.uuid4()),
            "message": {"Data": {"ConsentId": consent_id, "Status": "Revoked"},
                        "Meta": {"EventDateTime": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                 "EventResource": f"/account-access-consents/{consent_id}",
                                 "EventType": event_type, "ConsentId": consent_id}},
        }
        claims.update(overrides)
        return claims

    def make(self, recipient: dict[str, Any], claims: dict[str, Any], *, key: BankKey | None = None,
             corrupt: bool = False) -> str:
        """The JWE for the TPP whose public encryption JWK is ``recipient``."""
        signed = self.jose.sign(claims, key=key, corrupt=corrupt, header={"typ": "JWT"})
        return self.jose.encrypt_to(recipient, signed.encode("ascii"))

    def make_for(self, client_id: str, claims: dict[str, Any], *, key: BankKey | None = None,
                 corrupt: bool = False) -> str:
        """The JWE for a registered client, to the ``use: enc`` key of the JWKS it registered."""
        recipient = self.recipients.get(client_id)
        if recipient is None:
            raise ValueError(f"client {client_id!r} registered no use: enc key")
        return self.make(recipient, claims, key=key, corrupt=corrupt)

    def deliver(self, url: str, token: str, context: ssl.SSLContext | None = None) -> int:
        """POST ``token`` to the webhook ``url`` (http or https on loopback); the answer's status."""
        target = urllib.parse.urlsplit(url)
        if target.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the model bank delivers events to loopback only")
        connection: http.client.HTTPConnection = (
            http.client.HTTPSConnection(target.hostname, target.port, context=context, timeout=10)
            if target.scheme == "https" else http.client.HTTPConnection(target.hostname, target.port, timeout=10))
        try:
            connection.request("POST", target.path or "/", body=token.encode("ascii"),
                               headers={"Content-Type": "application/jwe"})
            status = connection.getresponse().status
        finally:
            connection.close()
        self.sent.append(token)
        return status
