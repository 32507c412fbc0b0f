"""The directory client against the model directory, over mTLS with the transport key on the token: a CSR made
into a certificate, downloaded and imported, listed, revoked; 4xx/5xx answers and a certificate for another key
are clear errors, and nothing changes on the token."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from agent.directory.client import (
    DirectoryCertificateMismatchError,
    DirectoryClient,
    DirectoryError,
    DirectoryRefusedError,
    DirectoryServerError,
)
from agent.directory.settings import DirectorySettings
from agent.errors import InputError
from agent.transport.client import BankTransport, open_transport
from agent.x509.certificates import CertificateMismatchError, import_certificate, key_certificates
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank import ModelBank
from modelbank.directory import ModelDirectory
from pkcs11_backends.keys import KeySpec
from tests.openfinance.conftest import Tpp

ORG, SS = "org-0001", "ss-0001"


def _client_id(tpp: Tpp) -> str:
    pem = key_certificates(tpp.runtime.keys, tpp.key_uri).current
    assert pem is not None
    cert = x509.load_der_x509_certificate(pem.der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def directory(tpp: Tpp, bank: ModelBank, tmp_path: Path) -> Iterator[ModelDirectory]:
    with ModelDirectory(tmp_path / "directory", bank.ca, organisation_id=ORG, software_statement_id=SS,
                        client_id=_client_id(tpp)) as running:
        yield running


def _settings(tpp: Tpp, directory: ModelDirectory, **override: str) -> DirectorySettings:
    table = {"token_endpoint": directory.token_endpoint, "api_url": directory.url, "organisation_id": ORG,
             "software_statement_id": SS, "client_id": directory.client_id,
             "ca_bundle": str(directory.ca.cert_file), "client_key": tpp.key_uri, **override}
    return DirectorySettings.from_table(table, tpp.state_dir)


@pytest.fixture
def transport(tpp: Tpp, directory: ModelDirectory) -> Iterator[BankTransport]:
    with open_transport(tpp.runtime, _settings(tpp, directory).tls) as opened:
        yield opened


@pytest.fixture
def client(tpp: Tpp, directory: ModelDirectory, transport: BankTransport) -> DirectoryClient:
    return DirectoryClient(_settings(tpp, directory), transport)


def _successor(tpp: Tpp) -> tuple[str, str]:
    """A new key on the token (a rotation's successor) and its CSR in the directory's profile."""
    uri = str(tpp.runtime.keys.generate(f"successor-{uuid.uuid4().hex[:8]}", KeySpec.parse("ec:p256")).uri)
    subject = directory_subject("Test TPP L.L.C.", ORG, str(uuid.uuid4()))
    return uri, build_csr(tpp.runtime.keys, uri, subject).pem


def test_csr_to_certificate_on_the_token_then_revoked(tpp: Tpp, client: DirectoryClient,
                                                      directory: ModelDirectory) -> None:
    key, csr = _successor(tpp)
    issued = client.create_certificate("rtstransport", csr)
    assert (issued.type, issued.status) == ("rtstransport", "Active") and issued.x5t_s256
    pem = client.download(issued, csr)
    imported = import_certificate(tpp.runtime.keys, key, pem, "the directory")
    assert imported.certificate.der == directory.certificates[issued.id].certificate.public_bytes(Encoding.DER)
    assert [c.id for c in client.certificates()] == [issued.id]
    assert client.certificate("rtstransport", issued.id).status == "Active"

    client.revoke("rtstransport", issued.id, "superseded")
    [listed] = client.certificates()
    assert (listed.status, listed.revoke_reason) == ("Revoked", "superseded")
    with pytest.raises(DirectoryRefusedError, match=r"HTTP 409: AlreadyRevoked"):
        client.revoke("rtstransport", issued.id, "superseded")
    # One token for all of it: client_credentials once, reused while valid.
    assert [path for method, path in directory.requests if path == "/token"] == ["/token"]


def test_a_certificate_for_another_key_is_refused_and_nothing_is_imported(tpp: Tpp, client: DirectoryClient,
                                                                          directory: ModelDirectory) -> None:
    key, csr = _successor(tpp)
    directory.issue_for_other_key = True
    with pytest.raises(DirectoryCertificateMismatchError, match="is for another key, not the CSR's") as caught:
        client.create_certificate("rtstransport", csr)
    assert "revoke that certificate" in caught.value.hint
    [made] = directory.certificates.values()
    with pytest.raises(CertificateMismatchError):
        import_certificate(tpp.runtime.keys, key, made.pem, "the directory")
    assert key_certificates(tpp.runtime.keys, key).current is None


_FAILURES: tuple[tuple[int, type[DirectoryError], str], ...] = (
    (400, DirectoryRefusedError, "the request was malformed"),
    (403, DirectoryRefusedError, "check organisation_id, software_statement_id"),
    (404, DirectoryRefusedError, "no such organisation"),
    (500, DirectoryServerError, "list the certificates first"),
    (503, DirectoryServerError, "list the certificates first"),
)


def test_directory_errors_are_clear_and_change_nothing(tpp: Tpp, client: DirectoryClient,
                                                       directory: ModelDirectory) -> None:
    key, csr = _successor(tpp)
    client.access_token()
    for status, error, words in _FAILURES:
        directory.fail_next(status)
        with pytest.raises(error) as caught:
            client.create_certificate("rtstransport", csr)
        assert type(caught.value) is error and f"HTTP {status}: Injected" in str(caught.value), status
        assert "x-fapi-interaction-id" in str(caught.value) and words in caught.value.hint, status
        assert directory.certificates == {} and key_certificates(tpp.runtime.keys, key).current is None
    assert client.create_certificate("rtstransport", csr).status == "Active"  # the client stays usable


def test_the_token_needs_the_applications_certificate(tpp: Tpp, directory: ModelDirectory,
                                                      transport: BankTransport) -> None:
    stranger = DirectoryClient(_settings(tpp, directory, client_id=str(uuid.uuid4())), transport)
    with pytest.raises(DirectoryRefusedError, match="HTTP 401: invalid_client") as caught:
        stranger.certificates()
    assert "tls_client_auth" in caught.value.hint
    other_org = DirectoryClient(_settings(tpp, directory, organisation_id="org-other"), transport)
    with pytest.raises(DirectoryRefusedError, match="HTTP 403"):
        other_org.certificates()


def test_bad_arguments_send_nothing(tpp: Tpp, client: DirectoryClient, directory: ModelDirectory) -> None:
    _, csr = _successor(tpp)
    with pytest.raises(InputError, match=r"certificate type 'sigkey' is not one of transport \(rtstransport\), "
                                         r"signing \(rtssigning\), encryption \(enckey\)"):
        client.create_certificate("sigkey", csr)
    with pytest.raises(InputError, match="not a PEM certificate signing request"):
        client.create_certificate("rtstransport", "-----BEGIN NOTHING-----")
    with pytest.raises(InputError, match="revoke reason 'because' is not one of"):
        client.revoke("rtstransport", "x", "because")
    assert directory.requests == []
