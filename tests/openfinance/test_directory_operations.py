"""The directory's certificate API and ``register --all`` as a user runs them: the CLI on the token, and the
running agent's socket, against the model directory and the model bank over real mTLS. Bad answers and bad
inputs are one clear error line each, and change nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.errors import ExitStatus
from agent.x509.certificates import key_certificates
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank import ModelBank
from modelbank.directory import ModelDirectory
from modelbank.server import REGISTRATION_PATH
from pkcs11_backends.keys import KeySpec
from tests.daemon import conftest as daemon_fixtures
from tests.daemon.conftest import NOBODY, Daemon, launch, nobody_rule
from tests.daemon.test_policy import as_user
from tests.openfinance import test_directory as directory_fixtures
from tests.openfinance.conftest import BANK, Tpp, issue_identity
from tests.openfinance.test_cli_and_demo import cli

ORG, SS = directory_fixtures.ORG, directory_fixtures.SS
directory = directory_fixtures.directory  # the model directory, for the tests' TPP
public_dir = daemon_fixtures.public_dir


def _directory_section(tpp: Tpp, directory: ModelDirectory) -> str:
    return (f'\n[directory]\ntoken_endpoint = "{directory.token_endpoint}"\napi_url = "{directory.url}"\n'
            f'organisation_id = "{ORG}"\nsoftware_statement_id = "{SS}"\nclient_id = "{directory.client_id}"\n'
            f'ca_bundle = "{directory.ca.cert_file}"\nclient_key = "{tpp.key_uri}"\n')


@pytest.fixture
def config(tpp: Tpp, bank: ModelBank, directory: ModelDirectory) -> Path:
    path = tpp.write_config(bank)
    path.write_text(path.read_text() + _directory_section(tpp, directory))
    return path


def _successor(tpp: Tpp, tmp_path: Path) -> tuple[str, Path]:
    """A rotation's successor key on the token and its CSR in a file, as `tpp-agent csr` writes it."""
    uri = str(tpp.runtime.keys.generate(f"successor-{uuid.uuid4().hex[:8]}", KeySpec.parse("rsa:2048")).uri)
    csr = build_csr(tpp.runtime.keys, uri, directory_subject("Test TPP L.L.C.", ORG, str(uuid.uuid4())))
    path = tmp_path / f"{uri.rsplit('=', 1)[-1]}.csr"
    path.write_text(csr.pem)
    return uri, path


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_csr_becomes_a_certificate_on_the_token_then_revoked(tpp: Tpp, config: Path, directory: ModelDirectory,
                                                              tmp_path: Path) -> None:
    key, csr = _successor(tpp, tmp_path)
    made = cli(config, "directory", "certs", "create", "--type", "transport", "--csr", str(csr), "--key", key,
               "--import", "--json")
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    [issued] = directory.certificates.values()
    assert answer["created"]["id"] == issued.id and answer["created"]["type"] == "rtstransport"
    stored = key_certificates(tpp.runtime.keys, key).current
    assert stored is not None and stored.der == issued.certificate.public_bytes(Encoding.DER)
    assert answer["imported"]["sha256"] == stored.sha256_fingerprint

    listed = cli(config, "directory", "certs", "list")
    assert listed.returncode == 0 and issued.id in listed.stdout and "Active" in listed.stdout, listed.stderr
    revoked = cli(config, "directory", "certs", "revoke", issued.id, "--type", "transport", "--reason", "superseded")
    assert revoked.returncode == 0 and f"revoked rtstransport certificate {issued.id} (superseded)" in revoked.stdout
    assert (issued.status, issued.revoke_reason) == ("Revoked", "superseded")
    again = cli(config, "directory", "certs", "import", issued.id, "--type", "transport", "--key", key)
    assert again.returncode == ExitStatus.DATAERR and "is revoked: it is not imported" in _one_error_line(again.stderr)
    # Every request went over mTLS with a directory:software token bound to the transport certificate.
    assert ("POST", "/token") in directory.requests


def test_the_directorys_refusals_and_failures_are_one_line_and_change_nothing(
        tpp: Tpp, config: Path, directory: ModelDirectory, tmp_path: Path) -> None:
    key, csr = _successor(tpp, tmp_path)
    create = ("directory", "certs", "create", "--type", "transport", "--csr", str(csr), "--key", key, "--import")
    # Each run is a new process: its first request, the directory:software token's, gets the answer.
    for status, exit_status, words in ((500, ExitStatus.TEMPFAIL, "the directory failed to get a"),
                                       (503, ExitStatus.TEMPFAIL, "the directory failed to get a"),
                                       (400, ExitStatus.PROTOCOL, "the directory refused to get a"),
                                       (403, ExitStatus.PROTOCOL, "the directory refused to get a")):
        directory.fail_next(status)
        failed = cli(config, *create)
        line = _one_error_line(failed.stderr)
        assert failed.returncode == exit_status, (status, failed.stderr)
        assert words in line and f"HTTP {status}: Injected" in line, line
        assert directory.certificates == {} and key_certificates(tpp.runtime.keys, key).current is None

    directory.issue_for_other_key = True
    foreign = cli(config, *create)
    assert foreign.returncode == ExitStatus.PROTOCOL
    assert "is for another key, not the CSR's" in _one_error_line(foreign.stderr)
    assert key_certificates(tpp.runtime.keys, key).current is None
    [made] = directory.certificates
    imported = cli(config, "directory", "certs", "import", made, "--type", "transport", "--key", key)
    assert imported.returncode == ExitStatus.PROTOCOL
    assert "is for another key" in _one_error_line(imported.stderr) and "nothing was imported" in imported.stderr
    assert key_certificates(tpp.runtime.keys, key).current is None

    # A CSR that is not the named key's is not sent at all; nor is one that is no CSR.
    posts = [r for r in directory.requests if r[0] == "POST" and "/certificates/" in r[1]]
    other = cli(config, "directory", "certs", "create", "--type", "transport", "--csr", str(csr), "--key", tpp.key_uri)
    assert other.returncode == ExitStatus.DATAERR and "the CSR is not for key" in _one_error_line(other.stderr)
    junk = tmp_path / "junk.csr"
    junk.write_text("-----BEGIN NOTHING-----\n")
    bad = cli(config, "directory", "certs", "create", "--type", "transport", "--csr", str(junk))
    assert bad.returncode == ExitStatus.DATAERR and "not a PEM certificate signing request" in bad.stderr
    kind = cli(config, "directory", "certs", "create", "--type", "sigkey", "--csr", str(csr))
    assert kind.returncode == ExitStatus.DATAERR and "certificate type 'sigkey' is not one of" in kind.stderr
    assert [r for r in directory.requests if r[0] == "POST" and "/certificates/" in r[1]] == posts


def test_register_all_registers_each_bank_once_and_names_each_failure(tpp: Tpp, bank: ModelBank,
                                                                      tmp_path: Path) -> None:
    _, _, expired_pem = issue_identity(tpp.runtime, bank, expired=True)
    expired = tmp_path / "expired.pem"
    expired.write_bytes(expired_pem)
    config = tpp.write_config(bank)
    config.write_text(config.read_text() + f'\n[banks.old]\ndiscovery_url = "{bank.discovery_url}"\n'
                      f'issuer = "{bank.issuer}"\nca_bundle = "{bank.ca_bundle}"\nclient_key = "{tpp.key_uri}"\n'
                      f'client_certificate = "{expired}"\n')
    first = cli(config, "register", "--all")
    lines = first.stdout.splitlines()
    assert first.returncode == ExitStatus.CONFIG, first.stderr  # the expired certificate's status
    assert lines[0].startswith(f"{BANK}: registered at ") and "HTTP 204" in lines[0], first.stdout
    assert lines[1].startswith("old: failed: ") and "expired on" in lines[1] and "never presented" in lines[1]
    second = cli(config, "register", "--all", "--json")
    answer = json.loads(second.stdout)
    assert [row["outcome"] for row in answer["banks"]] == ["already registered", "failed"]
    assert answer["failed"] == 1 and second.returncode == ExitStatus.CONFIG
    posts = [r for r in bank.requests if r[0] == "POST" and r[1].endswith(REGISTRATION_PATH)]
    assert len(posts) == 1 and len(bank.registrations) == 1  # the expired certificate was never presented
    usage = cli(config, "register", BANK, "--all")
    assert usage.returncode == ExitStatus.USAGE


@pytest.fixture
def agent(tpp: Tpp, config: Path, public_dir: Path) -> Iterator[Daemon]:
    signing = tpp.runtime.keys.generate(f"signing-{uuid.uuid4().hex[:10]}", KeySpec.parse("rsa:2048"))
    config.write_text(config.read_text() + f'\n[keys.transport]\nuri = "{tpp.key_uri}"\n\n'
                      f'[keys.signing]\nuri = "{signing.uri}"\n\n' + nobody_rule(
                          public_dir, tpp.state_dir / "audit.jsonl", "nobody-registers", ["register"],
                          banks=[BANK]))
    daemon = launch(config, public_dir)
    yield daemon
    daemon.stop()
    daemon.notify.close()


def _call(daemon: Daemon, uid: int, method: str, target: str, body: object = None) -> tuple[int, dict[str, Any]]:
    answer = as_user(daemon, uid, NOBODY if uid else 0, method, target, "" if body is None else json.dumps(body))
    return int(str(answer["status"])), json.loads(str(answer["body"]))


def test_through_the_socket_for_admins_only(tpp: Tpp, agent: Daemon, directory: ModelDirectory, bank: ModelBank,
                                            tmp_path: Path) -> None:
    key, csr = _successor(tpp, tmp_path)
    create = {"type": "transport", "csr": csr.read_text(), "key": key}
    for method, target, body in (("POST", "/v1/directory/certificates", create),
                                 ("GET", "/v1/directory/certificates", None),
                                 ("POST", "/v1/registrations", {})):
        status, refused = _call(agent, NOBODY, method, target, body)  # it may register at mb, not these
        assert status == 403 and "it is an admin operation" in str(refused["message"]), refused
    assert directory.requests == [] and bank.registrations == []

    status, made = _call(agent, 0, "POST", "/v1/directory/certificates", create)
    assert status == 200 and made["type"] == "rtstransport", made
    status, imported = _call(agent, 0, "POST", "/v1/directory/certificates/import",
                             {"id": made["id"], "type": "transport", "key": key})
    assert status == 200 and imported["already_present"] is False, imported
    assert key_certificates(tpp.runtime.keys, key).current is not None
    status, listed = _call(agent, 0, "GET", "/v1/directory/certificates")
    assert status == 200 and [c["id"] for c in listed["certificates"]] == [made["id"]]
    directory.fail_next(502)  # the agent has its token: the revoke gets it
    status, failed = _call(agent, 0, "POST", "/v1/directory/certificates/revoke",
                           {"id": made["id"], "type": "transport", "reason": "superseded"})
    assert status == 502 and failed["code"] == "directory_failed" and "HTTP 502" in str(failed["message"])
    status, revoked = _call(agent, 0, "POST", "/v1/directory/certificates/revoke",
                            {"id": made["id"], "type": "transport", "reason": "superseded"})
    assert status == 200 and revoked["revoked"] is True

    status, registered = _call(agent, 0, "POST", "/v1/registrations", {})
    assert status == 200 and [r["outcome"] for r in registered["banks"]] == ["registered"]
    status, again = _call(agent, 0, "POST", "/v1/registrations", {})
    assert [r["outcome"] for r in again["banks"]] == ["already registered"]
    assert len(bank.registrations) == 1
    # The CLI finds the running agent and goes through it (the operator here is root, an admin).
    through = cli(agent.config_path, "register", "--all")
    assert through.returncode == 0 and "through_agent" in through.stderr, through.stderr
    assert through.stdout.startswith(f"{BANK}: already registered at ") and "nothing sent" in through.stdout
    listed_cli = cli(agent.config_path, "directory", "certs", "list", "--json")
    assert listed_cli.returncode == 0 and "through_agent" in listed_cli.stderr, listed_cli.stderr
    assert [c["status"] for c in json.loads(listed_cli.stdout)["certificates"]] == ["Revoked"]
    # Each request to the directory used the transport key: audited as the admin's directory operation.
    audit = [json.loads(line) for line in (tpp.state_dir / "audit.jsonl").read_text().splitlines()]
    directory_uses = [r for r in audit if r.get("algorithm") == "tls-client-auth" and r["operation"] == "directory"]
    assert directory_uses and all(r["uid"] == 0 for r in directory_uses)


def test_an_expired_transport_certificate_keeps_the_agent_not_ready(tpp: Tpp, bank: ModelBank, public_dir: Path,
                                                                    tmp_path: Path) -> None:
    key, _, expired_pem = issue_identity(tpp.runtime, bank, expired=True)
    expired = tmp_path / "expired.pem"
    expired.write_bytes(expired_pem)
    config = tpp.write_config(bank, client_key=key, client_certificate=str(expired))
    config.write_text(config.read_text() + nobody_rule(public_dir, tpp.state_dir / "audit.jsonl", "none", ["keys"]))
    daemon = launch(config, public_dir)
    try:
        status, answer = _call(daemon, 0, "GET", "/v1/ready")
        assert status == 503 and answer["code"] == "not_ready", answer
        assert f"bank '{BANK}'" in str(answer["message"]) and "is expired on" in str(answer["message"])
        status, _ = _call(daemon, NOBODY, "GET", "/v1/ready")  # a stranger learns only that
        assert status == 503
    finally:
        daemon.stop()
        daemon.notify.close()
    doctor = cli(config, "--direct", "doctor")
    lines = [line for line in doctor.stdout.splitlines() if "bank certificates" in line]
    assert len(lines) == 1, doctor.stdout + doctor.stderr
    assert "FAIL" in lines[0] and f"bank '{BANK}'" in lines[0] and "expired on" in lines[0], doctor.stdout
    assert doctor.returncode == ExitStatus.CONFIG, doctor.stdout  # the certificate is the configuration's to fix
    # Given a valid certificate, the same bank is fine.
    valid = tpp.write_config(bank)
    assert "FAIL" not in next(line for line in cli(valid, "--direct", "doctor").stdout.splitlines()
                              if "bank certificates" in line)


def test_doctor_warns_by_the_configured_expiry_warning_days(tpp: Tpp, bank: ModelBank) -> None:
    label = tpp.key_uri.split("object=")[1].split(";")[0]
    config = tpp.write_config(bank)
    base = config.read_text()
    lines = {}
    for days in (30, 400):  # the certificate has 395 days left
        config.write_text(base + f"\n[certificates]\nexpiry_warning_days = {days}\n")
        lines[days] = next(line for line in cli(config, "--direct", "doctor").stdout.splitlines()
                           if f"key {label}" in line)
    assert lines[30].lstrip().startswith("ok") and "certificate valid until" in lines[30], lines
    assert lines[400].lstrip().startswith("warn") and "days left" in lines[400], lines
