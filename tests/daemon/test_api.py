"""The endpoints, over the real socket: raw HTTP, curl and the client library."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.client import AgentRequestError
from agent.daemon.app import verify_in_software
from agent.daemon.http import new_interaction_id
from pkcs11_backends.keys import SignatureScheme
from tests.daemon.conftest import Daemon, read_response


def test_client_lists_keys_signs_and_signatures_verify(daemon: Daemon) -> None:
    client = daemon.client()
    assert client.health()["status"] == "alive"
    assert client.ready()["ready"] is True
    keys = {k["alias"]: k for k in client.list_keys()}
    assert keys["signing"]["type"] == "rsa:2048" and keys["signing"]["kid"] == "sig-1"
    assert keys["ecsign"]["algorithms"] == ["ES256"]
    for alias, alg in (("signing", "PS256"), ("signing", "RS256"), ("ecsign", "ES256")):
        pem = client.public_key_pem(alias)
        spki = serialization.load_pem_public_key(pem.encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        signature = client.sign(alias, b"header.payload", alg)
        assert verify_in_software(spki, signature, b"header.payload", SignatureScheme.from_jose(alg))
        assert not verify_in_software(spki, signature, b"header.payload!", SignatureScheme.from_jose(alg))


def test_algorithm_outside_the_keys_list_is_refused(daemon: Daemon) -> None:
    with pytest.raises(AgentRequestError) as caught:
        daemon.client().sign("ecsign", b"x", "ES384")
    error = caught.value
    assert error.status == 403 and error.code == "algorithm_not_allowed"
    assert "ES256" in str(error) and "[keys.ecsign] algorithms" in error.hint
    assert len(error.interaction_id) == 36


def test_unknown_key_and_unknown_path(daemon: Daemon) -> None:
    with pytest.raises(AgentRequestError) as caught:
        daemon.client().sign("nope", b"x", "PS256")
    assert caught.value.status == 404 and caught.value.code == "unknown_key" and "signing" in caught.value.hint
    status, _, body = _one(daemon, b"GET /v2/keys HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404 and json.loads(body)["code"] == "not_found"
    status, headers, body = _one(daemon, b"DELETE /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET"


def test_interaction_ids_the_agent_makes_are_distinct_version_4_uuids() -> None:
    made = [new_interaction_id() for _ in range(5000)]
    assert len(set(made)) == len(made)
    parsed = [uuid.UUID(text) for text in made]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == text for u, text in zip(parsed, made,
                                                                                                   strict=True))
    assert {text[19] for text in made} == set("89ab")  # every variant nibble turns up, none other


def test_keep_alive_serves_many_requests_on_one_connection_and_echoes_interaction_id(daemon: Daemon) -> None:
    interaction = "0b7c0a34-43c4-4a5e-9df1-7c5f4b2a9d11"
    body = json.dumps({"alg": "PS256", "data_b64": base64.b64encode(b"abc").decode()}).encode()
    with daemon.connect() as sock:
        for _ in range(5):
            sock.sendall(b"POST /v1/keys/signing/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"x-fapi-interaction-id: " + interaction.encode() + b"\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            status, headers, payload = read_response(sock)
            assert status == 200 and headers["connection"] == "keep-alive"
            assert headers["x-fapi-interaction-id"] == interaction
            assert json.loads(payload)["alg"] == "PS256"
        # Another head on the same connection is read for itself: no interaction id given, a new one each time.
        made = set()
        for _ in range(2):
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert status == 200
            made.add(headers["x-fapi-interaction-id"])
        assert interaction not in made and len(made) == 2
        # Pipelined: two requests in one write, two answers in order.
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 404


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_unix_socket(daemon: Daemon) -> None:
    data = base64.b64encode(b"from curl").decode()
    result = subprocess.run(["curl", "-sS", "--unix-socket", str(daemon.socket_path), "-H",
                             "Content-Type: application/json", "-d", json.dumps({"alg": "ES256", "data_b64": data}),
                             "http://localhost/v1/keys/ecsign/sign"], capture_output=True, text=True, timeout=30,
                            check=True)
    assert len(base64.b64decode(json.loads(result.stdout)["signature_b64"])) == 64


def test_request_log_has_peer_and_operation_but_no_body(daemon: Daemon) -> None:
    secret = base64.b64encode(b"do-not-log-this-payload").decode()
    daemon.client().sign("signing", b"do-not-log-this-payload", "PS256")
    signs: list[dict[str, object]] = []
    for _ in range(100):  # the line is written just after the response is sent
        lines = [json.loads(line) for line in daemon.stderr().splitlines() if line.startswith("{")]
        signs = [entry for entry in lines if entry.get("operation") == "sign"]
        if signs:
            break
        time.sleep(0.05)
    assert signs and signs[-1]["peer_uid"] == 0 and signs[-1]["key"] == "signing" and signs[-1]["status"] == 200
    assert "duration_ms" in signs[-1] and "interaction_id" in signs[-1]
    assert secret not in daemon.stderr() and "do-not-log" not in daemon.stderr()
    pin_file = tomllib.loads(daemon.config_path.read_text())["pkcs11"]["pin_file"]
    pin = Path(pin_file).read_text().strip()
    assert pin and pin not in daemon.stderr()


def _one(daemon: Daemon, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with daemon.connect() as sock:
        sock.sendall(request)
        return read_response(sock)
