"""``--json`` on every command that prints a result, and the global options after the command.

The parser is walked: every command but ``serve`` takes ``--json``, and each is run with it (before the command
or after it, in turn) on the session's SoftHSM2 token against a model bank, and its stdout parsed as one JSON
document. A command added to the CLI without a row in ``RUNS`` fails the first test: give it one.
"""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws
from pkcs11 import Attribute, KeyType

from agent.cli import build_parser
from agent.cli.options import NO_RESULT, commands
from agent.errors import ExitStatus
from agent.runtime import Runtime
from agent.transport.client import BankTransport, open_transport
from agent.transport.tls import TlsSettings
from agent.x509.csr import build_csr
from agent.x509.subject import parse_subject
from modelbank import ModelBank
from modelbank.directory import ModelDirectory
from pkcs11_backends.decryption import generate_encryption_key
from pkcs11_backends.keys import KeySpec
from tests.lifecycle.participants_data import organisation, server
from tests.openfinance.bank_world import REDIRECT_URI
from tests.openfinance.conftest import BANK, Tpp, signing_identity
from tests.openfinance.test_cli_and_demo import cli

CONSENT = [{"type": "urn:openfinanceuae:account-access-consent:v2.1",
            "consent": {"Permissions": ["ReadAccountsBasic"], "ExpirationDateTime": "2027-01-01T00:00:00Z"}}]


@dataclass
class World:
    config: Path
    files: Path
    transport_pem: Path
    signing_label: str
    runtime: Runtime
    bank: ModelBank
    client_id: str
    browser: BankTransport  # the customer's, at the bank's authorization endpoint (mTLS: the model bank asks all)
    directory: ModelDirectory

    def issued(self) -> str:
        """The id of the certificate the model directory made last (`directory certs create` ran before)."""
        return list(self.directory.certificates)[-1]

    def redirect(self) -> str:
        """A consent started with ``par`` and approved at the bank: the redirect URL the browser brings back."""
        started = cli(self.config, "par", BANK, "--scope", "openid accounts", "--redirect-uri", REDIRECT_URI,
                      "--authorization-details", json.dumps(CONSENT), "--json")
        assert started.returncode == 0, started.stderr
        answer = self.browser.request("GET", json.loads(started.stdout)["authorization_url"])
        assert answer.status == 302, answer.body
        return answer.headers["location"]

    def consented(self) -> Path:
        """A file holding the refresh token of a consent completed with ``consent callback``."""
        kept = self.files / f"consent-{uuid.uuid4().hex[:8]}.refresh"
        done = cli(self.config, "consent", "callback", BANK, "--url", self.redirect(), "--refresh-token-file",
                   str(kept))
        assert done.returncode == 0, done.stderr
        return kept

    def event(self) -> Path:
        """A new event JWE from the bank (its jti not seen yet), encrypted to the TPP's published enc key."""
        claims = self.bank.events.claims(self.client_id, "consent-42")
        path = self.files / f"event-{claims['jti']}.jwe"
        path.write_text(self.bank.events.make_for(self.client_id, claims))
        return path


def _successor_certificate(world: World) -> list[str]:
    """The signing key's rotation successor (``rotate start`` made it) certified, as the directory would."""
    csr = build_csr(world.runtime.keys, f"{world.signing_label}.2", parse_subject("CN=json,O=Test TPP,C=AE"))
    path = world.files / "successor.pem"
    path.write_bytes(world.bank.ca.issue_from_csr(csr.pem.encode()))
    return ["signing", str(path)]


def _another_signing_successor(world: World) -> list[str]:
    """A second rotation of the signing key started (the first is retired): `rotate request` sends its CSR to
    the model directory and imports what it issues."""
    assert cli(world.config, "rotate", "start", "signing", "--json").returncode == 0
    return ["signing"]


def _transport_in_overlap(world: World) -> list[str]:
    """A transport rotation up to its overlap, for ``rotate switch-transport``."""
    started = json.loads(cli(world.config, "rotate", "start", "transport", "--json").stdout)
    path = world.files / "transport-successor.pem"
    path.write_bytes(world.bank.ca.issue_from_csr(started["csr"].encode()))
    assert cli(world.config, "rotate", "import", "transport", str(path)).returncode == 0
    return ["transport", "--bank", BANK]


# Each command's arguments (besides --json), and the exit statuses that are results, not failures: these
# commands exit non-zero by design for an answer (needs-renewal: 1 "not due"; banks sync: 1 "they differ").
RUNS: dict[tuple[str, ...], tuple[Callable[[World], list[str]], frozenset[int]]] = {
    ("keys", "generate"): (lambda w: ["--label", f"json-{uuid.uuid4().hex[:8]}", "--type", "ec:p256"],
                           frozenset({0})),
    ("keys", "list"): (lambda w: [], frozenset({0})),
    ("keys", "public"): (lambda w: ["transport"], frozenset({0})),
    ("csr",): (lambda w: ["--key", "transport", "--subject", "CN=json,O=Test TPP,C=AE"], frozenset({0})),
    ("cert", "import"): (lambda w: ["--key", "transport", str(w.transport_pem)], frozenset({0})),
    ("cert", "show"): (lambda w: ["--key", "transport"], frozenset({0})),
    ("doctor",): (lambda w: [], frozenset({0})),
    ("config", "check"): (lambda w: [], frozenset({0})),
    ("discover",): (lambda w: [BANK], frozenset({0})),
    ("register",): (lambda w: [BANK], frozenset({0})),
    ("jwks",): (lambda w: [], frozenset({0})),
    ("sign-jws",): (lambda w: ["--key", "signing", "--payload", str(w.files / "payload.json")], frozenset({0})),
    ("client-assertion",): (lambda w: [BANK], frozenset({0})),
    ("token",): (lambda w: [BANK, "--scope", "accounts"], frozenset({0})),
    ("par",): (lambda w: [BANK, "--scope", "openid accounts", "--redirect-uri", "https://tpp.example/cb"],
               frozenset({0})),
    ("audit", "verify"): (lambda w: [], frozenset({0})),
    ("registrations",): (lambda w: [], frozenset({0})),
    ("certs", "needs-renewal"): (lambda w: ["--key", "transport"], frozenset({0, 1})),
    ("banks", "sync"): (lambda w: ["--participants", str(w.files / "participants.json")], frozenset({0, 1})),
    ("status",): (lambda w: [], frozenset({0})),
    ("consent", "callback"): (lambda w: [BANK, "--url", w.redirect(), "--refresh-token-file",
                                         str(w.files / "consent.refresh")], frozenset({0})),
    ("consent", "refresh"): (lambda w: [BANK, "--refresh-token-file", str(w.consented())], frozenset({0})),
    ("verify",): (lambda w: [BANK, "--jws", str(w.files / "answer.jwt")], frozenset({0})),
    ("signed-body",): (lambda w: [BANK, "--message", str(w.files / "payment.json")], frozenset({0})),
    ("encrypt-personal-data",): (lambda w: [BANK, "--data", '{"Initiation": {"CreditorAccount": {"Name": "F"}}}'],
                                 frozenset({0})),
    ("receive-event",): (lambda w: [BANK, "--jwe", str(w.event())], frozenset({0})),
    ("metrics",): (lambda w: [], frozenset({0})),
    # The import adds a certificate (same subject, same key) to the transport key.
    ("directory", "certs", "list"): (lambda w: [], frozenset({0})),
    ("directory", "certs", "create"): (lambda w: ["--type", "transport", "--csr", str(w.files / "transport.csr")],
                                       frozenset({0})),
    ("directory", "certs", "import"): (lambda w: [w.issued(), "--type", "transport", "--key", "transport"],
                                       frozenset({0})),
    ("directory", "certs", "revoke"): (lambda w: [w.issued(), "--type", "transport", "--reason", "superseded"],
                                       frozenset({0})),
    # A rotation of the signing key, step by step ([rotation] jwks_cache_window = 0), then the transport's switch.
    ("rotate", "status"): (lambda w: [], frozenset({0})),
    ("rotate", "start"): (lambda w: ["signing"], frozenset({0})),
    ("rotate", "import"): (_successor_certificate, frozenset({0})),
    ("rotate", "switch-signing"): (lambda w: ["signing"], frozenset({0})),
    ("rotate", "retire"): (lambda w: ["signing"], frozenset({0})),
    ("rotate", "remove-retired"): (lambda w: ["signing"], frozenset({0})),
    ("rotate", "request"): (_another_signing_successor, frozenset({0})),
    ("rotate", "switch-transport"): (_transport_in_overlap, frozenset({0})),
}


def test_every_command_that_prints_a_result_takes_json_and_has_a_run_here() -> None:
    leaves = dict(commands(build_parser()))
    for words, parser in leaves.items():
        assert ("--json" in parser._option_string_actions) == (words not in NO_RESULT), words
        for option in ("--config", "--direct", "-q", "-v"):
            assert option in parser._option_string_actions, (words, option)
    assert set(RUNS) == set(leaves) - NO_RESULT, "give every command that prints a result a row in RUNS"


@pytest.fixture
def world(tpp: Tpp, bank: ModelBank, tmp_path: Path) -> Iterator[World]:
    """The transport key of ``tpp`` (registered nowhere yet) and a signing key, both with certificates from the
    bank's CA, and an encryption key for the bank's events, configured by alias; the bank knows the JWKS that
    ``tpp-agent jwks`` publishes (the signing key's and the encryption key's), and has signed an answer."""
    transport = tpp.runtime.keys.info(tpp.key_uri).certificate
    assert transport is not None
    identity = signing_identity(tpp, bank)
    events = generate_encryption_key(tpp.runtime.keys, f"events-{uuid.uuid4().hex[:10]}", KeySpec.parse("rsa:2048"))
    config = tpp.write_config(bank)
    config.write_text(config.read_text() + identity.keys_toml(tpp) + textwrap.dedent(f"""
        [keys.events]
        uri = "{events.uri}"
        purpose = "encryption"

        [tokens]
        encryption_key = "events"

        [daemon]
        audit_file = "{tpp.state_dir / 'audit.jsonl'}"
        socket = "{tmp_path / 'no-agent' / 'agent.sock'}"

        [rotation]
        jwks_cache_window = 0
        """))
    files = tmp_path / "files"
    files.mkdir()
    (files / "payload.json").write_text('{"hello": "bank"}')
    (files / "payment.json").write_text('{"Data": {"InstructedAmount": {"Amount": "100.00", "Currency": "AED"}}}')
    now = int(time.time())
    (files / "answer.jwt").write_text(bank.jose.sign({
        "iss": bank.issuer, "aud": identity.client_id, "iat": now, "nbf": now, "exp": now + 600,
        "message": {"Data": {"Match": True}}}))
    published = cli(config, "jwks", "--json")
    assert published.returncode == 0, published.stderr
    bank.tokens.register_client(identity.client_id, json.loads(published.stdout))
    (files / "participants.json").write_text(json.dumps([organisation("org-mb", "Model Bank PJSC", [
        {**server("Model Bank", bank.issuer, "as-mb"), "OpenIDDiscoveryDocument": bank.discovery_url}])]))
    transport_pem = files / "transport.pem"
    transport_cert = x509.load_der_x509_certificate(transport.der)
    transport_pem.write_bytes(transport_cert.public_bytes(Encoding.PEM))
    (files / "transport.csr").write_text(build_csr(tpp.runtime.keys, tpp.key_uri, transport.parsed.subject).pem)
    transport_cn = str(transport_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    browser = open_transport(tpp.runtime, TlsSettings(bank=BANK, ca_bundle=bank.ca_bundle, client_key=tpp.key_uri))
    try:
        with ModelDirectory(tmp_path / "directory", bank.ca, organisation_id="org-0001",
                            software_statement_id="ss-0001", client_id=transport_cn) as directory:
            config.write_text(config.read_text() + textwrap.dedent(f"""
                [directory]
                token_endpoint = "{directory.token_endpoint}"
                api_url = "{directory.url}"
                organisation_id = "org-0001"
                software_statement_id = "ss-0001"
                client_id = "{transport_cn}"
                ca_bundle = "{bank.ca.cert_file}"
                client_key = "transport"
                """))
            yield World(config, files, transport_pem, identity.key.label, tpp.runtime, bank, identity.client_id,
                        browser, directory)
    finally:
        browser.close()


def test_each_command_prints_one_json_document_with_json_before_or_after_it(world: World) -> None:
    for number, (words, (arguments, results)) in enumerate(RUNS.items()):
        before = number % 2 == 0
        argv = ["--json", *words, *arguments(world)] if before else [*words, *arguments(world), "--json"]
        done = cli(world.config, *argv)
        assert done.returncode in results, (argv, done.returncode, done.stderr)
        try:
            parsed = json.loads(done.stdout)
        except ValueError as exc:
            raise AssertionError(f"tpp-agent {' '.join(argv)} printed no JSON document: {exc}\n{done.stdout}") from exc
        assert isinstance(parsed, dict | list) and parsed, (argv, done.stdout)
        assert "Traceback" not in done.stderr, (argv, done.stderr)


def test_the_results_say_what_a_user_checks(world: World, bank: ModelBank) -> None:
    status = json.loads(cli(world.config, "status", "--json").stdout)
    assert status["agent"]["running"] is False and status["keys"]["via"] == "token"
    by_alias = {key["alias"]: key for key in status["keys"]["keys"]}
    assert by_alias["transport"]["purpose"] == "tls" and by_alias["signing"]["purpose"] == "jws"
    assert 390 < by_alias["transport"]["certificate"]["days_left"] <= 397  # 13 months from the bank's CA
    assert [b["bank"] for b in status["banks"]["banks"]] == [BANK] and status["pool"]["state"] == "ready"

    public = json.loads(cli(world.config, "keys", "public", "signing", "--json").stdout)
    assert public["pem"].startswith("-----BEGIN PUBLIC KEY-----")
    csr = json.loads(cli(world.config, "csr", "--key", "signing", "--subject", "CN=a,C=AE", "--json").stdout)
    assert csr["subject"] == "CN=a,C=AE" and csr["pem"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    again = json.loads(cli(world.config, "cert", "import", "--key", "transport", str(world.transport_pem),
                           "--json").stdout)
    assert again["already_present"] is True and again["certificate"]["days_left"] > 390
    checked = json.loads(cli(world.config, "config", "check", "--json").stdout)
    assert checked == {"file": str(world.config), "ok": True, "exit_status": 0, "problems": []}


def read_back(token: str, keys: jwcrypto_jwk.JWKSet) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS the agent made, verified by jwcrypto with the JWKS the agent publishes."""
    checked = jwcrypto_jws.JWS()
    checked.allowed_algs = ["PS256"]
    checked.deserialize(token)
    checked.verify(keys.get_key(checked.jose_header["kid"]), alg="PS256")
    return dict(checked.jose_header), json.loads(checked.payload)


def test_the_consent_and_message_results_say_what_a_user_checks(world: World, bank: ModelBank) -> None:
    assert cli(world.config, "register", BANK).returncode == 0  # the bank's token and PAR endpoints want it
    kept, redirect = world.files / "kept.refresh", world.redirect()
    # A file that cannot be written is refused before the bank is asked: the redirect still completes after.
    refused = cli(world.config, "consent", "callback", BANK, "--url", redirect, "--refresh-token-file",
                  str(world.files), "--json")
    assert refused.returncode == ExitStatus.DATAERR and refused.stdout == ""
    assert f"error: --refresh-token-file: {world.files} is a directory" in refused.stderr
    done = cli(world.config, "consent", "callback", BANK, "--url", redirect, "--refresh-token-file", str(kept),
               "--json")
    assert done.returncode == 0, done.stderr
    tokens = json.loads(done.stdout)
    first = kept.read_text().strip()
    assert "access_token" not in tokens and "refresh_token" not in tokens and first not in done.stdout
    assert tokens["bank"] == BANK and tokens["token_type"] == "Bearer" and tokens["expires_in"] == 300
    assert tokens["refresh_token_file"] == str(kept) and kept.stat().st_mode & 0o777 == 0o600
    consent = tokens["authorization_details"][0]["consent"]
    assert consent["Status"] == "Authorized" and consent["Permissions"] == ["ReadAccountsBasic"]
    claims = tokens["id_token_claims"]
    assert claims["iss"] == bank.issuer and world.client_id in claims["aud"] and claims["nonce"]
    refreshed = cli(world.config, "consent", "refresh", BANK, "--refresh-token-file", str(kept), "--json")
    assert refreshed.returncode == 0, refreshed.stderr
    again = json.loads(refreshed.stdout)
    assert again["rotated"] is True and "refresh_token" not in again and "access_token" not in again
    assert kept.read_text().strip() not in ("", first) and again["refresh_token_file"] == str(kept)
    shown = json.loads(cli(world.config, "consent", "callback", BANK, "--url", world.redirect(), "--show-tokens",
                           "--json").stdout)  # asked for: the tokens, and they are the bank's
    issued = bank.tokens.issued[shown["access_token"]]
    assert issued.consent_id == shown["authorization_details"][0]["consent"]["ConsentId"] and shown["refresh_token"]

    verified = json.loads(cli(world.config, "verify", BANK, "--jws", str(world.files / "answer.jwt"), "--json").stdout)
    assert verified["kid"] == bank.jose.signing.kid and verified["bank"] == BANK
    assert verified["header"]["alg"] == "PS256" and verified["header"]["kid"] == bank.jose.signing.kid
    assert verified["claims"]["iss"] == bank.issuer and verified["claims"]["message"] == {"Data": {"Match": True}}

    published = jwcrypto_jwk.JWKSet.from_json(cli(world.config, "jwks", "--json").stdout)
    body = json.loads(cli(world.config, "signed-body", BANK, "--message", str(world.files / "payment.json"),
                          "--json").stdout)
    assert body["content_type"] == "application/jwt" and body["bank"] == BANK
    header, signed = read_back(body["jwt"], published)
    assert header["kid"] == body["kid"] and signed["iss"] == world.client_id and signed["aud"] == [bank.issuer]
    assert signed["message"] == json.loads((world.files / "payment.json").read_text())

    data = {"Initiation": {"CreditorAccount": {"Name": "Fatima Al Mansoori"}}}
    personal = json.loads(cli(world.config, "encrypt-personal-data", BANK, "--data", json.dumps(data),
                              "--json").stdout)
    assert personal["recipient_kid"] == bank.jose.encryption.kid
    outer, inner = bank.jose.decrypt(personal["jwe"])  # the bank opens it with its private key
    assert outer["cty"] == "JWT"
    header, signed = read_back(inner.decode("ascii"), published)
    assert header["kid"] == personal["kid"] and signed["Initiation"] == data["Initiation"]
    assert signed["iss"] == signed["sub"] == world.client_id and signed["aud"] == bank.issuer

    delivered = world.event()
    received = cli(world.config, "receive-event", BANK, "--jwe", str(delivered), "--json")
    assert received.returncode == 0, received.stderr
    event = json.loads(received.stdout)
    assert event["event_type"] == "Consent.StatusUpdated" and event["consent_id"] == "consent-42"
    assert event["message"]["Data"]["Status"] == "Revoked" and event["claims"]["iss"] == bank.issuer
    assert event["jti"] == event["claims"]["jti"] and event["bank"] == BANK
    replayed = cli(world.config, "receive-event", BANK, "--jwe", str(delivered), "--json")
    assert replayed.returncode == ExitStatus.DATAERR and replayed.stdout == "", replayed.stdout
    assert "already received" in replayed.stderr and "Traceback" not in replayed.stderr


def test_global_options_work_after_the_command(world: World, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(world.config.read_text())
    missing = tmp_path / "missing.toml"
    after = cli(missing, "keys", "list", "--config", str(elsewhere), "-q", "--direct")
    before = cli(missing, "--config", str(elsewhere), "-q", "--direct", "keys", "list")
    assert after.returncode == before.returncode == 0, after.stderr
    assert after.stdout == before.stdout and "transport" in after.stdout
    assert after.stderr == before.stderr == ""  # -q after the command too
    verbose = cli(world.config, "keys", "list", "-v")
    assert verbose.returncode == 0
    # Before the command and after it disagree: the one after it wins, as for any option of the command.
    assert cli(elsewhere, "--config", str(missing), "keys", "list", "--config", str(elsewhere)).returncode == 0
    refused = cli(world.config, "serve", "--json")
    assert refused.returncode == ExitStatus.USAGE and "unrecognized arguments: --json" in refused.stderr
    refused = cli(world.config, "--json", "serve")
    assert refused.returncode == ExitStatus.USAGE and "serve prints no result" in refused.stderr


def test_a_key_is_named_by_its_token_label(world: World) -> None:
    """`keys generate --label X` then `csr --key X`: no alias, no URI needed."""
    label = f"plain-{uuid.uuid4().hex[:8]}"
    assert cli(world.config, "keys", "generate", "--label", label).returncode == 0
    made = cli(world.config, "csr", "--key", label, "--subject", "CN=plain,C=AE")
    assert made.returncode == 0 and made.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----"), made.stderr
    assert cli(world.config, "keys", "public", label).stdout.startswith("-----BEGIN PUBLIC KEY-----")
    # A configured key's label names the configured key (its purpose applies): sign-jws by the signing key's label.
    signed = cli(world.config, "sign-jws", "--key", world.signing_label, "--payload", str(world.files / "payload.json"))
    assert signed.returncode == 0 and signed.stdout.count(".") == 2, signed.stderr
    refused = cli(world.config, "sign-jws", "--key", label, "--payload", str(world.files / "payload.json"))
    assert refused.returncode == ExitStatus.NOINPUT and f"no key {label!r} is configured" in refused.stderr
    # Two keys of one label (`keys generate` refuses to make them: another tool did): which one is not guessed.
    with world.runtime.pool.session() as pooled:
        pooled.session.generate_keypair(KeyType.RSA, 2048, label=label, id=b"other", store=True)
    twice = cli(world.config, "csr", "--key", label, "--subject", "CN=plain,C=AE")
    assert twice.returncode == ExitStatus.DATAERR and f"2 keys on the token are labelled {label!r}" in twice.stderr
    assert "pkcs11: URI with its id" in twice.stderr
    unknown = cli(world.config, "csr", "--key", "no-such-label", "--subject", "CN=x,C=AE")
    assert unknown.returncode == ExitStatus.NOINPUT and "the label of a key on the token" in unknown.stderr
    # pkcs11: URIs keep working.
    uri = json.loads(cli(world.config, "keys", "list", "--json").stdout)[0]["uri"]
    assert cli(world.config, "keys", "public", uri).returncode == 0
    with world.runtime.pool.session() as pooled:  # the session's token is shared: leave no twin labels on it
        for obj in list(pooled.session.get_objects({Attribute.LABEL: label})):
            obj.destroy()
