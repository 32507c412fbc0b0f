"""Mutual TLS with the client key on the token against a Python ``ssl`` server."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import Runtime
from agent.transport.client import BankTransport
from agent.transport.tls import build_context
from pkcs11_backends import openssl
from tests.conftest import ModuleUnderTest, Token, new_token
from tests.transport.conftest import TestCa, client_identity, server_context, settings_for


@pytest.mark.parametrize("backend", openssl.installed_backends())
@pytest.mark.parametrize("spec", ["rsa:2048", "ec:p256"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_request_with_token_key(shared_runtime: Runtime, bank_ca: TestCa, pki_dir: Path, serve: Any, spec: str,
                                 version: ssl.TLSVersion, backend: str) -> None:
    key = client_identity(shared_runtime, bank_ca, spec)
    server = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path, max_version=version))
    settings = settings_for("bank1", bank_ca, key)
    tls = build_context(shared_runtime, settings, openssl_backend=backend)
    assert tls.backend == backend
    with BankTransport(settings, tls) as transport:
        response = transport.get(f"https://localhost:{server.port}/hello")
    assert response.status == 200
    # The backend left the token as it was: one private key under the label (no cached session copy).
    assert shared_runtime.keys.info(key).uri.object == key.split("object=")[1].split(";")[0]
    seen = response.json()
    assert seen["client_cn"] == "tpp " + key.split("object=")[1].split(";")[0]
    assert seen["interaction_id"] == response.interaction_id
    assert seen["tls_version"] == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")


@pytest.mark.parametrize("backend", openssl.installed_backends())
def test_a_token_made_after_the_backend_started_serves_mtls(shared_runtime: Runtime, bank_ca: TestCa, pki_dir: Path,
                                                           serve: Any, test_module: ModuleUnderTest,
                                                           softhsm_state: Path, tmp_path: Path, backend: str) -> None:
    # libp11 and pkcs11-provider both list the slots once per context: a token initialised later (an HSM partition
    # assigned while the agent runs) was "object not found" until a restart (pkcs11-provider: found on Debian 13,
    # where a test that made its token after an earlier test had loaded the provider failed). The agent makes a
    # new context when the token list moved.
    if not test_module.makes_tokens:
        pytest.skip("needs a module that makes tokens at once (SoftHSM2)")
    server = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path))
    first = settings_for("bank1", bank_ca, client_identity(shared_runtime, bank_ca))
    with BankTransport(first, build_context(shared_runtime, first, openssl_backend=backend)) as transport:
        assert transport.get(f"https://localhost:{server.port}/hello").status == 200  # the backend has its slots

    token = Token(softhsm_state, new_token(test_module), tmp_path / "config.toml")
    token.write_config()
    runtime = Runtime(token.config())
    try:
        key = client_identity(runtime, bank_ca)
        settings = settings_for("bank2", bank_ca, key)
        with BankTransport(settings, build_context(runtime, settings, openssl_backend=backend)) as transport:
            response = transport.get(f"https://localhost:{server.port}/hello")
        assert response.status == 200 and response.json()["client_cn"] == "tpp " + key.split("object=")[1].split(";")[0]
    finally:
        runtime.close()
