"""Verifying what a bank signs, and the JWE layer, on bytes (sans-I/O): each refusal has its own class.

Tokens are made by PyJWT (and JWEs by jwcrypto) with in-memory keys that stand for the bank's: test data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from agent.jose import jwe
from agent.jose.encoding import b64url, b64url_decode
from agent.jose.errors import (
    AlgorithmRefusedError,
    ClaimRejectedError,
    DecryptionFailedError,
    ExpiredError,
    JwksError,
    MalformedError,
    NotYetValidError,
    SignatureInvalidError,
    UnknownKidError,
    WrongAudienceError,
    WrongIssuerError,
    WrongRecipientError,
)
from agent.jose.verify import verify_jws
from agent.openfinance.jwks import MAX_KEYS, KeySet
from pkcs11_backends.decryption import DecryptionError

BANK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUER, CLIENT = "https://bank.example", "client-1"
OAEP_256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)


def public_jwk(key: rsa.RSAPrivateKey, kid: str, use: str = "sig") -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"kty": "RSA", "n": jwk["n"], "e": jwk["e"], "kid": kid, "use": use}


def lookup(kid: str) -> jwcrypto_jwk.JWK:
    if kid != "bank-1":
        raise UnknownKidError(f"no key {kid}")
    return jwcrypto_jwk.JWK(**public_jwk(BANK, "bank-1"))


def signed(claims: dict[str, Any] | None = None, *, key: Any = BANK, alg: str = "PS256",
           header: dict[str, Any] | None = None) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": CLIENT, "iat": now, "exp": now + 60, **(claims or {})}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": "bank-1", **(header or {})})


def verify(token: str, **kwargs: Any) -> dict[str, Any]:
    return verify_jws(token, lookup, issuer=ISSUER, audience=CLIENT, **kwargs).claims


def test_a_good_answer_passes() -> None:
    assert verify(signed({"message": {"Data": {}}}))["message"] == {"Data": {}}
    assert verify(signed({"aud": ["other", CLIENT]}))["iss"] == ISSUER


# Made when the test runs, not at collection: a suite that runs for minutes would age the times.
@pytest.mark.parametrize("make,error", [
    (lambda: signed(alg="RS256"), AlgorithmRefusedError),
    (lambda: signed(key="x" * 32, alg="HS256"), AlgorithmRefusedError),
    (lambda: jwt.encode({"iss": ISSUER}, "", algorithm="none"), AlgorithmRefusedError),
    (lambda: signed(key=OTHER), SignatureInvalidError),
    (lambda: signed(header={"kid": "bank-2"}), UnknownKidError),
    (lambda: signed({"iss": "https://impostor.example"}), WrongIssuerError),
    (lambda: signed({"aud": "someone-else"}), WrongAudienceError),
    (lambda: signed({"exp": int(time.time()) - 11}), ExpiredError),
    (lambda: signed({"nbf": int(time.time()) + 60}), NotYetValidError),
    (lambda: signed({"iat": int(time.time()) + 60}), NotYetValidError),
    (lambda: signed({"exp": "tomorrow"}), ClaimRejectedError),
    (lambda: "not.a-jws", MalformedError),
    (lambda: "e30.e30.e30.e30", MalformedError),
    (lambda: '{"payload": "e30", "signatures": []}', MalformedError),  # the JSON form jwcrypto would read
    (lambda: signed().replace(".", ".!", 1), MalformedError),  # a character base64 would silently skip
    (lambda: signed(header={"b64": False, "crit": ["b64"]}), MalformedError),
])
def test_each_refusal_has_its_class(make: Callable[[], str], error: type[Exception]) -> None:
    with pytest.raises(error):
        verify(make())


def test_exp_is_required_and_leeway_is_ten_seconds() -> None:
    now = int(time.time())
    assert verify(signed({"exp": now - 5}))
    without_exp = jwt.encode({"iss": ISSUER, "aud": CLIENT}, BANK, algorithm="PS256", headers={"kid": "bank-1"})
    with pytest.raises(ClaimRejectedError, match="'exp' is required"):
        verify(without_exp)


def test_a_payload_swapped_under_a_good_signature_is_refused() -> None:
    head, _, signature = signed().split(".")
    forged = b64url(json.dumps({"iss": ISSUER, "aud": CLIENT, "exp": int(time.time()) + 60}).encode())
    with pytest.raises(SignatureInvalidError):
        verify(f"{head}.{forged}.{signature}")


# -- the bank's JWKS, parsed -----------------------------------------------------------------

def test_keys_are_used_only_for_their_use() -> None:
    document = {"keys": [public_jwk(BANK, "s1"), public_jwk(OTHER, "e1", "enc"),
                         {k: v for k, v in public_jwk(OTHER, "no-use").items() if k != "use"},
                         {**public_jwk(OTHER, "wrong-alg"), "alg": "RS256"},
                         {**public_jwk(OTHER, "private"), "d": "AQAB"},
                         {"kty": "EC", "kid": "ec", "use": "sig", "crv": "P-256", "x": "AA", "y": "AA"}]}
    keys = KeySet.parse(json.dumps(document).encode(), 0.0, "test").keys
    assert set(keys["sig"]) == {"s1"} and set(keys["enc"]) == {"e1"}


@pytest.mark.parametrize("body,message", [
    (b"[]", "no \"keys\" array"),
    (b"{", "not strict JSON"),
    (b'{"keys": [], "keys": []}', "appears twice"),  # read one way here, another by someone else
    (json.dumps({"keys": [public_jwk(BANK, f"k{i}") for i in range(MAX_KEYS + 1)]}).encode(), "at most"),
    (b" " * (256 * 1024 + 1), "bytes"),
], ids=["not-an-object", "truncated", "duplicate-member", "too-many-keys", "too-large"])  # same in every process
def test_bad_or_oversized_sets_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(JwksError, match=message):
        KeySet.parse(body, 0.0, "test")


# -- JWE -------------------------------------------------------------------------------------

def software_unwrap(key: rsa.RSAPrivateKey) -> Any:
    def unwrap(encrypted: bytes) -> bytes:
        try:
            return key.decrypt(encrypted, OAEP_256)
        except ValueError:
            raise DecryptionError("cannot decrypt") from None
    return unwrap


def test_encrypt_reads_back_with_cryptography_by_hand() -> None:
    recipient = jwcrypto_jwk.JWK(**public_jwk(BANK, "enc-1", "enc"))
    token = jwe.encrypt(b"inner.jws.here", recipient, header={"cty": "JWT"})
    parts = token.split(".")
    header = json.loads(b64url_decode(parts[0]))
    assert header == {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "enc-1", "cty": "JWT"}
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    cek = BANK.decrypt(b64url_decode(parts[1]), OAEP_256)
    plaintext = AESGCM(cek).decrypt(b64url_decode(parts[2]), b64url_decode(parts[3]) + b64url_decode(parts[4]),
                                    parts[0].encode())
    assert plaintext == b"inner.jws.here"


def test_encrypt_refuses_header_members_and_non_rsa_keys() -> None:
    with pytest.raises(Exception, match="zip"):
        jwe.encrypt(b"x", jwcrypto_jwk.JWK(**public_jwk(BANK, "e", "enc")), header={"zip": "DEF"})
    with pytest.raises(Exception, match="not RSA"):
        jwe.encrypt(b"x", jwcrypto_jwk.JWK.generate(kty="EC", crv="P-256", kid="ec"))


def jwcrypto_jwe_to(key: rsa.RSAPrivateKey, kid: str, *, alg: str = "RSA-OAEP-256", extra: dict[str, Any] | None
                    = None) -> str:
    token = jwcrypto_jwe.JWE(b"payload", protected=json.dumps({"alg": alg, "enc": "A256GCM", "kid": kid,
                                                              **(extra or {})}))
    token.allowed_algs = [alg, "A256GCM"]
    token.add_recipient(jwcrypto_jwk.JWK(**public_jwk(key, kid, "enc")))
    compact: str = token.serialize(compact=True)
    return compact


def test_decrypt_what_jwcrypto_made() -> None:
    opened = jwe.decrypt(jwcrypto_jwe_to(BANK, "ours"), [jwe.Recipient("ours", software_unwrap(BANK))])
    assert opened.plaintext == b"payload" and opened.header["kid"] == "ours"


def test_decrypt_picks_the_key_the_kid_names_and_tries_each_without_one() -> None:
    """A rotation's two keys: the JWE's kid chooses; without a kid each is tried, the first one first."""
    used: list[str] = []

    def recording(kid: str, key: rsa.RSAPrivateKey) -> jwe.Recipient:
        def unwrap(cek: bytes) -> bytes:
            used.append(kid)
            unwrapped: bytes = software_unwrap(key)(cek)
            return unwrapped
        return jwe.Recipient(kid, unwrap)

    both = [recording("old", BANK), recording("new", OTHER)]
    assert jwe.decrypt(jwcrypto_jwe_to(OTHER, "new"), both).kid == "new" and used == ["new"]
    used.clear()
    assert jwe.decrypt(jwcrypto_jwe_to(BANK, "old"), both).kid == "old" and used == ["old"]
    used.clear()
    parts = jwcrypto_jwe_to(OTHER, "new").split(".")
    token = jwcrypto_jwe.JWE(b"payload", protected=json.dumps({"alg": "RSA-OAEP-256", "enc": "A256GCM"}))
    token.add_recipient(jwcrypto_jwk.JWK(**public_jwk(OTHER, "new", "enc")))
    no_kid = token.serialize(compact=True)
    assert "kid" not in json.loads(b64url_decode(no_kid.split(".")[0]))
    opened = jwe.decrypt(no_kid, both)
    assert opened.plaintext == b"payload" and opened.kid == "new" and used == ["old", "new"]
    with pytest.raises(WrongRecipientError, match=r"encrypted to key 'other', which is not one of ours \('old', "
                                                  r"'new'\)"):
        jwe.decrypt(jwcrypto_jwe_to(OTHER, "other"), both)
    tampered = ".".join([*parts[:3], b64url(b"\0" + b64url_decode(parts[3])[1:]), parts[4]])
    with pytest.raises(DecryptionFailedError):  # to a key of ours, damaged: the same answer as to no key
        jwe.decrypt(tampered, both)


def test_decrypt_refusals() -> None:
    with pytest.raises(WrongRecipientError):
        jwe.decrypt(jwcrypto_jwe_to(OTHER, "theirs"), [jwe.Recipient("ours", software_unwrap(BANK))])
    with pytest.raises(DecryptionFailedError):
        jwe.decrypt(jwcrypto_jwe_to(OTHER, "ours"), [jwe.Recipient("ours", software_unwrap(BANK))])
    with pytest.raises(AlgorithmRefusedError):
        jwe.decrypt(jwcrypto_jwe_to(BANK, "ours", alg="RSA-OAEP"), [jwe.Recipient("ours", software_unwrap(BANK))])
    parts = jwcrypto_jwe_to(BANK, "ours").split(".")
    tampered = ".".join([*parts[:3], b64url(b"\0" + b64url_decode(parts[3])[1:]), parts[4]])
    with pytest.raises(DecryptionFailedError):
        jwe.decrypt(tampered, [jwe.Recipient("ours", software_unwrap(BANK))])
    with pytest.raises(MalformedError):
        jwe.decrypt("a.b.c", [jwe.Recipient("ours", software_unwrap(BANK))])
