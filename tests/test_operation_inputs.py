"""Typed operation inputs on plain values (no socket): what the router and the CLI's in-process path both parse."""

from __future__ import annotations

import pytest

from agent.operations import inputs
from agent.operations.banks import ForwardInput, TokenInput
from agent.operations.consents import CallbackInput, ParInput, RefreshInput
from agent.operations.inputs import InvalidInput
from agent.operations.jws import JwsInput
from agent.operations.keys import PublicInput, SignInput
from agent.operations.registry import SPECS


@pytest.mark.parametrize("cls,body,code,words", [
    (TokenInput, {"scope": "a", "grant_type": "authorization_code"}, "unknown_field", "'grant_type'"),
    (TokenInput, {}, "missing_field", "'scope' is required"),
    (TokenInput, {"scope": 3}, "bad_field", "must be a string"),
    (TokenInput, {"scope": "a", "refresh": "yes"}, "bad_field", "true or false"),
    (TokenInput, {"scope": "s" * 1025}, "field_too_long", "1025 characters, more than the 1024"),
    (SignInput, {"alg": "PS256", "data_b64": "%%%"}, "bad_base64", "not base64"),
    (SignInput, {"alg": None, "data_b64": "aGk="}, "bad_field", "must not be null"),
    (JwsInput, {"payload": {"a": float("nan")}}, "bad_json", "NaN or Infinity"),
    (JwsInput, {"payload": {"a": 1}, "payload_b64": "aGk="}, "missing_field", "exactly one"),
    (JwsInput, {"payload": {}, "header": {str(n): n for n in range(17)}}, "field_too_long", "17 members"),
    (ParInput, {"scope": "openid", "redirect_uri": "https://[x/"}, "bad_field", "must be an https URL"),
    (ParInput, {"scope": "openid", "redirect_uri": "https://a/cb", "authorization_details": [1]}, "bad_field",
     "list of objects"),
    (ParInput, {"scope": "openid", "redirect_uri": "https://a/cb", "resource": "https://api"}, "bad_field",
     "'resource' must be a list"),
    (ParInput, {"scope": "openid", "redirect_uri": "https://a/cb", "resource": []}, "bad_field", "at least one"),
    (ParInput, {"scope": "openid", "redirect_uri": "https://a/cb", "max_age": "600"}, "bad_field", "whole number"),
    (ParInput, {"scope": "openid", "redirect_uri": "https://a/cb", "code_verifier": "x"}, "unknown_field",
     "'code_verifier'"),
    (CallbackInput, {}, "missing_field", "exactly one of 'url'"),
    (CallbackInput, {"url": "?code=a", "params": {"code": "a"}}, "missing_field", "exactly one"),
    (CallbackInput, {"params": {"state": 1}}, "bad_field", "object of strings"),
    (CallbackInput, {"url": "x" * 8193}, "field_too_long", "8193 characters"),
    (RefreshInput, {}, "missing_field", "'refresh_token' is required"),
    (RefreshInput, {"refresh_token": " "}, "missing_field", "is empty"),
    (ForwardInput, {"method": "GET", "path": "/", "headers": {"a": 1}}, "bad_field", "object of strings"),
    (ForwardInput, {"method": "TRACE", "path": "/"}, "bad_field", "'method' must be one of"),
    (PublicInput, {"format": "der"}, "bad_field", "pem or jwk"),  # bad_query in a query (the socket's)
])
def test_bad_inputs_are_refused_naming_the_field(cls: type, body: dict[str, object], code: str, words: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        inputs.parse(cls, body)
    assert refused.value.code == code and words in str(refused.value), str(refused.value)


def test_query_flags_and_defaults() -> None:
    assert inputs.parse(TokenInput, {"scope": "a"}) == TokenInput("a", False)
    from agent.operations.banks import DiscoveryInput

    assert inputs.parse(DiscoveryInput, {"refresh": "1"}, from_query=True).refresh is True
    with pytest.raises(InvalidInput, match="true or false"):
        inputs.parse(DiscoveryInput, {"refresh": "maybe"}, from_query=True)


def test_every_operation_input_has_a_plan() -> None:
    # An input declared with a type the parser does not know fails here, not at a caller's first request.
    for spec in SPECS:
        try:
            inputs.parse(spec.input, {})
        except InvalidInput as refused:
            assert refused.code == "missing_field", (spec.name, refused)
