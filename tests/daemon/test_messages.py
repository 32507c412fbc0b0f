"""Signed and encrypted messages through a running agent's socket and its CLI, against the model bank over mTLS.

The agent (``tpp-agent serve``) signs payment, refund and CoP bodies, encrypts personal data to the bank's
``use: enc`` key, verifies the bank's signed answers and decrypts the bank's events to the TPP's encryption key
on the token. What the agent makes is read back here with jwcrypto and the public keys the agent publishes (its
JWS are made by the agent's own code, not by jwcrypto) and by the model bank (PyJWT; its JWE decryption is
``cryptography`` by hand); what the bank makes is PyJWT and jwcrypto.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws

from agent.client import AgentClient, AgentRequestError
from agent.errors import ExitStatus
from agent.openfinance.discovery import DiscoveryDocument
from agent.runtime import Runtime
from agent.transport.client import open_transport
from agent.transport.tls import TlsSettings
from modelbank import ModelBank
from pkcs11_backends.keys import KeySpec
from tests.daemon.conftest import NOBODY, Daemon, launch, nobody_rule
from tests.daemon.test_policy import as_user
from tests.openfinance.bank_world import REDIRECT_URI, World
from tests.openfinance.conftest import Tpp, issue_identity
from tests.openfinance.test_cli_and_demo import cli

MB = "mb"
SHORT = "mb-short"  # the same bank, its JWKS cached 1 s: the oversized-JWKS case without waiting 5 minutes
PAYMENT = {"InstructedAmount": {"Amount": "100.00", "Currency": "AED"},
           "CreditorAccount": {"SchemeName": "IBAN", "Identification": "AE070331234567890123456"}}


@dataclasses.dataclass
class Setup:
    bank: ModelBank
    daemon: Daemon
    config: Path
    client_id: str
    world: World  # the test's own view of the same TPP (its consent, for an access token)
    encryption_uri: str
    agent_jwks: dict[str, Any]

    @property
    def client(self) -> AgentClient:
        return self.daemon.client()

    def our_key(self, use: str) -> jwcrypto_jwk.JWK:
        """The agent's public key of that use, from the JWKS it publishes (as the bank reads it)."""
        [found] = [k for k in self.agent_jwks["keys"] if k["use"] == use]
        return jwcrypto_jwk.JWK(**{k: found[k] for k in ("kty", "n", "e", "kid")})

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.daemon.audit_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(shared_runtime: Runtime, softhsm_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("messages")
    public = Path(tempfile.mkdtemp(prefix="tpp-agent-test-"))
    public.chmod(0o755)
    with ModelBank(base / "bank") as bank:
        transport_uri, subject, _ = issue_identity(shared_runtime, bank)
        client_id = subject.split("CN=", 1)[1].split(",", 1)[0]
        state = base / "state"
        state.mkdir()
        config = Tpp(shared_runtime, transport_uri, subject, state, softhsm_state).write_config(bank)
        signing = shared_runtime.keys.generate(f"signing-{uuid.uuid4().hex[:10]}", KeySpec.parse("rsa:2048"))
        # The operator makes the decrypt-only key with the CLI.
        made = cli(config, "keys", "generate", "--label", f"events-{uuid.uuid4().hex[:10]}", "--purpose",
                   "encryption", "--json")
        assert made.returncode == 0, made.stderr
        encryption_uri = json.loads(made.stdout)["uri"]
        short = (f'\n[banks.{SHORT}]\ndiscovery_url = "{bank.discovery_url}"\nissuer = "{bank.issuer}"\n'
                 f'ca_bundle = "{bank.ca_bundle}"\nclient_key = "{transport_uri}"\njwks_ttl = 1\n\n')
        config.write_text(
            config.read_text() + short +
            f'[keys.transport]\nuri = "{transport_uri}"\n\n[keys.signing]\nuri = "{signing.uri}"\n\n'
            f'[keys.events]\nuri = "{encryption_uri}"\npurpose = "encryption"\n\n'
            f'[tokens]\nsigning_key = "signing"\nencryption_key = "events"\n\n'
            + nobody_rule(public, state / "audit.jsonl", "webhook", ["receive_event"], banks=[MB]))
        daemon = launch(config, public)
        transport = open_transport(shared_runtime, TlsSettings(bank=MB, ca_bundle=bank.ca_bundle,
                                                               client_key=transport_uri))
        try:
            client = daemon.client()
            client.register(MB)
            agent_jwks = client.jwks()  # what the directory would publish for the application
            bank.tokens.register_client(client_id, agent_jwks)
            fetched = transport.request("GET", bank.discovery_url).json()
            document = DiscoveryDocument(MB, bank.discovery_url, datetime.datetime.now(datetime.UTC), fetched)
            world = World(shared_runtime, bank, transport, document, client_id, transport_uri, str(signing.uri),
                          encryption_uri)
            yield Setup(bank, daemon, config, client_id, world, encryption_uri, agent_jwks)
        finally:
            transport.close()
            daemon.stop()
            daemon.notify.close()
            shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(scope="module")
def access_token(setup: Setup) -> str:
    """A certificate-bound token of an Authorized payment consent (the consent flow is the library's here)."""
    consents = setup.world.consents()
    started = consents.par(scope="payments", redirect_uri=REDIRECT_URI,
                           authorization_details=[{"type": "urn:openfinanceuae:service-initiation-consent:v2.1"}])
    return consents.callback(setup.world.authorize(started)).access_token


@pytest.fixture(autouse=True)
def honest_bank(setup: Setup) -> Iterator[None]:
    yield
    setup.bank.apis.answer_corrupt, setup.bank.apis.answer_key = False, None
    setup.bank.jose.jwks_padding = 0


def read_jws(token: str, key: jwcrypto_jwk.JWK) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, verified by jwcrypto (PS256 only)."""
    checker = jwcrypto_jws.JWS()
    checker.allowed_algs = ["PS256"]
    checker.deserialize(token)
    checker.verify(key, alg="PS256")
    return dict(checker.jose_header), json.loads(checker.payload)


def post_jwt(setup: Setup, path: str, jwt: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    status, answer_headers, body = setup.client.forward(MB, "POST", path, body=jwt.encode("ascii"),
                                                        headers={"Content-Type": "application/jwt", **headers})
    return status, answer_headers, body.decode("ascii")


def refusal(call: Any) -> AgentRequestError:
    with pytest.raises(AgentRequestError) as caught:
        call()
    return caught.value


def test_a_signed_payment_its_signed_answer_a_retry_and_a_refund(setup: Setup, access_token: str) -> None:
    client, issuer = setup.client, setup.bank.issuer
    body = client.signed_body(MB, {"Data": PAYMENT})
    header, claims = read_jws(body, setup.our_key("sig"))
    assert header == {"alg": "PS256", "kid": setup.our_key("sig").get("kid"), "typ": "JWT"}
    assert claims["iss"] == setup.client_id and claims["aud"] == [issuer] and claims["message"] == {"Data": PAYMENT}
    assert 0 < claims["exp"] - claims["iat"] <= 300 and claims["nbf"] <= claims["iat"]
    uuid.UUID(claims["jti"])

    key = f"pay-{uuid.uuid4().hex[:20]}"
    auth = {"Authorization": f"Bearer {access_token}", "x-idempotency-key": key}
    status, headers, answer = post_jwt(setup, "/payments", body, auth)
    assert status == 201 and headers["content-type"] == "application/jwt"
    verified = client.verify(MB, answer)
    assert verified["kid"] == setup.bank.jose.signing.kid and verified["header"]["alg"] == "PS256"
    payment = verified["claims"]["message"]["Data"]
    assert payment["Status"] == "Pending" and payment["Initiation"] == PAYMENT
    assert setup.bank.apis.received[-1]["message"] == {"Data": PAYMENT}  # PyJWT at the bank accepted our JWT

    # A retry: a new JWT (new jti), the caller's idempotency key unchanged: the same payment.
    _, _, again = post_jwt(setup, "/payments", client.signed_body(MB, {"Data": PAYMENT}), auth)
    assert client.verify(MB, again)["claims"]["message"]["Data"]["PaymentId"] == payment["PaymentId"]

    refund = client.signed_body(MB, {"Data": {"Amount": "40.00"}})
    status, _, answer = post_jwt(setup, f"/payments/{payment['PaymentId']}/refunds", refund, auth)
    assert status == 201
    assert client.verify(MB, answer)["claims"]["message"]["Data"]["Status"] == "Pending"
    too_much = client.signed_body(MB, {"Data": {"Amount": "70.00"}})
    status, _, answer = post_jwt(setup, f"/payments/{payment['PaymentId']}/refunds", too_much, auth)
    assert status == 422  # an error answer is signed too
    assert client.verify(MB, answer)["claims"]["message"]["Errors"][0]["Code"] == "invalid_amount"

    # Each signature is a use of the signing key, each verification a record of the bank's key and its outcome.
    records = setup.audit()
    assert [r["operation"] for r in records if r["key"] == setup.world.signing_uri][-4:] == ["signed_body"] * 4
    checks = [r for r in records if r["operation"] == "verify"]
    assert checks[-1]["key"] == f"bank:{MB}#{setup.bank.jose.signing.kid}" and checks[-1]["result"] == "ok"


@pytest.mark.parametrize("key", ["has space", "x" * 41, ""])
def test_a_bad_idempotency_key_is_refused_before_the_bank_sees_it(setup: Setup, key: str) -> None:
    sent = len(setup.bank.requests)
    refused = refusal(lambda: post_jwt(setup, "/payments", "a.b.c", {"x-idempotency-key": key}))
    assert refused.status == 400 and refused.code == "bad_idempotency_key"
    assert "40" in str(refused) and refused.hint
    assert len(setup.bank.requests) == sent


def test_confirmation_of_payee_takes_a_string_audience_from_the_cli(setup: Setup, tmp_path: Path) -> None:
    made = cli(setup.config, "signed-body", MB, "--message", '{"Data": {"Name": "Fatima Al Mansoori"}}',
               "--audience", "string")
    assert made.returncode == 0, made.stderr
    _, claims = read_jws(made.stdout.strip(), setup.our_key("sig"))
    assert claims["aud"] == setup.bank.issuer
    status, _, answer = post_jwt(setup, "/confirmation", made.stdout.strip(), {})
    assert status == 200
    saved = tmp_path / "answer.jwt"
    saved.write_text(answer)
    shown = cli(setup.config, "verify", MB, "--jws", str(saved), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["claims"]["message"]["Data"]["Match"] is True
    bad = cli(setup.config, "signed-body", MB, "--message", '{"Data": 1', "--audience", "string")
    assert bad.returncode == ExitStatus.DATAERR and bad.stderr.startswith("error: --message is not JSON")


def bank_jws(setup: Setup, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": setup.bank.issuer, "aud": setup.client_id, "iat": now, "nbf": now, "exp": now + 300,
              "message": {"Data": {"Match": True}}, **overrides}
    return setup.bank.jose.sign(claims)


@pytest.mark.parametrize("change,code", [
    ({"exp": 1_000_000_000, "iat": 999_999_000, "nbf": 999_999_000}, "expired"),
    ({"nbf": int(time.time()) + 3600}, "not_yet_valid"),
    ({"aud": "another-client"}, "wrong_audience"),
    ({"iss": "https://impostor.example"}, "wrong_issuer"),
])
def test_the_banks_claims_are_checked(setup: Setup, change: dict[str, Any], code: str) -> None:
    refused = refusal(lambda: setup.client.verify(MB, bank_jws(setup, **change)))
    assert refused.status == 400 and refused.code == code


def test_an_answer_without_aud_passes_only_when_the_caller_says_its_api_has_none(setup: Setup) -> None:
    now = int(time.time())
    token = setup.bank.jose.sign({"iss": setup.bank.issuer, "iat": now, "exp": now + 60, "message": {}})
    refused = refusal(lambda: setup.client.verify(MB, token))
    assert refused.code == "claim_rejected" and "'aud' is required" in str(refused)
    assert setup.client.verify(MB, token, audience=False)["claims"]["iss"] == setup.bank.issuer


def test_a_forged_answer_and_a_downgrade_are_refused(setup: Setup, tmp_path: Path) -> None:
    setup.bank.apis.answer_corrupt = True
    body = setup.client.signed_body(MB, {"Data": {"Name": "x"}}, audience="string")
    _, _, forged = post_jwt(setup, "/confirmation", body, {})
    assert refusal(lambda: setup.client.verify(MB, forged)).code == "bad_signature"
    _, payload, _ = bank_jws(setup).split(".")
    none = f"eyJhbGciOiJub25lIn0.{payload}."  # {"alg":"none"}
    assert refusal(lambda: setup.client.verify(MB, none)).code == "algorithm_refused"
    assert refusal(lambda: setup.client.verify(MB, "not a jws")).code == "malformed"
    # From the CLI: one error line, one hint, exit 65, no traceback.
    saved = tmp_path / "forged.jwt"
    saved.write_text(forged)
    shown = cli(setup.config, "verify", MB, "--jws", str(saved))
    assert shown.returncode == ExitStatus.DATAERR, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert len(lines) == 2 and lines[1].startswith("hint:")
    assert lines[0].startswith("error: the bank's JWS: the signature does not verify with the bank's key")
    assert "Traceback" not in shown.stderr


def test_an_unknown_kid_refetches_the_jwks_exactly_once(setup: Setup) -> None:
    jose = setup.bank.jose
    setup.client.verify(MB, bank_jws(setup))  # the set is cached now
    before = jose.jwks_fetches
    unknown = jose.sign({"iss": setup.bank.issuer, "aud": setup.client_id, "exp": int(time.time()) + 60},
                        key=jose.unpublished)
    refused = refusal(lambda: setup.client.verify(MB, unknown))
    assert refused.code == "unknown_kid" and jose.unpublished.kid in str(refused)
    assert jose.jwks_fetches == before + 1
    # More made-up kids right after: no more fetches (at most one refetch per interval).
    for _ in range(3):
        assert refusal(lambda: setup.client.verify(MB, unknown)).code == "unknown_kid"
    assert jose.jwks_fetches == before + 1
    # The bank's encryption key is never a verification key.
    enc = jose.sign({"iss": setup.bank.issuer, "aud": setup.client_id, "exp": int(time.time()) + 60},
                    key=jose.encryption)
    assert refusal(lambda: setup.client.verify(MB, enc)).code == "unknown_kid"


def test_an_oversized_jwks_is_refused_whole(setup: Setup) -> None:
    setup.client.verify(SHORT, bank_jws(setup))
    setup.bank.jose.jwks_padding = 300 * 1024
    time.sleep(1.2)  # [banks.mb-short] jwks_ttl = 1
    refused = refusal(lambda: setup.client.verify(SHORT, bank_jws(setup)))
    assert refused.status == 502 and refused.code == "bank_jwks_unusable" and "at most" in str(refused)
    setup.bank.jose.jwks_padding = 0
    time.sleep(1.2)
    assert setup.client.verify(SHORT, bank_jws(setup))["claims"]["iss"] == setup.bank.issuer


def bank_private_jwk(setup: Setup) -> jwcrypto_jwk.JWK:
    pem = setup.bank.jose.encryption.private.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption())
    return jwcrypto_jwk.JWK.from_pem(pem)


def test_personal_data_is_signed_on_the_token_and_encrypted_to_the_banks_key(setup: Setup) -> None:
    data = {"Initiation": {"CreditorAccount": {"Name": "Fatima Al Mansoori"}}}
    for token in (setup.client.encrypt_personal_data(MB, data),
                  cli(setup.config, "encrypt-personal-data", MB, "--data", json.dumps(data)).stdout.strip()):
        opened = jwcrypto_jwe.JWE()
        opened.allowed_algs = ["RSA-OAEP-256", "A256GCM"]
        opened.deserialize(token, key=bank_private_jwk(setup))  # jwcrypto, with the bank's private key
        assert opened.jose_header == {"alg": "RSA-OAEP-256", "enc": "A256GCM", "cty": "JWT",
                                      "kid": setup.bank.jose.encryption.kid}
        _, inner = setup.bank.jose.decrypt(token)  # and cryptography by hand
        assert inner == opened.payload
        _, claims = read_jws(inner.decode("ascii"), setup.our_key("sig"))
        assert claims["iss"] == claims["sub"] == setup.client_id and claims["aud"] == setup.bank.issuer
        assert {"iat", "exp", "jti"} <= set(claims) and claims["Initiation"] == data["Initiation"]
    refused = refusal(lambda: setup.client.encrypt_personal_data(MB, {"iss": "someone"}))
    assert refused.code == "claims_refused"


def event(setup: Setup, **overrides: Any) -> str:
    claims = setup.bank.events.claims(setup.client_id, "consent-42", **overrides)
    return setup.bank.events.make_for(setup.client_id, claims)


def test_an_event_is_decrypted_on_the_token_verified_and_taken_once(setup: Setup, tmp_path: Path) -> None:
    # The bank found the encryption key in the JWKS the agent publishes, as use: enc (and only there).
    published = setup.bank.tokens.encryption_keys[setup.client_id]
    assert published["alg"] == "RSA-OAEP-256" and published == setup.client.public_jwk("events")
    assert published["use"] == "enc" and {k["use"] for k in setup.agent_jwks["keys"]} == {"sig", "enc"}
    token = event(setup)
    got = setup.client.receive_event(MB, token, "application/jwe")
    assert got["consent_id"] == "consent-42" and got["event_type"] == "Consent.StatusUpdated"
    assert got["message"]["Data"]["Status"] == "Revoked" and got["claims"]["iss"] == setup.bank.issuer
    replayed = refusal(lambda: setup.client.receive_event(MB, token))
    assert replayed.status == 409 and replayed.code == "replayed"
    # The seen jti is in the state store, not in the daemon's memory: the CLI on the token refuses it too.
    saved = tmp_path / "event.jwe"
    saved.write_text(token)
    direct = cli(setup.config, "--direct", "receive-event", MB, "--jwe", str(saved))
    assert direct.returncode == ExitStatus.DATAERR and "already received" in direct.stderr, direct.stderr
    fresh = tmp_path / "fresh.jwe"
    fresh.write_text(event(setup))
    shown = cli(setup.config, "receive-event", MB, "--jwe", str(fresh))
    assert shown.returncode == 0 and "event Consent.StatusUpdated from bank mb: consent consent-42" in shown.stdout
    # Each decryption is a use of the encryption key on the token, for the caller.
    uses = [r for r in setup.audit() if r["algorithm"] == "RSA-OAEP-256"]
    assert uses and {r["operation"] for r in uses} == {"canary", "receive_event"}  # canary: at start
    assert all(r["key"] == setup.encryption_uri for r in uses) and uses[-1]["result"] == "ok"


def test_events_that_must_not_be_taken(setup: Setup) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = jwcrypto_jwk.JWK.from_pyca(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    ours = setup.our_key("enc")
    claims = setup.bank.events.claims(setup.client_id, "consent-42")
    cases = {
        "wrong_recipient": setup.bank.events.make({**json.loads(other.export_public()), "kid": "someone-else"},
                                                  claims),
        "undecryptable": setup.bank.events.make({**json.loads(other.export_public()), "kid": ours.get("kid")},
                                                claims),
        "expired": event(setup, exp=1_000_000_000, nbf=999_999_000),
        "wrong_audience": event(setup, aud=["another-client"]),
        "bad_signature": setup.bank.events.make_for(setup.client_id, claims, corrupt=True),
    }
    for code, token in cases.items():
        refused = refusal(lambda token=token: setup.client.receive_event(MB, token))
        assert refused.status == 400 and refused.code == code, (code, refused)
    # Nothing refused was remembered: the same event, now honest, is taken.
    assert setup.client.receive_event(MB, event(setup, jti=claims["jti"]))["jti"] == claims["jti"]


def test_a_webhook_service_may_receive_events_and_nothing_else(setup: Setup) -> None:
    target = f"/v1/banks/{MB}/events"
    taken = as_user(setup.daemon, NOBODY, NOBODY, "POST", target, json.dumps({"jwe": event(setup)}))
    assert taken["status"] == 200, taken
    for path, body in ((f"/v1/banks/{MB}/signed-body", {"message": {"Data": {}}}),
                       (f"/v1/banks/{MB}/personal-data", {"data": {"a": 1}}),
                       (f"/v1/banks/{MB}/verify", {"jws": bank_jws(setup)})):
        denied = as_user(setup.daemon, NOBODY, NOBODY, "POST", path, json.dumps(body))
        assert denied["status"] == 403, (path, denied)
