"""Client assertions and PAR request objects: the ecosystem's rules, checked before signing and by PyJWT after."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any

import jwt
import pytest

from agent.jose import (
    ClaimsError,
    JoseError,
    JoseSettings,
    check_client_assertion,
    check_request_object,
    client_assertion,
    request_object,
)
from agent.jose.assertions import client_assertion_claims
from tests.jose.conftest import CLIENT_ID, JoseToken, config_for, key_tables
from tests.jose.test_jws import counting, header_of

ISSUER = "https://bank.example/auth"
DETAILS = [{"type": "urn:openfinanceuae:account-access-consent:v1.2",
            "consent": {"Permissions": ["ReadAccountsBasic"], "ExpirationDateTime": "2030-01-01T00:00:00Z"}}]


def decode(jt: JoseToken, token: str, require: tuple[str, ...] = ("exp", "iat", "nbf", "jti")) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, jt.public_key("signing"), algorithms=["PS256"], audience=ISSUER,
                                        issuer=CLIENT_ID, options={"require": list(require)})
    return claims


def test_client_assertion_verifies_and_follows_the_rules(jose_token: JoseToken) -> None:
    before = int(time.time())
    token = client_assertion(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER)
    claims = decode(jose_token, token)
    assert header_of(token)["alg"] == "PS256" and header_of(token)["typ"] == "JWT"
    assert claims["sub"] == claims["iss"] == CLIENT_ID and claims["aud"] == ISSUER
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"] - 10
    assert uuid.UUID(claims["jti"]).version == 4


def test_configured_lifetime_and_nbf(jose_token: JoseToken) -> None:
    config = config_for(jose_token, key_tables(jose_token.token.label,
                                               "[jose]\nassertion_lifetime = 60\nassertion_nbf = false\n"))
    claims = decode(jose_token, client_assertion(jose_token.store, config, "signing", CLIENT_ID, ISSUER),
                    require=("exp", "iat", "jti"))
    assert claims["exp"] - claims["iat"] == 60 and "nbf" not in claims
    store = counting(jose_token)
    with pytest.raises(ClaimsError, match="exp - iat is 120 s; it must be 1 to 60 s"):
        client_assertion(store, config, "signing", CLIENT_ID, ISSUER, lifetime=120)
    assert store.signed == 0


@pytest.mark.parametrize("client_id,audience,lifetime,message", [
    (CLIENT_ID, ISSUER, 301, "exp - iat is 301 s"),
    (CLIENT_ID, ISSUER, 0, "exp - iat is 0 s"),
    (CLIENT_ID, "", 300, "claim 'aud' is missing"),
    ("", ISSUER, 300, "claim 'iss' is missing"),
])
def test_bad_client_assertions_are_refused_unsigned(jose_token: JoseToken, client_id: str, audience: str,
                                                    lifetime: int, message: str) -> None:
    store = counting(jose_token)
    with pytest.raises(ClaimsError, match=message):
        client_assertion(store, jose_token.config, "signing", client_id, audience, lifetime=lifetime)
    assert store.signed == 0


@pytest.mark.parametrize("change,message", [
    ({"aud": None}, "'aud' is missing"),
    ({"sub": "someone-else"}, "sub must equal iss"),
    ({"jti": ""}, "'jti' is missing"),
    ({"iat": "1700000000"}, "'iat' must be an integer"),
    ({"nbf": 10**10}, "nbf must not be after iat"),
    ({"exp": 10**10}, "exp - iat is"),
])
def test_check_client_assertion_names_the_broken_rule(change: dict[str, Any], message: str) -> None:
    claims = {**client_assertion_claims(CLIENT_ID, ISSUER, JoseSettings()), **change}
    claims = {k: v for k, v in claims.items() if v is not None}
    with pytest.raises(ClaimsError, match=message):
        check_client_assertion(claims)


def test_no_repeated_jti_in_100000_assertions() -> None:
    # Uniqueness comes from the claims, not the signature, so the claims are built without signing:
    # 1e5 token signatures would take about a minute (see docs/performance.md for the signing rates).
    settings = JoseSettings()
    now = time.time()
    jtis = {client_assertion_claims(CLIENT_ID, ISSUER, settings, now=now)["jti"] for _ in range(100_000)}
    assert len(jtis) == 100_000


def test_signed_assertions_have_distinct_jti(jose_token: JoseToken) -> None:
    tokens = [client_assertion(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER) for _ in range(50)]
    assert len({decode(jose_token, t)["jti"] for t in tokens}) == 50


def test_request_object_verifies_and_carries_pkce(jose_token: JoseToken) -> None:
    made = request_object(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER,
                          scope="openid accounts", redirect_uri="https://tpp.example/callback",
                          authorization_details=DETAILS, state="s-1")
    claims = decode(jose_token, made.request)
    assert header_of(made.request)["typ"] == "oauth-authz-req+jwt"
    assert claims == made.claims
    assert claims["response_type"] == "code" and claims["scope"] == "openid accounts"
    assert claims["redirect_uri"] == "https://tpp.example/callback" and claims["state"] == "s-1"
    assert claims["nonce"] == made.nonce and made.nonce is not None and len(made.nonce) >= 22
    assert claims["authorization_details"] == DETAILS
    assert claims["exp"] - claims["nbf"] <= 600 and claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["code_challenge_method"] == "S256"
    assert 43 <= len(made.code_verifier) <= 128
    expected = base64.urlsafe_b64encode(hashlib.sha256(made.code_verifier.encode()).digest()).rstrip(b"=").decode()
    assert claims["code_challenge"] == expected
    assert made.code_verifier not in made.request  # the verifier never leaves with the request


@pytest.mark.parametrize("kwargs,message", [
    ({"lifetime": 591}, "exp - nbf is 601 s"),
    ({"redirect_uri": "http://tpp.example/cb"}, "absolute https URL"),
    ({"scope": " "}, "scope must not be blank"),
    ({"authorization_details": []}, "authorization_details must be a non-empty list"),
    ({"authorization_details": [{"consent": {}}]}, "objects with a type"),
])
def test_bad_request_objects_are_refused_unsigned(jose_token: JoseToken, kwargs: dict[str, Any],
                                                  message: str) -> None:
    store = counting(jose_token)
    args: dict[str, Any] = {"scope": "openid", "redirect_uri": "https://tpp.example/cb", **kwargs}
    with pytest.raises(ClaimsError, match=message):
        request_object(store, jose_token.config, "signing", CLIENT_ID, ISSUER, **args)
    assert store.signed == 0


def test_check_request_object_requires_response_type_code(jose_token: JoseToken) -> None:
    made = request_object(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER, scope="openid",
                          redirect_uri="https://tpp.example/cb")
    with pytest.raises(ClaimsError, match="response_type"):
        check_request_object({**made.claims, "response_type": "token"})
    with pytest.raises(ClaimsError, match="PKCE"):
        check_request_object({**made.claims, "code_challenge_method": "plain"})


@pytest.mark.parametrize("jose_table,message", [
    ("assertion_lifetime = 301", "assertion_lifetime must be an integer from 1 to 300"),
    ("request_object_lifetime = 595", "request_object_lifetime must be an integer from 1 to 590"),
    ("nbf_skew = -1", "nbf_skew must be an integer from 0 to 60"),
    ("assertion_nbf = 1", "assertion_nbf must be true or false"),
    ("lifetime = 3", "unknown setting"),
])
def test_jose_settings_are_validated(jose_token: JoseToken, jose_table: str, message: str) -> None:
    config = config_for(jose_token, key_tables(jose_token.token.label, f"[jose]\n{jose_table}\n"))
    with pytest.raises(JoseError, match=message):
        JoseSettings.from_config(config)


def test_a_request_object_without_openid_carries_no_nonce(jose_token: JoseToken) -> None:
    """nonce is OpenID Connect's: a plain OAuth request with one is refused (oidc-provider, for one)."""
    made = request_object(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER, scope="accounts",
                          redirect_uri="https://tpp.example/callback")
    assert made.nonce is None and "nonce" not in decode(jose_token, made.request)
    with pytest.raises(ClaimsError, match="nonce is an OpenID Connect parameter"):
        request_object(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER, scope="accounts",
                       redirect_uri="https://tpp.example/callback", nonce="n-1")
    openid = request_object(jose_token.store, jose_token.config, "signing", CLIENT_ID, ISSUER, scope="openid",
                            redirect_uri="https://tpp.example/callback")
    with pytest.raises(ClaimsError, match="nonce"):
        check_request_object({k: v for k, v in openid.claims.items() if k != "nonce"})
