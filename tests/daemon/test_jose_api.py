"""JWS, JWK and JWKS endpoints: what a caller gets, and clear refusals of bad requests (no bank needed)."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from agent.client import AgentRequestError
from tests.daemon.conftest import Daemon


def test_es256_jws_verifies_with_the_public_jwk(daemon: Daemon) -> None:
    client = daemon.client()
    jwk = client.public_jwk("ecsign")
    assert jwk["kty"] == "EC" and jwk["alg"] == "ES256" and jwk["use"] == "sig"
    signed = client.jws("ecsign", b"exact bytes")
    assert jwt.get_unverified_header(signed)["kid"] == jwk["kid"]
    assert jwt.api_jws.decode(signed, jwt.PyJWK.from_dict(jwk).key, algorithms=["ES256"]) == b"exact bytes"
    assert [k["kid"] for k in client.jwks()["keys"]] == ["sig-1", jwk["kid"]]


@pytest.mark.parametrize("target,body,status,code", [
    ("/v1/keys/signing/jws", {"payload": {"a": 1}, "payload_b64": "YQ=="}, 400, "missing_field"),
    ("/v1/keys/signing/jws", {"payload": [1]}, 400, "bad_field"),
    ("/v1/keys/signing/jws", {"payload": {}, "header": {"kid": "mine"}}, 400, "jose_refused"),
    ("/v1/keys/ecsign/jws", {"payload": {}, "alg": "PS256"}, 403, "algorithm_not_allowed"),
    ("/v1/keys/nope/jws", {"payload": {}}, 404, "unknown_key"),
    ("/v1/banks/nowhere/token", {"scope": "accounts"}, 404, "unknown_bank"),
    ("/v1/banks/nowhere/token", {}, 400, "missing_field"),
    ("/v1/banks/nowhere/par", {"scope": "openid"}, 400, "missing_field"),
])
def test_bad_requests_are_refused_with_a_stable_code(daemon: Daemon, target: str, body: dict[str, object],
                                                     status: int, code: str) -> None:
    client = daemon.client()
    with pytest.raises(AgentRequestError) as refused:
        client._json("POST", target, body)
    assert (refused.value.status, refused.value.code) == (status, code), str(refused.value)


def test_public_key_formats(daemon: Daemon) -> None:
    with daemon.connect() as sock:
        sock.sendall(b"GET /v1/keys/signing/public?format=xml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 400") and '"bad_query"' in answer
    records = [json.loads(line) for line in daemon.audit_file.read_text().splitlines()]
    daemon.client().jws("signing", b"x", "RS256")
    last = json.loads(daemon.audit_file.read_text().splitlines()[-1])
    assert last["seq"] == records[-1]["seq"] + 1 and last["operation"] == "jws" and last["algorithm"] == "RS256"
    assert base64.b64decode(daemon.client().public_key_pem("signing").splitlines()[1])
