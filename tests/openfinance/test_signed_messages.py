"""Signed request bodies, the bank's signed answers, and personal data encrypted for the bank, end to end.

What the agent signs is read back with PyJWT and the public key read from the token; what it encrypts is opened
by the model bank with ``cryptography`` by hand (the agent encrypts with jwcrypto). What the bank signs (PyJWT)
is verified by the agent (jwcrypto).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.jose.errors import SignatureInvalidError, UnknownKidError
from agent.jose.keys import resolve
from agent.jose.verify import Verified, verify_jws
from agent.openfinance.payloads import CONTENT_TYPE, encrypted_personal_data, signed_body
from agent.runtime import Runtime
from agent.transport.client import Response
from tests.openfinance.bank_world import REDIRECT_URI, World, open_world

PAYMENT = {"InstructedAmount": {"Amount": "100.00", "Currency": "AED"},
           "CreditorAccount": {"SchemeName": "IBAN", "Identification": "AE070331234567890123456"}}


@pytest.fixture(scope="module")
def world(shared_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with open_world(shared_runtime, tmp_path_factory.mktemp("signed-bank")) as opened:
        yield opened


@pytest.fixture(scope="module")
def access_token(world: World) -> str:
    consents = world.consents()
    started = consents.par(scope="payments", redirect_uri=REDIRECT_URI,
                           authorization_details=[{"type": "urn:openfinanceuae:service-initiation-consent:v2.1"}])
    return consents.callback(world.authorize(started)).access_token


@pytest.fixture(autouse=True)
def honest_bank(world: World) -> Iterator[None]:
    yield
    world.bank.apis.answer_corrupt, world.bank.apis.answer_key = False, None


def signing_public_key(world: World) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(world.runtime.keys.public_key_info(world.signing_uri).dump())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def pay(world: World, token: str, body: str, idempotency_key: str) -> Response:
    return world.transport.request("POST", world.bank.url + "/payments", body=body.encode("ascii"),
                                   headers={"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {token}",
                                            "x-idempotency-key": idempotency_key})


def payment_body(world: World) -> str:
    return signed_body(world.runtime.keys, world.runtime.config, world.signing_uri, client_id=world.client_id,
                       audience=[world.bank.issuer], message={"Data": PAYMENT})


def verified_answer(world: World, response: Response) -> Verified:
    assert response.headers["content-type"] == "application/jwt"
    return verify_jws(response.body.decode("ascii"), world.bank_jwks().signing_key, issuer=world.bank.issuer,
                      audience=world.client_id, what="payment answer")


def test_signed_payment_body_reads_back_with_pyjwt(world: World) -> None:
    body = payment_body(world)
    header = jwt.get_unverified_header(body)
    claims = jwt.decode(body, signing_public_key(world), algorithms=["PS256"], audience=world.bank.issuer,
                        issuer=world.client_id, options={"require": ["exp", "nbf", "iat", "jti"]})
    kid = resolve(world.runtime.keys, world.runtime.config, world.signing_uri).kid
    assert header == {"alg": "PS256", "kid": kid, "typ": "JWT"}
    assert claims["aud"] == [world.bank.issuer] and claims["message"] == {"Data": PAYMENT}
    assert claims["exp"] - claims["iat"] <= 300 and claims["nbf"] < claims["iat"]
    uuid.UUID(claims["jti"])


def test_payment_answer_is_signed_by_the_bank_and_a_retry_gets_the_same_payment(world: World,
                                                                                 access_token: str) -> None:
    key = f"pay-{uuid.uuid4().hex[:20]}"
    first = pay(world, access_token, payment_body(world), key)
    assert first.status == 201
    answer = verified_answer(world, first)
    data = answer.claims["message"]["Data"]
    assert data["Status"] == "Pending" and data["Initiation"] == PAYMENT
    assert answer.header["kid"] == world.bank.jose.signing.kid
    retry = pay(world, access_token, payment_body(world), key)  # a new JWT (new jti), the same key: same payment
    assert verified_answer(world, retry).claims["message"]["Data"]["PaymentId"] == data["PaymentId"]
    assert world.bank.apis.received[-1]["message"] == {"Data": PAYMENT}


def test_error_answers_are_signed_too(world: World, access_token: str) -> None:
    refused = pay(world, access_token, payment_body(world), "has whitespace")
    assert refused.status == 400
    errors = verified_answer(world, refused).claims["message"]["Errors"]
    assert "x-idempotency-key" in errors[0]["Message"]


def test_a_forged_answer_is_refused(world: World, access_token: str) -> None:
    world.bank.apis.answer_corrupt = True
    with pytest.raises(SignatureInvalidError, match="payment answer"):
        verified_answer(world, pay(world, access_token, payment_body(world), uuid.uuid4().hex))


def test_an_answer_signed_with_an_unpublished_key_is_refused(world: World, access_token: str) -> None:
    world.bank.apis.answer_key = world.bank.jose.unpublished
    with pytest.raises(UnknownKidError):
        verified_answer(world, pay(world, access_token, payment_body(world), uuid.uuid4().hex))


def test_confirmation_of_payee_takes_a_string_audience(world: World) -> None:
    body = signed_body(world.runtime.keys, world.runtime.config, world.signing_uri, client_id=world.client_id,
                       audience=world.bank.issuer, message={"Data": {"Name": "Fatima Al Mansoori"}})
    response = world.transport.request("POST", world.bank.url + "/confirmation", body=body.encode("ascii"),
                                       headers={"Content-Type": CONTENT_TYPE})
    assert response.status == 200
    assert verified_answer(world, response).claims["message"]["Data"]["Match"] is True
    assert jwt.decode(body, signing_public_key(world), algorithms=["PS256"], audience=world.bank.issuer)["aud"] \
        == world.bank.issuer


def test_personal_data_is_signed_then_encrypted_to_the_banks_encryption_key(world: World) -> None:
    keys = world.bank_jwks()
    recipient = keys.encryption_key()
    data: dict[str, Any] = {"Initiation": {"CreditorAccount": {"Name": "Fatima Al Mansoori"}}}
    token = encrypted_personal_data(world.runtime.keys, world.runtime.config, world.signing_uri,
                                    client_id=world.client_id, issuer=world.bank.issuer, recipient=recipient,
                                    data=data)
    header, inner = world.bank.jose.decrypt(token)  # cryptography by hand, not jwcrypto
    assert header == {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": world.bank.jose.encryption.kid, "cty": "JWT"}
    claims = jwt.decode(inner, signing_public_key(world), algorithms=["PS256"], audience=world.bank.issuer,
                        options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]})
    assert claims["iss"] == claims["sub"] == world.client_id and claims["Initiation"] == data["Initiation"]
    # The bank's keys are used for what their "use" says: the encryption key never verifies.
    with pytest.raises(UnknownKidError):
        keys.signing_key(world.bank.jose.encryption.kid)
