"""Access tokens and PAR end to end: token keys, the agent's mTLS transport, the strict model bank.

The TPP's transport and signing certificates come from the model bank's CA (standing in for the directory)
through CSRs signed on the token; the bank learns the signing key from the agent's own JWKS export.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent import config as config_module
from agent.jose import jwks
from agent.openfinance import tokens as tokens_module
from agent.openfinance.tokens import TokenClient, TokenError
from agent.runtime import Runtime
from agent.transport.client import BankTransport, open_transport
from agent.transport.tls import TlsSettings
from agent.x509.certificates import import_certificate
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank import ModelBank
from pkcs11_backends.keys import KeySpec
from pkcs11_backends.module import Module
from pkcs11_backends.provisioning import init_token
from tests.conftest import Token
from tests.jose.conftest import CLIENT_ID

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
KEYS = ("transport", "signing", "other-transport")


class Metadata:
    """The bank's discovery document, fetched once over the agent's transport."""

    def __init__(self, transport: BankTransport, url: str) -> None:
        self.document: dict[str, Any] = transport.request("GET", url).json()

    @property
    def issuer(self) -> str:
        return str(self.document["issuer"])

    def endpoint(self, name: str, use_mtls_aliases: bool) -> str:
        source = self.document["mtls_endpoint_aliases"] if use_mtls_aliases else self.document
        return str(source[name])


@dataclass
class World:
    runtime: Runtime
    bank: ModelBank
    transport: BankTransport
    metadata: Metadata

    def client(self, **kwargs: Any) -> TokenClient:
        return TokenClient(self.runtime.keys, self.runtime.config, "modelbank", self.transport,
                           metadata=lambda: self.metadata, client_id=CLIENT_ID, **kwargs)

    def open(self, key: str) -> BankTransport:
        return open_transport(self.runtime, TlsSettings(bank="modelbank", ca_bundle=self.bank.ca_bundle,
                                                        client_key=key))

    def post_token(self, form: dict[str, str], transport: BankTransport | None = None) -> tuple[int, dict[str, Any]]:
        response = (transport or self.transport).request(
            "POST", self.metadata.endpoint("token_endpoint", False), body=urllib.parse.urlencode(form).encode(),
            headers=FORM)
        return response.status, response.json()


@pytest.fixture(scope="module")
def world(softhsm_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    label = f"tokens-{os.getpid()}"
    pins = softhsm_state / "softhsm"
    init_token(Module.load(config_module.default_module()), label,
               (pins / "so.pin").read_bytes().strip(), (pins / "user.pin").read_bytes().strip())
    token = Token(softhsm_state, label, tmp_path_factory.mktemp("tokens") / "config.toml")
    token.write_config("".join(f'[keys.{k}]\nuri = "pkcs11:token={label};object={k};type=private"\n' for k in KEYS)
                       + "[tokens]\nrefresh_margin = 30\n")
    runtime = Runtime(token.config())
    with ModelBank(tmp_path_factory.mktemp("modelbank")) as bank:
        subject = directory_subject("Example TPP LLC", "org-1", CLIENT_ID)
        for key in KEYS:
            runtime.keys.generate(key, KeySpec.parse("rsa:2048"))
            pem = bank.ca.issue_from_csr(build_csr(runtime.keys, key, subject).pem.encode())
            import_certificate(runtime.keys, key, pem, f"{key}.pem")
        transport = open_transport(runtime, TlsSettings(bank="modelbank", ca_bundle=bank.ca_bundle,
                                                        client_key="transport"))
        registered = transport.request("POST", bank.url + "/tpp-registration", body=b"{}",
                                       headers={"Content-Type": "application/json"})
        assert registered.ok
        bank.tokens.register_client(CLIENT_ID, jwks(runtime.keys, runtime.config, ["signing"]))
        yield World(runtime, bank, transport, Metadata(transport, bank.discovery_url))
        transport.close()
    runtime.close()


def thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def test_certificate_bound_token_over_mtls(world: World) -> None:
    token = world.client().token("accounts")
    assert token.scope == "accounts" and token.token_type == "Bearer" and 290 <= token.expires_in() <= 300
    issued = world.bank.tokens.issued[token.access_token]
    transport_cert = world.runtime.keys.info("transport").certificate
    assert transport_cert is not None
    assert issued.client_id == CLIENT_ID and issued.cnf_x5t_s256 == thumbprint(transport_cert.der)
    bearer = {"Authorization": f"Bearer {token.access_token}"}
    accounts = world.transport.request("GET", world.bank.url + "/accounts", headers=bearer)
    assert accounts.status == 200 and accounts.json()["client_id"] == CLIENT_ID
    # Same client, same CN, another certificate: the bound token is refused there.
    with world.open("other-transport") as other:
        stolen = other.request("GET", world.bank.url + "/accounts", headers=bearer)
    assert stolen.status == 401 and "bound to another client certificate" in stolen.json()["error_description"]
    assert "x5c" not in json.dumps(token.as_dict())  # the caller gets the token, nothing about keys


def test_mtls_endpoint_alias_is_used_when_configured(world: World) -> None:
    world.client(use_mtls_aliases=True).token("payments")
    assert world.bank.requests[-1][1] == "/mtls/token"


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_token_cached_per_scope_until_shortly_before_expiry(world: World) -> None:
    clock = Clock()
    client = world.client(clock=clock)
    first = client.token("accounts openid")
    assert client.token("openid  accounts openid") is first  # same scopes, other spelling
    other_scope = client.token("payments")
    assert other_scope.access_token != first.access_token and client.requests == 2
    clock.offset = 300 - 31  # 31 s left: still more than refresh_margin (30 s)
    assert client.token("accounts openid") is first and client.requests == 2
    clock.offset = 300 - 29
    renewed = client.token("accounts openid")
    assert renewed.access_token != first.access_token and client.requests == 3


def test_concurrent_callers_share_one_token_request(world: World) -> None:
    client = world.client()
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(client.token("accounts").access_token)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 8 and client.requests == 1


def test_short_lived_tokens_are_refreshed_at_half_life(world: World) -> None:
    world.bank.tokens.token_lifetime = 20
    try:
        clock = Clock()
        client = world.client(clock=clock)
        first = client.token("accounts")
        clock.offset = 11  # past half of 20 s; the 30 s margin would be longer than the token's life
        assert client.token("accounts").access_token != first.access_token
    finally:
        world.bank.tokens.token_lifetime = 300


def test_replayed_assertion_is_refused_by_the_bank(world: World) -> None:
    assertion = world.client().client_assertion()
    form = {"grant_type": "client_credentials", "scope": "accounts", "client_id": CLIENT_ID,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    assert world.post_token(form)[0] == 200
    status, answer = world.post_token(form)
    assert status == 401 and answer["error"] == "invalid_client" and "replayed" in answer["error_description"]


def _software_client(world: World) -> tuple[rsa.RSAPrivateKey, str]:
    """A software key registered beside the token key, to hand-craft assertions the agent never makes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "crafted", "use": "sig"}
    token_keys = jwks(world.runtime.keys, world.runtime.config, ["signing"])["keys"]
    world.bank.tokens.register_client(CLIENT_ID, {"keys": [*token_keys, jwk]})
    return key, "crafted"


@pytest.mark.parametrize("change,alg,message", [
    ({}, "RS256", "alg must be PS256"),
    ({"exp_delta": 301}, "PS256", "lifetime (exp - iat) exceeds 300 s"),
    ({"iat_delta": 60}, "PS256", "not yet valid"),
    ({"aud": "https://other-bank.example"}, "PS256", "Audience doesn't match"),
    ({"sub": "someone-else"}, "PS256", "sub must equal iss"),
    ({"exp_delta": -100, "iat_delta": -200}, "PS256", "expired"),
])
def test_bank_refuses_assertions_that_break_the_rules(world: World, change: dict[str, Any], alg: str,
                                                      message: str) -> None:
    key, kid = _software_client(world)
    now = int(time.time()) + change.get("iat_delta", 0)
    claims = {"iss": CLIENT_ID, "sub": change.get("sub", CLIENT_ID), "aud": change.get("aud", world.bank.issuer),
              "iat": now, "exp": now + change.get("exp_delta", 120), "jti": os.urandom(8).hex()}
    form = {"grant_type": "client_credentials", "scope": "accounts",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})}
    status, answer = world.post_token(form)
    assert status == 401 and message in answer["error_description"]


def test_bank_rejection_is_a_clear_agent_error(world: World) -> None:
    world.bank.tokens.register_client(CLIENT_ID, {"keys": []})  # the directory does not know our kid
    try:
        with pytest.raises(TokenError, match=r"refused the token request: HTTP 401: invalid_client: client "
                                             r"assertion: kid .* is not in the client's JWKS") as refused:
            world.client().token("accounts")
        assert "signing key's kid is in the directory's JWKS" in refused.value.hint
    finally:
        world.bank.tokens.register_client(CLIENT_ID, jwks(world.runtime.keys, world.runtime.config, ["signing"]))


def test_unregistered_certificate_is_refused(world: World) -> None:
    with world.open("other-transport") as other:
        client = TokenClient(world.runtime.keys, world.runtime.config, "modelbank", other,
                             metadata=lambda: world.metadata, client_id=CLIENT_ID)
        with pytest.raises(TokenError, match="never registered"):
            client.token("accounts")


def test_pushed_authorization_request(world: World) -> None:
    details = [{"type": "urn:openfinanceuae:account-access-consent:v1.2", "consent": {"Permissions": ["ReadBalances"]}}]
    pushed = world.client().push_authorization(scope="openid accounts", redirect_uri="https://tpp.example/cb",
                                               authorization_details=details)
    assert pushed.request_uri.startswith("urn:ietf:params:oauth:request_uri:") and pushed.expires_in == 60
    seen = world.bank.tokens.pushed[pushed.request_uri].claims
    challenge = base64.urlsafe_b64encode(hashlib.sha256(pushed.code_verifier.encode()).digest()).rstrip(b"=")
    assert seen["code_challenge"] == challenge.decode() and seen["state"] == pushed.state
    assert seen["authorization_details"] == details and seen["aud"] == world.bank.issuer


def test_the_token_cache_and_its_locks_stay_bounded_whatever_scopes_callers_choose(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "MAX_CACHED_SCOPES", 3)
    client = world.client()
    for n in range(6):
        client.token(f"scope-{n}")
    assert list(client._cache) == ["scope-3", "scope-4", "scope-5"]  # the least recently used went first
    assert len(client._locks) == 0  # a scope's lock lives only while a request for it is under way
    client.token("scope-3")  # still cached: no request to the bank
    assert client.requests == 6
    with pytest.raises(TokenError, match="more than the 1024 allowed"):
        client.token("a" * 1025)
    assert client.requests == 6
