"""The module-neutral fault: the far end of the module restarts (p11-kit's server; tpm2-abrmd before the TPM).

A module that lost its connection may answer ``CKR_USER_ALREADY_LOGGED_IN`` to a new login
and then fail every call: the pool must go on to ``C_Finalize``/``C_Initialize``, and be
signing again without the process being restarted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import Runtime
from agent.transport.client import open_transport
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import KeySpec, SignatureScheme
from tests.conftest import ModuleUnderTest
from tests.transport.conftest import TestCa, bank_ca, client_identity, pki_dir, serve, server_context, settings_for  # noqa: F401


def sign_until_it_works(runtime: Runtime, uri: str, seconds: float = 30.0) -> list[str]:
    """Sign until a signature comes back; the one-line errors seen on the way."""
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while True:
        try:
            runtime.keys.sign(uri, b"after the restart", SignatureScheme.RSA_PSS_SHA256)
            return errors
        except Pkcs11Error as exc:
            errors.append(str(exc))
            if time.monotonic() > deadline:
                raise AssertionError(f"still failing after {seconds:.0f}s: {errors[-3:]}") from exc
            time.sleep(0.2)


def test_signing_comes_back_after_the_module_restarts(test_module: ModuleUnderTest, runtime: Runtime) -> None:
    if test_module.restart is None:
        pytest.skip(f"{test_module.name} runs in this process: it has no far end to restart")
    uri = str(runtime.keys.generate("restart", KeySpec.parse("rsa:2048")).uri)
    runtime.keys.sign(uri, b"before", SignatureScheme.RSA_PSS_SHA256)
    test_module.restart()
    errors = sign_until_it_works(runtime, uri)
    assert all("\n" not in error for error in errors), errors
    assert runtime.pool.health.ready and runtime.pool.health.recoveries >= 1, (errors, runtime.pool.health)
    for _ in range(5):  # and it stays up: the recovery was not a lucky call
        runtime.keys.sign(uri, b"and after", SignatureScheme.RSA_PSS_SHA256)


def test_mtls_with_the_token_key_comes_back_after_the_module_restarts(
        test_module: ModuleUnderTest, runtime: Runtime, bank_ca: TestCa, pki_dir: Path,  # noqa: F811
        serve: Any) -> None:  # noqa: F811
    # The OpenSSL backend holds its own sessions (and, for a module with an instance per C_GetFunctionList such
    # as p11-kit's client, its own connection): the pool's recovery alone would leave TLS failing.
    if test_module.restart is None:
        pytest.skip(f"{test_module.name} runs in this process: it has no far end to restart")
    key = client_identity(runtime, bank_ca)
    server = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path))
    settings = settings_for("bank1", bank_ca, key)
    url = f"https://localhost:{server.port}/hello"
    with open_transport(runtime, settings) as transport:
        assert transport.get(url).status == 200
    test_module.restart()
    sign_until_it_works(runtime, key)
    with open_transport(runtime, settings) as transport:
        response = transport.get(url)
    assert response.status == 200 and response.json()["client_cn"].startswith("tpp transport-")
