"""The optional request parameters a bank may require, and the inputs of signed bodies and personal data:
refused before anything is signed, and what is signed reads back with PyJWT."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from agent.errors import InputError
from agent.jose import ClaimsError, request_object
from agent.openfinance.payloads import check_idempotency_key, signed_body
from tests.jose.conftest import CLIENT_ID, JoseToken

ISSUER = "https://bank.example/auth"
GOOD = {"resource": ["https://rs.example/a", "https://rs.example/b"], "prompt": "login consent", "max_age": 0,
        "acr_values": "urn:openbanking:psd2:sca", "claims": {"id_token": {"acr": {"essential": True}}}}


def make(jt: JoseToken, parameters: dict[str, Any]) -> dict[str, Any]:
    made = request_object(jt.store, jt.config, "signing", CLIENT_ID, ISSUER, scope="openid accounts",
                          redirect_uri="https://tpp.example/cb", parameters=parameters)
    claims: dict[str, Any] = jwt.decode(made.request, jt.public_key("signing"), algorithms=["PS256"],
                                        audience=ISSUER)
    return claims


def test_parameters_are_signed_into_the_request_object(jose_token: JoseToken) -> None:
    claims = make(jose_token, GOOD)
    assert {name: claims[name] for name in GOOD} == GOOD


@pytest.mark.parametrize("parameters,message", [
    ({"resource": "rs.example"}, "resource"),
    ({"resource": []}, "resource"),
    ({"resource": "https://rs.example/#frag"}, "resource"),
    ({"prompt": "none login"}, "prompt"),
    ({"prompt": "always"}, "prompt"),
    ({"max_age": -1}, "max_age"),
    ({"max_age": True}, "max_age"),
    ({"acr_values": ""}, "acr_values"),
    ({"claims": {"id_token": "acr"}}, "claims"),
    ({"login_hint_token": "x"}, "unknown parameter"),
])
def test_bad_parameters_are_refused_before_signing(jose_token: JoseToken, parameters: dict[str, Any],
                                                   message: str) -> None:
    with pytest.raises(ClaimsError, match=message):
        make(jose_token, parameters)


@pytest.mark.parametrize("kwargs,message", [
    ({"message": {"Data": float("nan")}}, "NaN"),
    ({"message": ["Data"]}, "JSON object"),
    ({"audience": []}, "aud"),
    ({"audience": ""}, "aud"),
    ({"lifetime": 301}, "lifetime"),
])
def test_bad_signed_bodies_are_refused(jose_token: JoseToken, kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"client_id": CLIENT_ID, "audience": [ISSUER], "message": {"Data": {}}, **kwargs}
    with pytest.raises(ClaimsError, match=message):
        signed_body(jose_token.store, jose_token.config, "signing", **arguments)


@pytest.mark.parametrize("value", ["", "a b", "x" * 41, "tab\there", "new\nline"])
def test_idempotency_keys(value: str) -> None:
    assert check_idempotency_key("pay-2026-12-01-0001") == "pay-2026-12-01-0001"
    with pytest.raises(InputError):
        check_idempotency_key(value)
