"""The ``csr``, ``cert`` and ``doctor`` commands through the real console script, on a real token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent.compat import not_valid_after
from agent.errors import ExitStatus
from agent.runtime import Runtime
from pkcs11_backends.certificates import store_certificate
from tests.conftest import Token
from tests.x509_helpers import (
    ARABIC_NAME,
    CLIENT_ID,
    DAY,
    NOW,
    ORG_ID,
    TestCA,
    foreign_public_key,
    openssl_verify_csr,
    pem_of,
)

KEY = "pkcs11:object=transport"
PROFILE = ("--org-name", ARABIC_NAME, "--org-id", ORG_ID, "--client-id", CLIENT_ID)


@pytest.fixture
def cli_token(token: Token) -> Token:
    token.cli("keys", "generate", "--label", "transport", "--type", "rsa:2048", check=True)
    return token


def public_key_der(tok: Token) -> bytes:
    pem = tok.cli("keys", "public", KEY, check=True).stdout.encode()
    return serialization.load_pem_public_key(pem).public_bytes(serialization.Encoding.DER,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str,
                          status: ExitStatus = ExitStatus.DATAERR) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_csr_to_stdout_and_file(cli_token: Token, tmp_path: Path) -> None:
    result = cli_token.cli("csr", "--key", KEY, *PROFILE, check=True)
    assert openssl_verify_csr(result.stdout).returncode == 0
    csr = x509.load_pem_x509_csr(result.stdout.encode())
    assert csr.is_signature_valid
    assert [a.value for a in csr.subject] == ["AE", ARABIC_NAME, ORG_ID, CLIENT_ID]
    assert f"CSR for CN={CLIENT_ID},OU={ORG_ID},O={ARABIC_NAME},C=AE signed" in result.stderr
    assert "RS256" in result.stderr

    out = tmp_path / "transport.csr"
    cli_token.cli("csr", "--key", KEY, "--alg", "rsa-pss", "--subject", f"CN={CLIENT_ID},O=Acme\\, Inc.,C=AE",
                  "--out", str(out), check=True)
    first = out.read_text()
    assert openssl_verify_csr(first).returncode == 0
    assert x509.load_pem_x509_csr(first.encode()).subject.get_attributes_for_oid(
        NameOID.ORGANIZATION_NAME)[0].value == "Acme, Inc."

    refused = cli_token.cli("csr", "--key", KEY, *PROFILE, "--out", str(out))
    assert_one_line_error(refused, "already exists")
    assert out.read_text() == first
    cli_token.cli("csr", "--key", KEY, *PROFILE, "--out", str(out), "--force", check=True)
    assert x509.load_pem_x509_csr(out.read_bytes()).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)[0].value == CLIENT_ID


def test_cert_import_show_and_keys_list(cli_token: Token, tmp_path: Path) -> None:
    root = TestCA("Test Root CA")
    issuing = TestCA("Test Issuing CA", parent=root)
    leaf = issuing.issue(public_key_der(cli_token))
    bundle = write(tmp_path / "fullchain.pem", pem_of(leaf, issuing.cert, root.cert))

    imported = cli_token.cli("cert", "import", "--key", KEY, bundle, check=True)
    assert "imported" in imported.stdout and "ca:Test Issuing CA" in imported.stdout
    expiry = not_valid_after(leaf).strftime("%Y-%m-%d")
    listed = cli_token.cli("keys", "list", check=True).stdout
    assert f"expires {expiry}" in listed
    (entry,) = json.loads(cli_token.cli("keys", "list", "--json", check=True).stdout)
    assert entry["certificate"]["not_after"].startswith(expiry)

    shown = json.loads(cli_token.cli("cert", "show", "--key", KEY, "--json", check=True).stdout)
    assert shown["key"] == "transport" and len(shown["certificates"]) == 1
    assert [c["label"] for c in shown["chain"]] == ["ca:Test Issuing CA", "ca:Test Root CA"]
    text = cli_token.cli("cert", "show", "--key", KEY, check=True).stdout
    assert "in use" in text and expiry in text
    # Subjects and issuers as RFC 4514, most specific first (as --subject takes them), wherever they are shown.
    subject = leaf.subject.rfc4514_string()
    assert subject.startswith("CN=") and subject.endswith(",O=Test TPP,C=AE")
    assert f"  subject   {subject}\n" in text and "  issuer    CN=Test Issuing CA,C=AE\n" in text
    assert f"imported: {subject} for key" in imported.stdout
    assert shown["certificates"][0]["subject"] == subject and shown["certificates"][0]["issuer"] == \
        "CN=Test Issuing CA,C=AE"
    pem = cli_token.cli("cert", "show", "--key", KEY, "--pem", check=True).stdout.encode()
    assert pem == pem_of(leaf, issuing.cert, root.cert)

    again = cli_token.cli("cert", "import", "--key", KEY, bundle, check=True)
    assert "already on the token" in again.stdout


def test_cert_import_reads_der_from_stdin(cli_token: Token) -> None:
    leaf = TestCA().issue(public_key_der(cli_token))
    result = subprocess.run([str(Path(sys.executable).parent / "tpp-agent"), "--config", str(cli_token.config_path),
                             "cert", "import", "--key", KEY, "-"], input=leaf.public_bytes(serialization.Encoding.DER),
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def doctor(tok: Token, config: Path | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    args = ("--config", str(config)) if config else ()
    result = tok.cli(*args, "doctor", "--json")
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {c["check"]: c for c in report["checks"]}


def test_doctor_reports_each_check(cli_token: Token, tmp_path: Path) -> None:
    code, checks = doctor(cli_token)
    assert code == 0
    for name in ("config", "pyopenssl", "openssl-pkcs11", "module", "token", "pin"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["key transport"]["status"] == "warn" and "no certificate" in checks["key transport"]["detail"]

    ca = TestCA()
    spki = public_key_der(cli_token)
    cli_token.cli("cert", "import", "--key", KEY, write(tmp_path / "c.pem", pem_of(ca.issue(spki))), check=True)
    code, checks = doctor(cli_token)
    assert code == 0 and checks["key transport"]["status"] == "ok"

    soon = ca.issue(spki, not_after=NOW + 10 * DAY)
    cli_token.cli("cert", "import", "--key", KEY, "--replace", write(tmp_path / "s.pem", pem_of(soon)), check=True)
    code, checks = doctor(cli_token)
    assert code == 0 and checks["key transport"]["status"] == "warn"
    assert "days left" in checks["key transport"]["detail"]
    text = cli_token.cli("doctor")
    assert text.returncode == 0 and any(line.startswith("warn  key transport") for line in text.stdout.splitlines())



def test_doctor_fails_on_expired_or_foreign_certificates_and_broken_aliases(cli_token: Token, runtime: Runtime) -> None:
    spki = public_key_der(cli_token)
    expired = TestCA().issue(spki, NOW - 400 * DAY, NOW - DAY).public_bytes(serialization.Encoding.DER)
    info = runtime.keys.info(KEY)
    cli_token.cli("keys", "generate", "--label", "signing", "--type", "ec:p256", check=True)
    foreign = TestCA().issue(foreign_public_key()).public_bytes(serialization.Encoding.DER)
    signing = runtime.keys.info("pkcs11:object=signing")
    with runtime.pool.session() as pooled:  # only another tool can put these there: `cert import` refuses them
        store_certificate(pooled.session, expired, "transport", info.id)
        store_certificate(pooled.session, foreign, "signing", signing.id)
    cli_token.write_config('[keys.transport]\nuri = "pkcs11:object=transport"\n'
                           '[keys.gone]\nuri = "pkcs11:object=gone"\n')
    code, checks = doctor(cli_token)
    assert code == ExitStatus.DATAERR  # the first FAIL: a certificate on the token that cannot be used
    assert checks["alias gone"]["exit_status"] == ExitStatus.CONFIG
    assert checks["key transport"]["status"] == "FAIL" and "expired on" in checks["key transport"]["detail"]
    assert checks["key signing"]["status"] == "FAIL" and "for another key" in checks["key signing"]["detail"]
    assert checks["alias transport"]["status"] == "ok"
    assert checks["alias gone"]["status"] == "FAIL"
    text = cli_token.cli("doctor").stdout
    assert any(line.startswith("FAIL  key transport") for line in text.splitlines())


def test_doctor_stops_at_a_missing_module(cli_token: Token, tmp_path: Path) -> None:
    config = tmp_path / "nomodule.toml"
    config.write_text('[pkcs11]\nmodule = "/nonexistent/libnope.so"\n')
    code, checks = doctor(cli_token, config)
    assert code == ExitStatus.CONFIG  # a wrong [pkcs11] module path
    assert checks["module"]["status"] == "FAIL" and checks["module"]["hint"]
    assert checks["token"]["status"] == checks["pin"]["status"] == checks["keys"]["status"] == "skip"
