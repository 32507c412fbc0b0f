"""JWS and JWKS made on the token, each checked by PyJWT against the public key read from the token."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import jwt
import pytest

from agent.config import Config
from agent.jose import AlgorithmNotAllowedError, JoseError, KidError, jwks, resolve, sign_jws
from agent.jose.encoding import b64url, b64url_decode
from agent.jose.keys import jwk_thumbprint
from pkcs11_backends.errors import KeyNotFoundError
from pkcs11_backends.keys import KeyStore, SignatureScheme
from pkcs11_backends.uri import Pkcs11Uri
from tests.jose.conftest import JoseToken, config_for, key_tables


class CountingStore(KeyStore):
    """The real KeyStore, counting what reaches the token: proof that refused requests sign nothing."""

    signed = 0

    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        self.signed += 1
        return super().sign(name, data, scheme, timeout)


def counting(jt: JoseToken) -> CountingStore:
    return CountingStore(jt.store.pool, jt.store.aliases)


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(b64url_decode(token.split(".", maxsplit=1)[0]))
    return header


@pytest.mark.parametrize("name,alg,sig_len", [("signing", "PS256", 256), ("es", "ES256", 64), ("es384", "ES384", 96)])
def test_jws_verifies_with_pyjwt_against_the_token_public_key(jose_token: JoseToken, name: str, alg: str,
                                                              sig_len: int) -> None:
    payload = {"hello": "world", "n": 1, "text": "ملاحظة"}
    token = sign_jws(jose_token.store, jose_token.config, name, json.dumps(payload).encode(), alg=alg)
    assert len(b64url_decode(token.split(".")[2])) == sig_len  # raw r||s for ECDSA, not DER
    decoded = jwt.api_jws.decode_complete(token, jose_token.public_key(name), algorithms=[alg])
    assert json.loads(decoded["payload"]) == payload
    assert decoded["header"]["alg"] == alg


def test_default_kid_is_the_certificate_thumbprint_and_the_jwk_thumbprint_without_one(jose_token: JoseToken) -> None:
    store, config = jose_token.store, jose_token.config
    with_cert = header_of(sign_jws(store, config, "signing", b"x"))
    assert with_cert == {"alg": "PS256", "kid": b64url(hashlib.sha256(jose_token.certificate_der("signing")).digest())}
    without = header_of(sign_jws(store, config, "bare", b"x"))
    assert without["kid"] == jwk_thumbprint(jose_token.pyjwt_jwk("bare"))


def test_kid_modes_literal_thumbprint_and_certificate(jose_token: JoseToken) -> None:
    label = jose_token.token.label
    config = config_for(jose_token, key_tables(label).replace(
        "object=signing;type=private\"\n", "object=signing;type=private\"\nkid = \"directory-kid-7\"\n").replace(
        "object=es;type=private\"\n", "object=es;type=private\"\nkid = \"thumbprint\"\n").replace(
        "object=bare;type=private\"\n", "object=bare;type=private\"\nkid = \"x5t#S256\"\n"))
    assert header_of(sign_jws(jose_token.store, config, "signing", b"x"))["kid"] == "directory-kid-7"
    es_kid = header_of(sign_jws(jose_token.store, config, "es", b"x"))["kid"]
    assert es_kid == jwk_thumbprint(jose_token.pyjwt_jwk("es"))
    store = counting(jose_token)
    with pytest.raises(KidError, match="no certificate on the token"):
        sign_jws(store, config, "bare", b"x")
    assert store.signed == 0


def test_rfc7638_thumbprint_example() -> None:
    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjB"
         "ZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8"
         "KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_"
         "xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
    assert jwk_thumbprint({"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}) == \
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rs256_refused_unless_configured(jose_token: JoseToken) -> None:
    store = counting(jose_token)
    with pytest.raises(AlgorithmNotAllowedError, match="may not sign with RS256") as refused:
        sign_jws(store, jose_token.config, "signing", b"x", alg="RS256")
    assert "[keys.signing] algorithms" in refused.value.hint
    assert store.signed == 0
    allowed = config_for(jose_token, key_tables(jose_token.token.label).replace(
        "object=signing;type=private\"\n", "object=signing;type=private\"\nalgorithms = [\"PS256\", \"RS256\"]\n"))
    token = sign_jws(jose_token.store, allowed, "signing", b"{}", alg="RS256")
    jwt.api_jws.decode_complete(token, jose_token.public_key("signing"), algorithms=["RS256"])
    assert header_of(sign_jws(jose_token.store, allowed, "signing", b"{}"))["alg"] == "PS256"  # the first listed


@pytest.mark.parametrize("name,alg,message", [
    ("signing", "ES256", "may not sign with ES256"),
    ("es", "PS256", "may not sign with PS256"),
    ("es384", "ES256", "may not sign with ES256"),  # ES256 is P-256 only (RFC 7518 §3.4)
    ("es", "HS256", "may not sign with HS256"),
    ("es", "none", "may not sign with none"),
])
def test_algorithm_the_key_cannot_or_may_not_make(jose_token: JoseToken, name: str, alg: str, message: str) -> None:
    store = counting(jose_token)
    with pytest.raises(AlgorithmNotAllowedError, match=message):
        sign_jws(store, jose_token.config, name, b"x", alg=alg)
    assert store.signed == 0


@pytest.mark.parametrize("setting,message", [
    ('algorithms = ["ES256"]', "lists ES256, which key 'signing' \\(rsa:2048\\) cannot make"),
    ('algorithms = ["PS512"]', "unknown algorithm 'PS512'"),
])
def test_configured_algorithms_are_checked_against_the_key(jose_token: JoseToken, setting: str, message: str) -> None:
    config = config_for(jose_token, key_tables(jose_token.token.label).replace(
        "object=signing;type=private\"\n", f"object=signing;type=private\"\n{setting}\n"))
    with pytest.raises(AlgorithmNotAllowedError, match=message):
        sign_jws(jose_token.store, config, "signing", b"x")


def test_caller_cannot_set_alg_or_kid_in_the_header(jose_token: JoseToken) -> None:
    with pytest.raises(JoseError, match="alg, kid are set by the agent"):
        sign_jws(jose_token.store, jose_token.config, "es", b"x", header={"alg": "none", "kid": "other"})
    token = sign_jws(jose_token.store, jose_token.config, "es", b"x", header={"typ": "JOSE", "cty": "json"})
    assert header_of(token)["typ"] == "JOSE"


def test_unknown_key_is_a_clear_error(jose_token: JoseToken) -> None:
    with pytest.raises(KeyNotFoundError):
        sign_jws(jose_token.store, jose_token.config, f"pkcs11:token={jose_token.token.label};object=nope", b"x")


def test_jwks_carries_kid_use_alg_and_the_certificate(jose_token: JoseToken) -> None:
    config: Config = jose_token.config
    exported = jwks(jose_token.store, config, ["signing", "es", "bare"])
    json.dumps(exported)  # plain JSON
    by_kid = {k["kid"]: k for k in exported["keys"]}
    signing = by_kid[resolve(jose_token.store, config, "signing").kid]
    der = jose_token.certificate_der("signing")
    assert signing["use"] == "sig" and signing["alg"] == "PS256" and signing["kty"] == "RSA"
    assert signing["x5c"] == [base64.b64encode(der).decode()]
    assert signing["x5t#S256"] == signing["kid"] == b64url(hashlib.sha256(der).digest())
    es = next(k for k in exported["keys"] if k["kty"] == "EC")
    assert es["crv"] == "P-256" and es["alg"] == "ES256" and "x5c" not in es
    # The independent library reads the set and verifies tokens with it.
    keyset = jwt.PyJWKSet.from_dict(exported)
    for name in ("signing", "es", "bare"):
        token = sign_jws(jose_token.store, config, name, b'{"a":1}')
        key = keyset[header_of(token)["kid"]]
        assert jwt.api_jws.decode_complete(token, key.key, algorithms=[key.algorithm_name])["payload"] == b'{"a":1}'


def test_jwks_defaults_to_every_configured_key(jose_token: JoseToken) -> None:
    exported = jwks(jose_token.store, jose_token.config)
    assert sorted(k["alg"] for k in exported["keys"]) == ["ES256", "ES384", "PS256", "PS256"]
    with pytest.raises(JoseError, match="no keys named"):
        jwks(jose_token.store, config_for(jose_token, ""))
