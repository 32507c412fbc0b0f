"""The operations core through the socket, as local attackers try it: other uids, no bank needed.

The bank ``mb`` is configured but unreachable: every refusal below happens before any bank call. Its transport
key is a real key on the token (purpose tls, as the bank's client_key).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient, UntrustedAgentError
from agent.daemon.routes import ROUTES
from agent.errors import ExitStatus
from agent.operations.spec import Access
from agent.runtime import Runtime
from agent.x509.certificates import import_certificate
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank.ca import TestCA
from pkcs11_backends.keys import KeySpec
from tests.conftest import Token
from tests.daemon.conftest import NOBODY, TPP_AGENT, Daemon, daemon_config, start_daemon
from tests.daemon.test_least_privilege import STRANGER
from tests.daemon.test_policy import as_user

ASSERTER = 4343  # a uid in the socket's group that may also make client assertions for mb
CLIENT_ID = "client-1"
ISSUER = "https://127.0.0.1:9"


def ops_config(token: Token, public_dir: Path) -> str:
    return textwrap.dedent(f"""
        [keys.transport]
        uri = "pkcs11:token={token.label};object=transport;type=private"

        [keys.bare]
        uri = "pkcs11:token={token.label};object=bare;type=private"

        [keys.checkpoints]
        uri = "pkcs11:token={token.label};object=checkpoints;type=private"
        purpose = "audit"

        [policy.rules.nobody-everything]
        users = ["nobody"]
        operations = ["keys", "public", "sign", "jws", "token", "par", "forward"]
        keys = ["*"]
        banks = ["mb"]
        scopes = ["accounts"]

        [policy.rules.asserter]
        users = [{ASSERTER}]
        operations = ["jws", "client_assertion"]
        keys = ["signing"]
        banks = ["mb"]

        [banks.mb]
        discovery_url = "{ISSUER}/.well-known/openid-configuration"
        issuer = "{ISSUER}"
        ca_bundle = "{public_dir}/ca.pem"
        client_key = "transport"
        api_origins = ["https://api.bank.example"]

        [tokens]
        client_id = "{CLIENT_ID}"
        """)


@pytest.fixture
def ops(keyed_token: Token, runtime: Runtime, public_dir: Path) -> Iterator[Daemon]:
    transport = str(runtime.keys.generate("transport", KeySpec.parse("rsa:2048")).uri)
    # A bank whose transport key has no valid certificate keeps the agent not ready: mb's has one.
    csr = build_csr(runtime.keys, transport, directory_subject("Test TPP L.L.C.", "org-0001", str(uuid.uuid4())))
    import_certificate(runtime.keys, transport, TestCA(public_dir / "ca").issue_from_csr(csr.pem.encode()), "test")
    runtime.keys.generate("bare", KeySpec.parse("rsa:2048"))
    runtime.keys.generate("checkpoints", KeySpec.parse("ec:p256"))
    running = start_daemon(keyed_token, public_dir, ops_config(keyed_token, public_dir))
    yield running
    running.stop()
    running.notify.close()


def call(daemon: Daemon, uid: int, method: str, target: str, body: object = None) -> tuple[int, dict[str, object]]:
    answer = as_user(daemon, uid, NOBODY, method, target, "" if body is None else json.dumps(body))
    text = str(answer["body"])
    return int(str(answer["status"])), (json.loads(text) if text.startswith("{") else {"text": text})


def test_every_route_is_policy_checked_and_only_health_and_ready_are_open(ops: Daemon) -> None:
    open_routes = {route.pattern for route in ROUTES if route.spec.access is Access.OPEN}
    assert open_routes == {"/v1/health", "/v1/ready"}
    refused = 0
    for route in ROUTES:
        target = route.target("signing", "mb")
        status, answer = call(ops, STRANGER, route.method, target, None if route.method == "GET" else {})
        if route.pattern in open_routes:
            assert status == 200, (route, answer)
        else:
            assert status == 403 and answer["code"] == "forbidden", (route, answer)
            refused += 1
    # A caller no rule names learns from ready whether the agent is ready, nothing else.
    assert call(ops, STRANGER, "GET", "/v1/ready") == (200, {"ready": True})
    # Each refusal is in the audit trail, for the stranger, with nothing signed.
    denied = [json.loads(line) for line in ops.audit_file.read_text().splitlines()]
    denied = [r for r in denied if r.get("result") == "denied"]  # key uses, not the trail's checkpoints
    assert len(denied) == refused and {r["uid"] for r in denied} == {STRANGER}
    assert {r["operation"] for r in denied} == {route.spec.operation.value for route in ROUTES
                                                 if route.pattern not in open_routes}
    assert any(r["key"].endswith("object=signing;type=private") for r in denied)
    assert any(r["key"] == "bank:mb" for r in denied)


def test_the_transport_key_signs_nothing_for_a_caller_whatever_its_grant(ops: Daemon) -> None:
    # nobody holds keys = ["*"] with sign and jws: the transport key's purpose still refuses both.
    data = base64.b64encode(b"TLS 1.3, client CertificateVerify" + bytes(64)).decode()
    for target, body in (("/v1/keys/transport/sign", {"alg": "PS256", "data_b64": data}),
                         ("/v1/keys/transport/jws", {"payload": {"a": 1}})):
        status, answer = call(ops, NOBODY, "POST", target, body)
        assert status == 403 and answer["code"] == "key_purpose", answer
        assert "purpose is 'tls'" in str(answer["message"])
    status, answer = call(ops, NOBODY, "GET", "/v1/keys/transport/public?format=jwk")
    assert status == 403 and answer["code"] == "key_purpose"
    # Not in the JWK Set either: that set is what banks trust for JWS.
    status, keyset = call(ops, NOBODY, "GET", "/v1/jwks")
    jws_kids = {call(ops, NOBODY, "GET", f"/v1/keys/{alias}/public?format=jwk")[1]["kid"]
                for alias in ("signing", "ecsign", "bare")}
    assert status == 200 and {k["kid"] for k in keyset["keys"]} == jws_kids  # type: ignore[attr-defined]
    # Not even an admin gets a CSR for it over the socket (its subject is the operator's choice, on the host).
    status, answer = call(ops, 0, "POST", "/v1/keys/transport/csr", {"subject": "CN=attacker,O=x,C=AE"})
    assert status == 403 and answer["code"] == "key_purpose"
    # Its public half is no secret: PEM is fine.
    assert str(call(ops, NOBODY, "GET", "/v1/keys/transport/public")[1]["text"]).startswith("-----BEGIN PUBLIC KEY")
    # An audit key is the audit trail's alone: no caller operation signs with it either.
    for target, body in (("/v1/keys/checkpoints/sign", {"alg": "ES256", "data_b64": data}),
                         ("/v1/keys/checkpoints/jws", {"payload": {"seq": 1}})):
        status, answer = call(ops, NOBODY, "POST", target, body)
        assert status == 403 and answer["code"] == "key_purpose", answer
    assert call(ops, 0, "POST", "/v1/keys/checkpoints/csr", {"subject": "CN=x,O=x,C=AE"})[0] == 403
    records = [r for r in map(json.loads, ops.audit_file.read_text().splitlines()) if "key" in r]
    for name in ("object=transport", "object=checkpoints"):
        assert not [r for r in records if name in r["key"] and r["operation"] != "canary" and r["result"] != "denied"]


def test_a_raw_signature_needs_a_jws_key_that_declares_it(ops: Daemon) -> None:
    body = {"alg": "PS256", "data_b64": "aGk="}
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/sign", body)[0] == 200  # raw_sign = true
    status, answer = call(ops, NOBODY, "POST", "/v1/keys/bare/sign", body)
    assert status == 403 and answer["code"] == "key_purpose" and "raw_sign" in str(answer["message"])
    assert call(ops, NOBODY, "POST", "/v1/keys/bare/jws", {"payload": {"a": 1}})[0] == 200  # a jws key still


def test_jws_refuses_what_only_the_agent_says_to_a_bank(ops: Daemon) -> None:
    now = int(time.time())
    assertion = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": ISSUER, "jti": "j1", "iat": now, "exp": now + 60}
    request_object = {**assertion, "response_type": "code", "redirect_uri": "https://tpp.example/cb"}
    # nobody holds jws (and par) but not client_assertion; the asserter holds client_assertion but not par.
    for uid, claims, typed in ((NOBODY, assertion, "client assertion"), (ASSERTER, request_object, "request object")):
        for body in ({"payload": claims},
                     {"payload_b64": base64.b64encode(json.dumps(claims).encode()).decode()},
                     {"payload": {**claims, "aud": [ISSUER + "/", "https://elsewhere"]}}):
            status, answer = call(ops, uid, "POST", "/v1/keys/signing/jws", body)
            assert status == 403 and answer["code"] == "forbidden", (body, answer)
            assert f"shaped like a {typed} for bank 'mb'" in str(answer["message"])
    # A caller that holds the typed operation for mb may sign the same itself; the same claims for another client
    # are no assertion of the agent's.
    assert call(ops, ASSERTER, "POST", "/v1/keys/signing/jws", {"payload": assertion})[0] == 200
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/jws", {"payload": request_object})[0] == 200
    other = {**assertion, "iss": "someone-else", "sub": "someone-else"}
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/jws", {"payload": other})[0] == 200


def test_jws_refuses_payloads_another_parser_could_read_otherwise(ops: Daemon) -> None:
    # Python keeps the last of two members with one name, some bank parsers the first; lenient ones read comments
    # and trailing commas; a UTF-8 BOM hid the claims from the check. Each was signed unchecked before.
    now = int(time.time())
    head = f'"iss": "{CLIENT_ID}", "sub": "{CLIENT_ID}", "jti": "j2", "iat": {now}, "exp": {now + 60}'
    for raw in (f'{{{head}, "aud": "{ISSUER}", "aud": "https://elsewhere"}}',
                f'{{{head}, "aud": "{ISSUER}", /* lenient */ "x": 1}}',
                f'{{{head}, "aud": "{ISSUER}",}}',
                f'{{{head}, "nested": {{"a": 1, "a": 2}}}}'):
        body = {"payload_b64": base64.b64encode(raw.encode()).decode()}
        status, answer = call(ops, NOBODY, "POST", "/v1/keys/signing/jws", body)
        assert status == 400 and answer["code"] == "bad_json", (raw, answer)
    bom = b"\xef\xbb\xbf" + json.dumps({"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": ISSUER, "jti": "j3",
                                          "iat": now, "exp": now + 60}).encode()
    status, answer = call(ops, NOBODY, "POST", "/v1/keys/signing/jws", {"payload_b64": base64.b64encode(bom).decode()})
    assert status == 403 and "shaped like a client assertion" in str(answer["message"]), answer
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/jws",
                {"payload_b64": base64.b64encode(b"{not json, and not claims").decode()})[0] == 400
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/jws",
                {"payload_b64": base64.b64encode(b"plain bytes").decode()})[0] == 200  # no claims: signed as is
    # The request body itself: one name twice is no request the agent can read one way only.
    raw_request = as_user(ops, NOBODY, NOBODY, "POST", "/v1/keys/signing/jws",
                          '{"payload": {"a": 1}, "header": {"typ": "JWT"}, "header": {"cty": "x"}}')
    assert raw_request["status"] == 400 and "appears twice" in str(raw_request["body"]), raw_request


@pytest.mark.parametrize("header", [{"kid": "mine"}, {"x5t": "x"}, {"x5t#S256": "x"}, {"jku": "https://a"},
                                    {"x5u": "https://a"}, {"crit": ["b64"], "b64": False}, {"b64": False},
                                    {"zip": "DEF"}, {"ALG": "none"}, {"Alg": "HS256"}, {"jwk": {}}])
def test_jws_headers_come_from_an_allowlist(ops: Daemon, header: dict[str, object]) -> None:
    status, answer = call(ops, NOBODY, "POST", "/v1/keys/signing/jws", {"payload": {"a": 1}, "header": header})
    assert status == 400 and answer["code"] == "jose_refused", answer
    assert "may not be set by the caller" in str(answer["message"])


def test_jws_caps_exp_and_refuses_nan(ops: Daemon) -> None:
    far = {"payload": {"exp": int(time.time()) + 10_000}}
    status, answer = call(ops, NOBODY, "POST", "/v1/keys/signing/jws", far)
    assert status == 400 and answer["code"] == "claims_refused" and "600 s allowed" in str(answer["message"])
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/jws",
                {"payload": {"exp": int(time.time()) + 500}, "header": {"typ": "JWT"}})[0] == 200
    nan = base64.b64encode(b'{"exp": NaN}').decode()
    status, answer = call(ops, NOBODY, "POST", "/v1/keys/signing/jws", {"payload_b64": nan})
    assert status == 400 and answer["code"] == "bad_json"
    raw = as_user(ops, NOBODY, NOBODY, "POST", "/v1/keys/signing/jws", '{"payload": {"exp": Infinity}}')
    assert raw["status"] == 400


def test_inputs_are_strict(ops: Daemon) -> None:
    grant = {"grant_type": "authorization_code", "code": "c", "code_verifier": "v", "scope": "accounts"}
    status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/token", grant)
    assert status == 400 and answer["code"] == "unknown_field" and "'code'" in str(answer["message"])
    status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/token", {"scope": "a" * 5000})
    assert status == 400 and answer["code"] == "field_too_long"
    status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/token", {"scope": "accounts payments"})
    assert status == 403 and "'payments' is not among the scopes" in str(answer["message"])
    status, answer = call(ops, NOBODY, "POST", "/v1/keys/signing/sign", {"alg": "PS256", "data_b64": "aGk=",
                                                                         "key": "transport"})
    assert status == 400 and answer["code"] == "unknown_field"
    for body in ({"method": "GET", "url": "https://[x/"}, {"method": "GET", "url": "https://127.0.0.1:9999/"}):
        status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/forward", body)
        assert status == 400 and answer["code"] == "host_not_allowed", answer
    # api_origins adds to where forward may go; nothing else of discovery's strings does.
    assert "https://api.bank.example" in str(answer["hint"])
    for name in ("Host ", "Transfer-Encoding\t", "x-fapi-interaction-id "):
        status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/forward",
                              {"method": "GET", "path": "/x", "headers": {name: "v"}})
        assert status == 400 and answer["code"] == "bad_field", name
    status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/forward",
                          {"method": "GET", "path": "/x", "headers": {"X-A": "v\x00"}})
    assert status == 400 and "control character" in str(answer["message"])
    status, answer = call(ops, NOBODY, "POST", "/v1/banks/mb/par", {"scope": "accounts", "redirect_uri": "https://[x/"})
    assert status == 400 and answer["code"] == "bad_field"


def test_group_rules_work_for_a_peer_in_more_than_256_groups(keyed_token: Token, public_dir: Path) -> None:
    groups = list(range(70_000, 70_300))
    daemon = start_daemon(keyed_token, public_dir, f'\n[policy.rules.many]\ngroups = [{groups[-1]}]\n'
                                                    'operations = ["keys"]\nkeys = ["signing"]\n')
    try:
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                 "s.sendall(b'GET /v1/keys HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
                 "print(s.recv(65536).split(b' ')[1].decode())")
        result = subprocess.run([os.path.realpath(sys.executable), "-c", probe, str(daemon.socket_path)],
                                user=STRANGER, group=NOBODY, extra_groups=groups, capture_output=True, text=True,
                                timeout=30, check=True, cwd="/")
        assert result.stdout.strip() == "200", result.stderr
    finally:
        daemon.stop()
        daemon.notify.close()


def test_client_and_cli_talk_only_to_a_socket_the_agents_user_serves(token: Token, public_dir: Path) -> None:
    # A directory anyone may write (like /tmp): a stranger's process binds the path the agent would use.
    shared = public_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "agent.sock"
    fake = ("import socket, sys\nl = socket.socket(socket.AF_UNIX); l.bind(sys.argv[1]); l.listen()\n"
            "print('up', flush=True)\nwhile True:\n    c, _ = l.accept()\n    try:\n        c.recv(65536)\n"
            "        c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}')\n"
            "    except OSError:\n        pass\n    c.close()\n")
    server = subprocess.Popen([os.path.realpath(sys.executable), "-c", fake, str(path)], user=NOBODY, group=NOBODY,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert server.stdout is not None and server.stdout.readline() == "up\n"
        with pytest.raises(UntrustedAgentError, match=f"served by uid {NOBODY}, not by the agent's user"):
            AgentClient(path, timeout=5).health()
        assert AgentClient(path, timeout=5, server_uid=NOBODY).health() == {}  # told whom to expect
        token.write_config(f'[daemon]\nsocket = "{path}"\n')
        refused = token.cli("keys", "list")
        assert refused.returncode == ExitStatus.UNAVAILABLE, refused.stderr
        assert f"served by uid {NOBODY}" in refused.stderr, refused.stderr
    finally:
        server.kill()
        server.wait()


def test_serve_refuses_a_mistake_anywhere_before_ready(keyed_token: Token, public_dir: Path) -> None:
    config = keyed_token.write_config(daemon_config(keyed_token, public_dir, "\n[banks.mb]\nissuer = 'https://b'\n"
                                                    "discovery_url = 'https://b/d'\nca_bundle = 'ca.pem'\n"
                                                    "read_timout = 5\n[tokenz]\nclient_id = 'x'\n"))
    result = subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 78, result.stderr
    assert f"error: 2 problems in {config}:" in result.stderr
    assert "unknown section [tokenz]" in result.stderr and "read_timout in [banks.mb]" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reload_that_breaks_the_config_is_refused_and_the_old_one_kept(daemon: Daemon) -> None:
    client = daemon.client()
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\n[banks.mb]\ndiscovery_url = 'https://[x/d'\nissuer = 'https://b'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1", timeout=30)
    assert "reload_failed" in daemon.stderr() and "discovery_url must be an https:// URL" in daemon.stderr()
    assert client.sign("signing", b"still serving the old configuration", "RS256")
    daemon.config_path.write_text(good)


def test_each_key_is_named_one_way_in_the_audit_trail(ops: Daemon) -> None:
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/sign", {"alg": "PS256", "data_b64": "aGk="})[0] == 200
    assert call(ops, NOBODY, "POST", "/v1/keys/signing/jws", {"payload": {"a": 1}})[0] == 200
    records = [r for r in map(json.loads, ops.audit_file.read_text().splitlines()) if "key" in r]
    names = {r["key"] for r in records if "object=signing" in r["key"]}
    assert names == {"pkcs11:token=" + ops.config_path.read_text().split("pkcs11:token=")[1].split('"')[0]}
    assert {r["operation"] for r in records if r["key"] in names} >= {"canary", "sign", "jws"}


def test_the_cli_publishes_no_transport_key(ops: Daemon, keyed_token: Token) -> None:
    for direct in ((), ("--direct",)):
        published = keyed_token.cli(*direct, "--config", str(ops.config_path), "jwks", check=True)
        kids = {k["kid"] for k in json.loads(published.stdout)["keys"]}
        assert len(kids) == 3 and "sig-1" in kids, published.stdout  # signing, ecsign, bare: the jws keys
        refused = keyed_token.cli(*direct, "--config", str(ops.config_path), "jwks", "--key", "transport")
        assert refused.returncode == ExitStatus.NOPERM and "is a tls key: it has no JWK" in refused.stderr
