"""One registered TPP at one model bank, for the tests of the consent flow and of signed and encrypted messages.

Keys (transport, signing, encryption) are made on the session's first token with labels of their own: the
OpenSSL engine only sees tokens that existed when it loaded its first key.
"""

from __future__ import annotations

import contextlib
import datetime
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.jose import jwks
from agent.jose.keys import jwk_thumbprint, public_jwk
from agent.openfinance.authorization import ConsentClient, StartedConsent
from agent.openfinance.consent import PendingAuthorizations
from agent.openfinance.discovery import DiscoveryDocument
from agent.openfinance.jwks import BankJwks
from agent.openfinance.tokens import TokenClient, TokenSettings
from agent.runtime import Runtime
from agent.transport.client import BankTransport, open_transport
from agent.transport.tls import TlsSettings
from agent.x509.certificates import import_certificate
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank import ModelBank
from pkcs11_backends.decryption import generate_encryption_key
from pkcs11_backends.keys import KeySpec

REDIRECT_URI = "https://tpp.example/consents/callback"


@dataclass
class World:
    """What a test needs: the bank, the agent's transport to it, the TPP's key URIs."""

    runtime: Runtime
    bank: ModelBank
    transport: BankTransport
    document: DiscoveryDocument
    client_id: str
    transport_uri: str
    signing_uri: str
    encryption_uri: str

    def tokens(self) -> TokenClient:
        return TokenClient(self.runtime.keys, self.runtime.config, "mb", self.transport,
                           metadata=lambda: self.document, client_id=self.client_id,
                           settings=TokenSettings(self.client_id, self.signing_uri))

    def bank_jwks(self) -> BankJwks:
        return BankJwks("mb", self.transport, lambda: str(self.document.document["jwks_uri"]))

    def consents(self, keys: BankJwks | None = None) -> ConsentClient:
        return ConsentClient(self.tokens(), keys or self.bank_jwks(), PendingAuthorizations())

    def authorize(self, started: StartedConsent) -> str:
        """The customer's browser: follow the authorization URL to the bank's redirect; its query."""
        response = self.transport.request("GET", started.authorization_url)
        assert response.status == 302, response.body
        location = response.headers["location"]
        assert location.startswith(REDIRECT_URI + "?")
        return urllib.parse.urlsplit(location).query

    def bearer_works(self, access_token: str) -> bool:
        answer = self.transport.request("GET", self.bank.url + "/accounts",
                                        headers={"Authorization": f"Bearer {access_token}"})
        return answer.status == 200

    def encryption_jwk(self) -> dict[str, Any]:
        """The TPP's public encryption JWK, as the directory would publish it for the bank."""
        jwk: dict[str, Any] = public_jwk(self.runtime.keys.public_key_info(self.encryption_uri))
        return {**jwk, "kid": jwk_thumbprint(jwk), "use": "enc", "alg": "RSA-OAEP-256"}


def reset_knobs(bank: ModelBank) -> None:
    """The bank's normal, strict behaviour again, after a test turned a knob."""
    auth = bank.authorization
    auth.decision, auth.id_token_lifetime, auth.id_token_nonce = "approve", 300, None
    auth.id_token_corrupt, auth.id_token_key = False, None
    bank.tokens.require_resource = False


def make_identity(runtime: Runtime, bank: ModelBank, kind: str, client_id: str) -> str:
    label = f"{kind}-{uuid.uuid4().hex[:10]}"
    info = runtime.keys.generate(label, KeySpec.parse("rsa:2048"))
    subject = directory_subject("Test TPP L.L.C.", "org-0001", client_id)
    pem = bank.ca.issue_from_csr(build_csr(runtime.keys, str(info.uri), subject).pem.encode())
    import_certificate(runtime.keys, str(info.uri), pem, kind)
    return str(info.uri)


@contextlib.contextmanager
def open_world(runtime: Runtime, bank_dir: Path) -> Iterator[World]:
    """A running model bank with this TPP registered and its signing key known to the bank."""
    client_id = str(uuid.uuid4())
    with ModelBank(bank_dir) as bank:
        transport_uri = make_identity(runtime, bank, "transport", client_id)
        signing_uri = make_identity(runtime, bank, "signing", client_id)
        encryption = generate_encryption_key(runtime.keys, f"encryption-{uuid.uuid4().hex[:10]}",
                                             KeySpec.parse("rsa:2048"))
        transport = open_transport(runtime, TlsSettings(bank="mb", ca_bundle=bank.ca_bundle,
                                                        client_key=transport_uri))
        try:
            assert transport.request("POST", bank.url + "/tpp-registration", body=b"{}",
                                     headers={"Content-Type": "application/json"}).ok
            bank.tokens.register_client(client_id, jwks(runtime.keys, runtime.config, [signing_uri]))
            fetched = transport.request("GET", bank.discovery_url).json()
            document = DiscoveryDocument("mb", bank.discovery_url, datetime.datetime.now(datetime.UTC), fetched)
            yield World(runtime, bank, transport, document, client_id, transport_uri, signing_uri,
                        str(encryption.uri))
        finally:
            transport.close()
