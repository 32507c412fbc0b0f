"""Tokens, PAR, JWS and JWKS through the daemon's socket against the strict model bank, and the CLI both ways.

The TPP has a transport key and a separate signing key on the session's token, both with certificates from the
model bank's CA (standing in for the directory); the bank knows the signing key from the agent's own JWKS.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from agent import jose
from agent.client import AgentClient, AgentRequestError
from modelbank import ModelBank
from tests.daemon.conftest import NOBODY, Daemon, launch, nobody_rule
from tests.daemon.test_policy import as_user
from tests.openfinance.conftest import Tpp, bank, signing_identity, tpp  # noqa: F401 -- fixtures
from tests.openfinance.test_cli_and_demo import cli

MB = "mb"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Setup:
    daemon: Daemon
    bank: ModelBank
    config: Path
    client_id: str
    transport_cert: bytes

    def client(self) -> AgentClient:
        return self.daemon.client()


def configure_tpp(party: Tpp, lfi: ModelBank, public_dir: Path, rule: str, operations: list[str],
                  keys: list[str] | None = None) -> tuple[Path, str, bytes]:
    """A separate signing key (certified by the bank's CA, known to the bank) next to the transport key, a
    configuration naming both and one rule for ``nobody`` at ``mb``; (config, client_id, transport cert DER)."""
    transport = party.runtime.keys.info(party.key_uri).certificate
    assert transport is not None
    identity = signing_identity(party, lfi)
    config = party.write_config(lfi)
    config.write_text(config.read_text() + identity.keys_toml(party) + nobody_rule(
        public_dir, party.state_dir / "audit.jsonl", rule, operations, keys=keys, banks=[MB]))
    return config, identity.client_id, transport.der


@pytest.fixture
def setup(tpp: Tpp, bank: ModelBank, public_dir: Path) -> Iterator[Setup]:  # noqa: F811
    config, client_id, transport = configure_tpp(tpp, bank, public_dir, "nobody-signs", ["jws", "public", "forward"],
                                                 keys=["signing"])
    daemon = launch(config, public_dir)
    daemon.client().register(MB)  # the bank gives tokens to registered certificates only
    yield Setup(daemon, bank, config, client_id, transport)
    daemon.stop()
    daemon.notify.close()


def test_token_over_the_socket_works_at_the_bank_over_mtls(setup: Setup) -> None:
    client = setup.client()
    token = client.token(MB, "accounts")
    assert token["token_type"] == "Bearer" and token["scope"] == "accounts" and 290 <= token["expires_in"] <= 300
    issued = setup.bank.tokens.issued[token["access_token"]]
    assert issued.client_id == setup.client_id
    assert issued.cnf_x5t_s256 == jose.keys.cert_thumbprint(setup.transport_cert)

    # The daemon's forward call carries the same transport certificate: the bound token is accepted.
    status, _, body = client.forward(MB, "GET", "/accounts", {"Authorization": f"Bearer {token['access_token']}"})
    assert status == 200 and json.loads(body)["client_id"] == setup.client_id

    # Raw HTTP over the socket (curl) gets the cached token: one request reached the bank.
    raw = subprocess.run(["curl", "-sS", "--unix-socket", str(setup.daemon.socket_path), "-X", "POST",
                          "-H", "Content-Type: application/json", "-d", '{"scope": "accounts"}',
                          f"http://agent/v1/banks/{MB}/token"], capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(raw.stdout)["access_token"] == token["access_token"]
    assert len(setup.bank.tokens.issued) == 1

    # The one fetch left two audit records: the assertion signed with the signing key, and the POST to the token
    # endpoint made with the transport key; the cached answer used no key. The token reached neither the audit
    # trail nor the log.
    records = [json.loads(line) for line in setup.daemon.audit_file.read_text().splitlines()]
    token_uses = [r for r in records if r["operation"] == "token"]
    assert [r["algorithm"] for r in token_uses] == ["PS256", "tls-client-auth"]
    assert token_uses[1]["result"] == f"http 200 from {setup.bank.issuer}"
    assert token_uses[1]["key"].startswith("pkcs11:")
    for text in (setup.daemon.audit_file.read_text(), setup.daemon.stderr()):
        assert token["access_token"] not in text
    assert '"operation": "token"' in setup.daemon.stderr() or '"operation":"token"' in setup.daemon.stderr()


def test_replayed_assertion_from_the_socket_is_refused_by_the_bank(setup: Setup) -> None:
    client = setup.client()
    made = client.client_assertion(MB)
    assert made["client_assertion_type"] == ASSERTION_TYPE and made["client_id"] == setup.client_id
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "accounts",
                                   "client_assertion_type": ASSERTION_TYPE,
                                   "client_assertion": made["client_assertion"]}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    first = client.forward(MB, "POST", "/token", headers, form)
    again = client.forward(MB, "POST", "/token", headers, form)
    assert first[0] == 200
    assert again[0] == 401 and "replayed" in json.loads(again[2])["error_description"]


def test_jws_from_the_socket_verifies_against_the_jwks_from_the_socket(setup: Setup) -> None:
    client = setup.client()
    keyset = jwt.PyJWKSet.from_dict(client.jwks())
    # The transport key is for TLS only: it is in no JWK Set, and has no JWK.
    assert {k.key_id for k in keyset.keys} == {client.public_jwk("signing")["kid"]}
    with pytest.raises(AgentRequestError) as no_jwk:
        client.public_jwk("transport")
    assert no_jwk.value.status == 403 and no_jwk.value.code == "key_purpose"
    signed = client.jws("signing", b'{"amount":"10.00"}', "PS256", {"typ": "JOSE"})
    header = jwt.get_unverified_header(signed)
    assert header == {"alg": "PS256", "kid": client.public_jwk("signing")["kid"], "typ": "JOSE"}
    assert jwt.api_jws.decode(signed, keyset[header["kid"]].key, algorithms=["PS256"]) == b'{"amount":"10.00"}'
    with pytest.raises(AgentRequestError) as refused:
        client.jws("signing", b"{}", "RS256")
    assert refused.value.status == 403 and refused.value.code == "algorithm_not_allowed"
    records = [json.loads(line) for line in setup.daemon.audit_file.read_text().splitlines()]
    assert records[-1]["operation"] == "jws" and records[-1]["algorithm"] == "PS256"


def test_par_over_the_socket(setup: Setup) -> None:
    pushed = setup.client().par(MB, "openid accounts", "https://tpp.example/cb",
                                authorization_details=[{"type": "urn:openfinanceuae:account-access-consent:v1.2"}])
    seen = setup.bank.tokens.pushed[pushed["request_uri"]].claims
    assert seen["state"] == pushed["state"] and pushed["expires_in"] == 60
    assert "code_verifier" not in pushed and "nonce" not in pushed  # the agent keeps them


def test_policy_without_the_token_operation_is_403_naming_the_rule(setup: Setup) -> None:
    denied = as_user(setup.daemon, NOBODY, NOBODY, "POST", f"/v1/banks/{MB}/token", '{"scope": "accounts"}')
    answer = json.loads(str(denied["body"]))
    assert denied["status"] == 403 and answer["code"] == "forbidden"
    assert "may not token at bank 'mb'" in answer["message"]
    assert "rules for this user: nobody-signs" in answer["message"]
    assert 'operations = ["token"]' in answer["hint"]
    allowed = as_user(setup.daemon, NOBODY, NOBODY, "POST", "/v1/keys/signing/jws", '{"payload": {"a": 1}}')
    assert allowed["status"] == 200


def _same(text: str) -> str:
    """Output with what legitimately differs between two runs masked: lifetimes, ages, interaction ids."""
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "ID", text)
    return re.sub(r"\b\d+ s\b", "N s", text)


def test_cli_through_the_daemon_prints_what_the_direct_path_prints(setup: Setup) -> None:
    commands = [("jwks",), ("keys", "public", "signing"), ("discover", MB), ("discover", MB, "--json"),
                ("token", MB, "--scope", "accounts"), ("sign-jws", "--key", "signing", "--payload", "/dev/null")]
    for command in commands:
        through = cli(setup.config, *command)
        direct = cli(setup.config, "--direct", *command)
        assert through.returncode == 0 and direct.returncode == 0, (command, through.stderr, direct.stderr)
        assert "through_agent" in through.stderr and "through_agent" not in direct.stderr
        if command[0] == "sign-jws":  # PS256 is randomised: same header and payload, both verify
            assert through.stdout.split(".")[:2] == direct.stdout.split(".")[:2]
        else:
            assert _same(through.stdout) == _same(direct.stdout), command
    # The agent lists the configured keys (the shared token holds other tests' keys too).
    through_rows = cli(setup.config, "keys", "list").stdout.splitlines()
    direct_rows = cli(setup.config, "--direct", "keys", "list").stdout.splitlines()
    assert through_rows[0] == direct_rows[0] and len(through_rows) == 3 and set(through_rows) <= set(direct_rows)
