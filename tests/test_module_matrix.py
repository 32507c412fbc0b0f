"""What differs between modules, on the session's module: templates, vendor-made keys, session limits.

Part of the core that `make test` runs on every module of the matrix.
"""

from __future__ import annotations

import pytest
from cryptography import x509

from agent import config as config_module
from agent.runtime import Runtime
from pkcs11_backends.errors import ModuleLimitError
from pkcs11_backends.keys import KeyKind, KeySpec, SignatureScheme
from pkcs11_backends.module import TokenSelector
from pkcs11_backends.native import UNAVAILABLE_INFORMATION
from tests.conftest import ModuleUnderTest, Token, load_module
from tests.modules.nss import Nss
from tests.modules.tpm2 import Tpm2
from tests.x509_helpers import openssl_verify_csr


def test_generation_takes_a_template_the_module_accepts_without_a_recovery(runtime: Runtime) -> None:
    for spec in ("rsa:2048", "ec:p256"):
        parsed = KeySpec.parse(spec)
        if not runtime.keys.capabilities.can_generate(parsed.kind, parsed.bits):
            continue
        info = runtime.keys.generate(f"matrix-{parsed.kind.value}", parsed)
        scheme = SignatureScheme.RSA_PSS_SHA256 if parsed.kind is KeyKind.RSA else SignatureScheme.ECDSA_SHA256
        assert runtime.keys.sign(str(info.uri), b"data", scheme)
    health = runtime.pool.health
    assert health.ready and health.recoveries == 0, health


def test_a_key_made_with_nss_certutil_has_no_label_and_is_named_by_its_id(test_module: ModuleUnderTest,
                                                                          token: Token) -> None:
    nss = test_module.extra.get("nss")
    if not isinstance(nss, Nss):
        pytest.skip(f"{test_module.name} is not NSS's softoken (certutil makes its keys)")
    key_id = nss.add_vendor_key()
    uri = f"pkcs11:token={token.label};id={''.join(f'%{b:02X}' for b in key_id)};type=private"
    listed = token.cli("keys", "list", check=True).stdout
    assert uri in listed and "object=;" not in listed  # named by its id: an empty object= would ask for label ""
    pem = token.cli("csr", "--key", uri, "--subject", "CN=certutil-made", "--alg", "rsa-pss", check=True).stdout
    assert openssl_verify_csr(pem).returncode == 0
    assert x509.load_pem_x509_csr(pem.encode()).is_signature_valid


def test_a_key_made_with_the_vendor_tool_is_found_by_label_and_signs(test_module: ModuleUnderTest,
                                                                     token: Token) -> None:
    tpm = test_module.extra.get("tpm2")
    if not isinstance(tpm, Tpm2):
        pytest.skip(f"{test_module.name} has no vendor key tool here (tpm2_ptool is tpm2-pkcs11's)")
    tpm.add_vendor_key("vendor-made")  # its CKA_ID is the ASCII hex of 8 random bytes
    # A new process, as the operator's next command is: tpm2-pkcs11 reads its store when initialised.
    listed = token.cli("keys", "list", check=True).stdout
    assert "vendor-made" in listed
    pem = token.cli("csr", "--key", "pkcs11:object=vendor-made", "--subject", "CN=vendor-made", "--alg", "rsa-pss",
                    check=True).stdout
    assert openssl_verify_csr(pem).returncode == 0
    assert x509.load_pem_x509_csr(pem.encode()).is_signature_valid


def test_more_sessions_than_the_token_allows_are_refused_at_start(test_module: ModuleUnderTest, token: Token) -> None:
    module = load_module(test_module)
    limit = module.token_info(module.find_token(TokenSelector(label=token.label))).ulMaxRwSessionCount
    if limit in (0, UNAVAILABLE_INFORMATION) or limit > 64 * 257:
        pytest.skip(f"{test_module.name} sets no read-write session limit a configuration can pass")
    processes = limit // 257 + 1
    token.write_config("")
    text = token.config_path.read_text().replace("[pkcs11]\n", "[pkcs11]\nmax_sessions = 256\n")
    token.config_path.write_text(text)
    runtime = Runtime(config_module.load(str(token.config_path)), processes=processes)
    try:
        with pytest.raises(ModuleLimitError) as refused:
            runtime.pool.start()
    finally:
        runtime.close()
    assert f"allows {limit} " in str(refused.value)
    assert f"{processes} process(es) needs {257 * processes}" in str(refused.value)
