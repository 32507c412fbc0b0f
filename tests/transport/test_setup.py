"""Building a bank's TLS context: linkage, backends, settings, and the errors that stop it early."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import OpenSSL.SSL
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import ConfigError
from agent.runtime import Runtime
from agent.transport import errors
from agent.transport.client import open_transport
from agent.transport.tls import FAPI_TLS12_CIPHERS, TlsSettings, build_context
from pkcs11_backends import openssl
from pkcs11_backends.keys import KeySpec
from tests.transport.conftest import TestCa, client_identity, settings_for


def test_pyopenssl_runs_on_the_system_libssl() -> None:
    linkage = openssl.check_linkage()
    assert linkage.libssl.startswith(("/usr/lib/", "/lib/")) and linkage.libcrypto.startswith(("/usr/lib/", "/lib/"))
    assert os.path.basename(linkage.libssl).startswith("libssl.so.3")
    assert linkage.version == OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()
    # The interpreter's own ssl module uses the very same library (one copy per process).
    assert ssl.OPENSSL_VERSION.split()[1] in linkage.version


def test_backend_choice() -> None:
    expected = "provider" if openssl.find_provider() else "engine"
    assert openssl.choose_backend("auto") == expected
    assert openssl.choose_backend("engine") == "engine"
    with pytest.raises(openssl.OpenSSLBackendError, match="unknown OpenSSL backend"):
        openssl.choose_backend("hsm")


@pytest.mark.skipif(openssl.find_provider() is not None, reason="pkcs11-provider is installed")
def test_provider_backend_absent_is_a_clear_error(shared_runtime: Runtime, bank_ca: TestCa) -> None:
    key = client_identity(shared_runtime, bank_ca)
    with pytest.raises(openssl.OpenSSLBackendError, match="pkcs11-provider is not installed") as caught:
        build_context(shared_runtime, settings_for("bank1", bank_ca, key), openssl_backend="provider")
    assert "openssl_backend = engine" in caught.value.hint


def test_certificate_of_another_key_is_refused(shared_runtime: Runtime, bank_ca: TestCa, tmp_path: Path) -> None:
    key = client_identity(shared_runtime, bank_ca)
    other = client_identity(shared_runtime, bank_ca)
    other_cert = shared_runtime.keys.info(other).certificate
    assert other_cert is not None
    pem = tmp_path / "other.pem"
    pem.write_bytes(x509.load_der_x509_certificate(other_cert.der).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(errors.KeyCertificateMismatchError, match="does not"):
        build_context(shared_runtime, settings_for("bank1", bank_ca, key, client_certificate=pem))


def test_key_without_certificate(shared_runtime: Runtime, bank_ca: TestCa) -> None:
    info = shared_runtime.keys.generate(f"bare-{os.getpid()}-{id(bank_ca)}", KeySpec.parse("ec:p256"))
    with pytest.raises(errors.ClientCertificateMissingError, match="no certificate on the token"):
        build_context(shared_runtime, settings_for("bank1", bank_ca, str(info.uri)))


def test_unreadable_ca_bundle(shared_runtime: Runtime, bank_ca: TestCa, tmp_path: Path) -> None:
    key = client_identity(shared_runtime, bank_ca)
    with pytest.raises(errors.CaBundleError, match="cannot read ca_bundle"):
        open_transport(shared_runtime, settings_for("bank1", bank_ca, key, ca_bundle=tmp_path / "missing.pem"))
    (tmp_path / "empty.pem").write_text("nothing here")
    with pytest.raises(errors.CaBundleError, match="holds no PEM"):
        open_transport(shared_runtime, settings_for("bank1", bank_ca, key, ca_bundle=tmp_path / "empty.pem"))


def test_settings_from_config_table(tmp_path: Path) -> None:
    settings = TlsSettings.from_table("lfi", {"ca_bundle": "ca.pem", "discovery_url": "https://x"}, tmp_path)
    assert settings.ca_bundle == tmp_path / "ca.pem" and settings.tls12_ciphers == FAPI_TLS12_CIPHERS
    assert settings.client_key == "transport" and settings.tls13 and not settings.system_ca
    with pytest.raises(ConfigError, match="needs ca_bundle"):
        TlsSettings.from_table("lfi", {}, tmp_path)
    with pytest.raises(ConfigError, match="read_timeout"):
        TlsSettings.from_table("lfi", {"ca_bundle": "a", "read_timeout": 0}, tmp_path)
    with pytest.raises(ConfigError, match="tls12_ciphers"):
        TlsSettings.from_table("lfi", {"ca_bundle": "a", "tls12_ciphers": "ECDHE"}, tmp_path)


def test_unknown_cipher_names_are_a_config_error(shared_runtime: Runtime, bank_ca: TestCa) -> None:
    key = client_identity(shared_runtime, bank_ca)
    with pytest.raises(ConfigError, match="tls12_ciphers"):
        build_context(shared_runtime, settings_for("bank1", bank_ca, key, tls12_ciphers=("NOT-A-SUITE",)))
