"""Events from the bank: a JWE made by the model bank (jwcrypto) to the TPP's encryption key on the token,
decrypted on the token (RSA-OAEP-256; raw RSA plus local OAEP decoding where the module lacks OAEP-SHA-256),
its inner JWS verified against the bank's JWKS, its jti checked against replay.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.jose import jwe
from agent.jose.errors import (
    DecryptionFailedError,
    ExpiredError,
    ReplayError,
    SignatureInvalidError,
    UnknownKidError,
    VerificationError,
    WrongAudienceError,
    WrongIssuerError,
    WrongRecipientError,
)
from agent.openfinance.events import BankEvent, EventReceiver, ReplayGuard
from agent.runtime import Runtime
from pkcs11_backends.decryption import TokenDecryptor
from tests.openfinance.bank_world import World, open_world


@pytest.fixture(scope="module")
def world(shared_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with open_world(shared_runtime, tmp_path_factory.mktemp("events-bank")) as opened:
        yield opened


@pytest.fixture
def receiver(world: World) -> EventReceiver:
    decryptor = TokenDecryptor(world.runtime.keys)
    ours = jwe.Recipient(world.encryption_jwk()["kid"],
                         lambda cek: decryptor.decrypt_oaep_sha256(world.encryption_uri, cek))
    return EventReceiver(bank="mb", issuer=world.bank.issuer, client_id=world.client_id, jwks=world.bank_jwks(),
                         recipients=[ours], replay=ReplayGuard())


def event(world: World, recipient: dict[str, Any] | None = None, **overrides: Any) -> str:
    claims = world.bank.events.claims(world.client_id, "consent-42", **overrides)
    return world.bank.events.make(recipient or world.encryption_jwk(), claims)


def test_event_is_decrypted_on_the_token_and_verified(world: World, receiver: EventReceiver) -> None:
    got = receiver.receive(event(world).encode(), "application/jwe")
    assert got.bank == "mb" and got.consent_id == "consent-42" and got.event_type == "Consent.StatusUpdated"
    assert got.resource == "/account-access-consents/consent-42" and got.message["Data"]["Status"] == "Revoked"
    assert got.claims["iss"] == world.bank.issuer


def test_replayed_event_is_refused(world: World, receiver: EventReceiver) -> None:
    token = event(world).encode()
    receiver.receive(token)
    with pytest.raises(ReplayError):
        receiver.receive(token)
    # The same jti in a new encryption is the same event too.
    first = receiver.receive(event(world, jti="fixed-jti").encode())
    with pytest.raises(ReplayError):
        receiver.receive(event(world, jti=first.jti).encode())


def test_jwe_for_another_key_is_refused(world: World, receiver: EventReceiver) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    other_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(other, as_dict=True)
    with pytest.raises(WrongRecipientError):
        receiver.receive(event(world, {**other_jwk, "kid": "someone-else"}).encode())
    # Our kid, another key's material: it does not decrypt, and says nothing more than that.
    with pytest.raises(DecryptionFailedError):
        receiver.receive(event(world, {**other_jwk, "kid": world.encryption_jwk()["kid"]}).encode())


@pytest.mark.parametrize("change,error", [
    ({"aud": ["another-client"]}, WrongAudienceError),
    ({"iss": "https://impostor.example"}, WrongIssuerError),
    ({"exp": 1_000_000_000, "nbf": 999_999_000}, ExpiredError),
])
def test_events_with_wrong_claims_are_refused(world: World, receiver: EventReceiver, change: dict[str, Any],
                                              error: type[VerificationError]) -> None:
    with pytest.raises(error):
        receiver.receive(event(world, **change).encode())


def test_events_with_bad_signatures_or_unknown_keys_are_refused(world: World, receiver: EventReceiver) -> None:
    claims = world.bank.events.claims(world.client_id, "consent-42")
    forged = world.bank.events.make(world.encryption_jwk(), claims, corrupt=True)
    with pytest.raises(SignatureInvalidError):
        receiver.receive(forged.encode())
    unknown = world.bank.events.make(world.encryption_jwk(), claims, key=world.bank.jose.unpublished)
    with pytest.raises(UnknownKidError):
        receiver.receive(unknown.encode())
    assert len(receiver.replay) == 0  # nothing that failed verification was remembered


def test_event_delivered_to_a_webhook(world: World, receiver: EventReceiver) -> None:
    """The bank POSTs application/jwe; the webhook answers 202 once the event passed, 400 otherwise."""
    received: list[BankEvent] = []

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                received.append(receiver.receive(body, self.headers["Content-Type"]))
                status = 202
            except VerificationError:
                status = 400
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/events"
        token = event(world)
        assert world.bank.events.deliver(url, token) == 202
        assert world.bank.events.deliver(url, token) == 400  # the same delivery again: a replay
    finally:
        server.shutdown()
        server.server_close()
    assert [e.consent_id for e in received] == ["consent-42"]
