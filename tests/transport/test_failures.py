"""Each failure below HTTP is its own error class, and the agent stays usable afterwards."""

from __future__ import annotations

import dataclasses
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import Runtime
from agent.transport import errors
from agent.transport.client import BankTransport, open_transport
from tests.transport.conftest import TestCa, TlsHttpServer, client_identity, server_context, settings_for

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.fixture
def good_server(bank_ca: TestCa, pki_dir: Path, serve: Any) -> TlsHttpServer:
    server: TlsHttpServer = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path))
    return server


@pytest.fixture
def transport(shared_runtime: Runtime, bank_ca: TestCa) -> Iterator[BankTransport]:
    key = client_identity(shared_runtime, bank_ca)
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, key, read_timeout=0.5,
                                                     connect_timeout=0.5)) as t:
        yield t


def still_works(transport: BankTransport, server: TlsHttpServer) -> None:
    assert transport.get(f"https://localhost:{server.port}/after").status == 200


def test_server_not_trusted(transport: BankTransport, rogue_ca: TestCa, bank_ca: TestCa, pki_dir: Path,
                            serve: Any, good_server: TlsHttpServer) -> None:
    rogue = serve(server_context(*rogue_ca.server_identity(pki_dir), bank_ca.pem_path))
    with pytest.raises(errors.ServerUntrustedError) as caught:
        transport.get(f"https://localhost:{rogue.port}/x", interaction_id="iid-untrusted")
    assert "iid-untrusted" in str(caught.value) and "bank1" in caught.value.hint
    assert "ca_bundle" in caught.value.hint
    still_works(transport, good_server)


def test_host_name_mismatch(transport: BankTransport, bank_ca: TestCa, pki_dir: Path, serve: Any,
                            good_server: TlsHttpServer, tmp_path: Path) -> None:
    other = serve(server_context(*bank_ca.server_identity(tmp_path, hosts=("bank.example",)), bank_ca.pem_path))
    with pytest.raises(errors.HostnameMismatchError, match="host name"):
        transport.get(f"https://localhost:{other.port}/x")
    # The IP address is not in the good server's certificate either, only "localhost" and 127.0.0.1 are.
    still_works(transport, good_server)


@pytest.mark.parametrize("version", VERSIONS)
def test_server_does_not_trust_our_ca(shared_runtime: Runtime, bank_ca: TestCa, rogue_ca: TestCa, pki_dir: Path,
                                      serve: Any, good_server: TlsHttpServer, version: ssl.TLSVersion) -> None:
    key = client_identity(shared_runtime, rogue_ca)
    server = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path, max_version=version))
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, key)) as transport, \
            pytest.raises(errors.ClientCertUnknownCaError) as caught:
        transport.get(f"https://localhost:{server.port}/x")
    assert "issuer" in caught.value.hint
    good = client_identity(shared_runtime, bank_ca)
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, good)) as transport:
        still_works(transport, good_server)


def test_our_expired_certificate_is_never_presented(shared_runtime: Runtime, bank_ca: TestCa,
                                                    good_server: TlsHttpServer) -> None:
    key = client_identity(shared_runtime, bank_ca, expired=True)
    with pytest.raises(errors.ClientCertificateValidityError, match=r"expired on .* never presented") as caught:
        open_transport(shared_runtime, settings_for("bank1", bank_ca, key))
    assert "tpp-agent cert import" in caught.value.hint
    # A transport built while its certificate was valid stops sending once it is not, before any connection.
    good = client_identity(shared_runtime, bank_ca)
    expired = bank_ca.issue(bank_ca.key.public_key(), "tpp expired", expired=True)
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, good)) as transport:
        outlived = BankTransport(transport.settings, dataclasses.replace(transport.tls, certificate=expired))
        with pytest.raises(errors.ClientCertNotPresentedError, match="expired on") as sent:
            outlived.get(f"https://localhost:{good_server.port}/x", interaction_id="iid-expired")
        assert "iid-expired" in sent.value.hint and outlived.stats.total == 0
        still_works(transport, good_server)


def test_connection_refused(transport: BankTransport, good_server: TlsHttpServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(errors.ConnectRefusedError):
        transport.get(f"https://localhost:{port}/x")
    still_works(transport, good_server)


def test_read_timeout(transport: BankTransport, good_server: TlsHttpServer) -> None:
    with pytest.raises(errors.ReadTimeoutError) as caught:
        transport.get(f"https://localhost:{good_server.port}/never", interaction_id="iid-slow")
    assert "iid-slow" in caught.value.hint
    still_works(transport, good_server)


def test_tls_never_starts_is_a_connect_timeout(transport: BankTransport, good_server: TlsHttpServer) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts TCP (in the kernel) and never says a word of TLS
        with pytest.raises(errors.ConnectTimeoutError):
            transport.get(f"https://localhost:{silent.getsockname()[1]}/x")
    still_works(transport, good_server)


def test_no_common_cipher_suite(shared_runtime: Runtime, bank_ca: TestCa, pki_dir: Path, serve: Any) -> None:
    ec_server = serve(server_context(*bank_ca.server_identity(pki_dir, kind="ec"), bank_ca.pem_path,
                                     max_version=ssl.TLSVersion.TLSv1_2))
    key = client_identity(shared_runtime, bank_ca)
    settings = settings_for("bank1", bank_ca, key)
    # The FAPI TLS 1.2 suites are all RSA: a bank with an EC server certificate needs ECDSA suites configured.
    with open_transport(shared_runtime, settings) as transport, pytest.raises(errors.HandshakeFailedError):
        transport.get(f"https://localhost:{ec_server.port}/x")
    ecdsa = dataclasses.replace(settings, tls12_ciphers=("ECDHE-ECDSA-AES128-GCM-SHA256",))
    with open_transport(shared_runtime, ecdsa) as transport:
        assert transport.get(f"https://localhost:{ec_server.port}/x").json()["cipher"] == \
            "ECDHE-ECDSA-AES128-GCM-SHA256"
