"""A rotation of the encryption key (the one banks encrypt events to) through a running agent and its CLI, with a
model bank encrypting real events (jwcrypto) to the keys the agent's JWKS publishes: both decrypt in the overlap,
each with the key its kid names and each decryption audited with that key; after the switch (retire) the JWKS
carries the successor only and the retired key still decrypts; it is removed only after the drain window."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from agent import config as config_module
from agent.client import AgentRequestError
from agent.jose.keys import public_jwk
from agent.runtime import Runtime
from modelbank import ModelBank
from pkcs11_backends.decryption import generate_encryption_key
from pkcs11_backends.keys import KeySpec
from pkcs11_backends.uri import Pkcs11Uri
from tests.daemon.conftest import TPP_AGENT, Daemon, launch, public_dir  # noqa: F401 -- a fixture
from tests.openfinance.bank_world import make_identity

WINDOW = 2.0  # [rotation] jwks_cache_window, seconds
DRAIN = 4.0  # [rotation] encryption_drain_window, seconds


@dataclasses.dataclass
class Tpp:
    runtime: Runtime
    bank: ModelBank
    client_id: str
    encryption_label: str
    config: Path
    audit: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TPP_AGENT, *args], capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "TPP_AGENT_CONFIG": str(self.config)})

    def event(self, recipient: dict[str, Any], **claims: Any) -> str:
        """What the bank's hub POSTs: a signed event encrypted to ``recipient`` (a JWK of the agent's JWKS)."""
        return self.bank.events.make(recipient, self.bank.events.claims(self.client_id, "consent-7", **claims))

    def label_jwk(self, label: str) -> dict[str, str]:
        uri = f"pkcs11:token={self.runtime.config.pkcs11.token};object={label};type=private"
        return public_jwk(self.runtime.keys.public_key_info(uri))


def _label(uri: str) -> str:
    label = Pkcs11Uri.parse(uri).object
    assert label is not None
    return label


@pytest.fixture
def tpp(shared_runtime: Runtime, softhsm_state: Path, tmp_path: Path, public_dir: Path  # noqa: F811
        ) -> Iterator[Tpp]:
    client_id = str(uuid.uuid4())
    with ModelBank(tmp_path / "bank") as bank:
        transport = _label(make_identity(shared_runtime, bank, "transport", client_id))
        signing = _label(make_identity(shared_runtime, bank, "signing", client_id))
        encryption = generate_encryption_key(shared_runtime.keys, f"events-{uuid.uuid4().hex[:10]}",
                                             KeySpec.parse("rsa:2048")).label
        state = tmp_path / "tpp"
        state.mkdir()
        token = shared_runtime.config.pkcs11.token
        text = (f'[state]\ndir = "{state}"\n\n'
                f'[pkcs11]\nmodule = "{config_module.default_module()}"\ntoken = "{token}"\n'
                f'pin_file = "{softhsm_state / "softhsm" / "user.pin"}"\n\n'
                f'[pkcs11.environment]\nSOFTHSM2_CONF = "{softhsm_state / "softhsm" / "softhsm2.conf"}"\n\n'
                f'[keys.transport]\nuri = "pkcs11:token={token};object={transport};type=private"\n'
                f'purpose = "tls"\n\n'
                f'[keys.signing]\nuri = "pkcs11:token={token};object={signing};type=private"\n\n'
                f'[keys.encryption]\nuri = "pkcs11:token={token};object={encryption};type=private"\n'
                f'purpose = "encryption"\n\n'
                f'[tokens]\nsigning_key = "signing"\nencryption_key = "encryption"\nclient_id = "{client_id}"\n\n'
                f'[rotation]\njwks_cache_window = {WINDOW}\nencryption_drain_window = {DRAIN}\n\n'
                f'[banks.mb]\ndiscovery_url = "{bank.discovery_url}"\nissuer = "{bank.issuer}"\n'
                f'ca_bundle = "{bank.ca_bundle}"\nclient_key = "transport"\n\n'
                f'[daemon]\nsocket = "{public_dir}/run/agent.sock"\nprocesses = 1\naudit_file = "{state}/audit.jsonl"\n'
                f'health_interval = 0.5\n\n[policy]\nadmin_users = ["root"]\n')
        config = state / "config.toml"
        config.write_text(text)
        yield Tpp(shared_runtime, bank, client_id, encryption, config, state / "audit.jsonl")


@pytest.fixture
def agent(tpp: Tpp, public_dir: Path) -> Iterator[Daemon]:  # noqa: F811
    daemon = launch(tpp.config, public_dir)
    yield daemon
    daemon.stop()
    daemon.notify.close()


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "through_agent" in result.stderr  # the agent ran the step (and applied it at once)
    return result


def _fails(result: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def _status(tpp: Tpp) -> dict[str, Any]:
    result = tpp.cli("rotate", "status", "encryption", "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def _until(stamp: str) -> None:
    """Wait for the moment the state names (a window's end), not for a guessed time."""
    left = (datetime.datetime.fromisoformat(stamp) - datetime.datetime.now(datetime.UTC)).total_seconds()
    time.sleep(max(0.0, left) + 1.0)  # the stamp is rounded down to the second


def _enc_keys(daemon: Daemon) -> list[dict[str, Any]]:
    return [k for k in daemon.client().jwks()["keys"] if k["use"] == "enc"]


def _decryptions(tpp: Tpp) -> list[str]:
    """The key of each decryption in the audit trail, in order (one serving process: one trail)."""
    records = [json.loads(line) for line in tpp.audit.read_text().splitlines() if line.strip()]
    return [r["key"] for r in records if r.get("algorithm") == "RSA-OAEP-256" and r.get("operation") != "canary"]


def _without_kid(recipient: dict[str, Any], tpp: Tpp) -> str:
    """An event whose JWE header carries no kid (RFC 7516 makes it optional)."""
    signed = tpp.bank.jose.sign(tpp.bank.events.claims(tpp.client_id, "consent-7"), header={"typ": "JWT"})
    token = jwcrypto_jwe.JWE(signed.encode(), protected=json.dumps({"alg": "RSA-OAEP-256", "enc": "A256GCM",
                                                                     "cty": "JWT"}))
    token.add_recipient(jwcrypto_jwk.JWK(**{m: recipient[m] for m in ("kty", "n", "e")}))
    compact: str = token.serialize(compact=True)
    return compact


def test_an_encryption_key_rotation(tpp: Tpp, agent: Daemon) -> None:
    client = agent.client()
    [old] = _enc_keys(agent)
    assert client.receive_event("mb", tpp.event(old))["decrypted_with"] == old["kid"]

    # -- start: a decrypt-only successor, no CSR, not published yet ------------------------------------------
    started = json.loads(_ok(tpp.cli("rotate", "start", "encryption", "--json")).stdout)
    assert started["csr"] is None and started["purpose"] == "encryption" and started["current"] == tpp.encryption_label
    successor = started["successor"]
    assert successor == f"{tpp.encryption_label}.2"
    assert _status(tpp)["phase"] == "successor made, not published yet"
    assert [k["kid"] for k in _enc_keys(agent)] == [old["kid"]]
    _fails(tpp.cli("rotate", "retire", "encryption"), 1, "is not published yet", "rotate import encryption")

    # -- import without a certificate: the overlap, both published, both decrypt --------------------------------
    imported = json.loads(_ok(tpp.cli("rotate", "import", "encryption", "--json")).stdout)
    assert imported["certificate"] is None and imported["retire_after"]
    published = _enc_keys(agent)
    assert [k["kid"] for k in published] == [old["kid"], published[1]["kid"]] and published[1]["kid"] != old["kid"]
    new = published[1]
    assert {m: new[m] for m in ("kty", "n", "e")} == tpp.label_jwk(successor)  # the successor on the token
    assert new["alg"] == "RSA-OAEP-256"
    before = len(_decryptions(tpp))
    assert client.receive_event("mb", tpp.event(old))["decrypted_with"] == old["kid"]
    assert client.receive_event("mb", tpp.event(new))["decrypted_with"] == new["kid"]
    # No kid: tried with each key, the current one first (its failed unwrap is audited too).
    assert client.receive_event("mb", _without_kid(new, tpp))["decrypted_with"] == new["kid"]
    used = _decryptions(tpp)[before:]
    assert [_label(k) for k in used] == [tpp.encryption_label, successor, tpp.encryption_label, successor]
    # A kid that names none of our keys.
    with pytest.raises(AgentRequestError, match="encrypted to key 'nobody', which is not one of ours") as caught:
        client.receive_event("mb", tpp.event({**new, "kid": "nobody"}))
    assert caught.value.code == "wrong_recipient" and old["kid"] in str(caught.value)
    _fails(tpp.cli("rotate", "switch-signing", "encryption"), 1, "is an encryption key",
           "rotate retire encryption")
    _fails(tpp.cli("rotate", "remove-retired", "encryption"), 1, "has no retired key")

    # -- retire: the switch. Only the successor is published; the retired key still decrypts -----------------
    early = tpp.cli("rotate", "retire", "encryption")
    if early.returncode != 0:  # the window may have passed already on a slow machine
        _fails(early, 75, "too early", "jwks_cache_window = 2 s")
        _until(_status(tpp)["retire_after"])
        _ok(tpp.cli("rotate", "retire", "encryption"))
    assert [k["kid"] for k in _enc_keys(agent)] == [new["kid"]]
    tpp.bank.tokens.register_client(tpp.client_id, client.jwks())  # what the bank reads from now on
    assert client.receive_event("mb", tpp.event(new))["decrypted_with"] == new["kid"]
    assert client.receive_event("mb", tpp.event(old))["decrypted_with"] == old["kid"]  # sent before, arriving now
    view = _status(tpp)
    retired = next(k for k in view["keys"] if k["role"] == "retired")
    assert retired["label"] == tpp.encryption_label and retired["kid"] == old["kid"] and retired["remove_after"]
    shown = tpp.cli("rotate", "status", "encryption").stdout
    assert f"retired   {tpp.encryption_label} " in shown and "decrypts until removed" in shown, shown

    # -- remove: refused until the drain window has passed, then the old key goes --------------------------------
    _fails(tpp.cli("rotate", "remove-retired", "encryption"), 75, "too early: events encrypted to 'encryption'",
           "encryption_drain_window = 4 s")
    assert tpp.encryption_label in {k.label for k in tpp.runtime.keys.list()}  # nothing was removed
    _until(retired["remove_after"])
    removed = json.loads(_ok(tpp.cli("rotate", "remove-retired", "encryption", "--json")).stdout)
    assert removed["removed"] == [{"label": tpp.encryption_label, "objects": 2}]  # private and public key
    assert tpp.encryption_label not in {k.label for k in tpp.runtime.keys.list()}
    with pytest.raises(AgentRequestError, match=f"encrypted to key '{old['kid']}', which is not one of ours"):
        client.receive_event("mb", tpp.event(old))
    assert client.receive_event("mb", tpp.event(new))["decrypted_with"] == new["kid"]


def test_encryption_rotation_refusals(tpp: Tpp, agent: Daemon, tmp_path: Path) -> None:
    before = {k.label for k in tpp.runtime.keys.list()}
    _fails(tpp.cli("rotate", "start", "encryption", "--subject", "CN=x,C=AE"), 1,
           "its decrypt-only successor cannot sign a CSR")
    assert {k.label for k in tpp.runtime.keys.list()} == before  # nothing made
    _ok(tpp.cli("rotate", "start", "encryption"))
    _ok(tpp.cli("rotate", "import", "encryption"))
    again = json.loads(_ok(tpp.cli("rotate", "import", "encryption", "--json")).stdout)
    assert again["already_present"] is True  # the step again: nothing changed
    # Published without a certificate: one now could change the kid the banks were given.
    current = tmp_path / "current.pem"
    current.write_text(tpp.cli("cert", "show", "--key", "signing", "--pem").stdout)
    _fails(tpp.cli("rotate", "import", "encryption", str(current)), 1, "published without a certificate since")
    _fails(tpp.cli("rotate", "start", "encryption"), 1, "a rotation of key 'encryption' is under way")
    bad = tmp_path / "bad.toml"
    bad.write_text(tpp.config.read_text().replace(f"encryption_drain_window = {DRAIN}",
                                                  "encryption_drain_window = -1"))
    refused = subprocess.run([TPP_AGENT, "--config", str(bad), "rotate", "status"], capture_output=True, text=True,
                             timeout=60, check=False)
    _fails(refused, 78, "[rotation] encryption_drain_window must be seconds from 0 to 2592000")


def _certified(tpp: Tpp, label: str, path: Path) -> Path:
    """A certificate for the key ``label``'s public half, issued without a CSR (a decrypt-only key cannot sign
    one) by a CA of the test's, as an ecosystem certifying encryption keys would."""
    uri = f"pkcs11:token={tpp.runtime.config.pkcs11.token};object={label};type=private"
    public = serialization.load_der_public_key(tpp.runtime.keys.public_key_info(uri).dump())
    assert isinstance(public, rsa.RSAPublicKey)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test encryption CA")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                   tpp.client_id)]))
            .issuer_name(name).public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=395))
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_certified_encryption_successor(tpp: Tpp, agent: Daemon, tmp_path: Path) -> None:
    """With a certificate the successor is published as any certified key is: kid x5t#S256, x5c."""
    client = agent.client()
    [old] = _enc_keys(agent)
    successor = json.loads(_ok(tpp.cli("rotate", "start", "encryption", "--json")).stdout)["successor"]
    cert = _certified(tpp, successor, tmp_path / "enc.pem")
    imported = json.loads(_ok(tpp.cli("rotate", "import", "encryption", str(cert), "--json")).stdout)
    assert imported["certificate"]["sha256"] == x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(
        hashes.SHA256()).hex()
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    [first, new] = _enc_keys(agent)
    assert first["kid"] == old["kid"] and "x5c" not in first  # the current key has no certificate
    assert new["x5c"] == [base64.b64encode(der).decode()] and new["kid"] == new["x5t#S256"] != old["kid"]
    assert client.receive_event("mb", tpp.event(new))["decrypted_with"] == new["kid"]
    assert client.receive_event("mb", tpp.event(old))["decrypted_with"] == old["kid"]
    _until(_status(tpp)["retire_after"])
    retired = _ok(tpp.cli("rotate", "retire", "encryption")).stdout
    assert f"'{tpp.encryption_label}' still decrypts" in retired and "remove-retired encryption` after" in retired
    assert [k["kid"] for k in _enc_keys(agent)] == [new["kid"]]
    assert client.receive_event("mb", tpp.event(old))["decrypted_with"] == old["kid"]
