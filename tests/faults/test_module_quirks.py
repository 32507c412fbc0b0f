"""Modules unlike SoftHSM2, emulated by the shim in front of it: no hash-and-sign RSA, C_Initialize arguments.

Each runs the console script in a child process (the shim reads its environment once, when loaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import Token
from tests.faults.conftest import Shim
from tests.x509_helpers import openssl_verify_csr

pytestmark = pytest.mark.softhsm2_only  # the shim forwards to SoftHSM2

CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS = 0x1, 0xD, 0x40, 0x43


def on_shim(token: Token, shim: Shim, extra: str = "") -> None:
    table = token.pkcs11_table().replace(token.pkcs11_table().split('"')[1], str(shim.path), 1)
    token.config_path.write_text(f'[state]\ndir = "{token.state_dir}"\n\n{table}\n{extra}')


def checks(token: Token, env: dict[str, str]) -> dict[str, dict[str, str]]:
    result = token.cli("doctor", "--json", env=env)
    return {c["check"]: c for c in json.loads(result.stdout)["checks"]}


@pytest.mark.parametrize(("hidden", "rs256", "ps256"), [
    ((CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS), "CKM_RSA_PKCS over a local digest",
     "CKM_RSA_PKCS_PSS over a local digest"),
    ((CKM_RSA_PKCS, CKM_RSA_PKCS_PSS), "CKM_SHA256_RSA_PKCS", "CKM_SHA256_RSA_PKCS_PSS"),
])
def test_signing_follows_the_mechanisms_the_module_has(token: Token, shim: Shim, hidden: tuple[int, ...],
                                                       rs256: str, ps256: str) -> None:
    on_shim(token, shim)
    env = {**shim.environment(), "TPP_SHIM_HIDE_MECHANISMS": ",".join(hex(m) for m in hidden)}
    token.cli("keys", "generate", "--label", "transport", "--type", "rsa:2048", check=True, env=env)
    mechanisms = checks(token, env)["mechanisms"]
    assert mechanisms["status"] == "ok"
    assert f"RS256 by {rs256}" in mechanisms["detail"] and f"PS256 by {ps256}" in mechanisms["detail"]
    for alg in ("rsa-pkcs1", "rsa-pss"):
        pem = token.cli("csr", "--key", "pkcs11:object=transport", "--subject", "CN=quirks", "--alg", alg,
                        check=True, env=env).stdout
        assert openssl_verify_csr(pem).returncode == 0
        assert x509.load_pem_x509_csr(pem.encode()).is_signature_valid


def test_a_module_without_any_rsa_signing_is_named_by_doctor(token: Token, shim: Shim) -> None:
    on_shim(token, shim)
    env = {**shim.environment(), "TPP_SHIM_HIDE_MECHANISMS": ",".join(
        hex(m) for m in (CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS))}
    token.cli("keys", "generate", "--label", "transport", "--type", "rsa:2048", check=True, env=env)
    found = checks(token, env)
    assert "no RS256" in found["mechanisms"]["detail"] and "no PS256" in found["mechanisms"]["detail"]
    operations = found["key transport operations"]
    assert operations["status"] == "warn" and "RS256" in operations["detail"] and "PS256" in operations["detail"]
    result = token.cli("csr", "--key", "pkcs11:object=transport", "--subject", "CN=quirks", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "offers no mechanism for RS256" in result.stderr


def test_init_args_reach_the_module_as_preserved(token: Token, shim: Shim, tmp_path: Path) -> None:
    env = {**shim.environment(), "TPP_SHIM_INIT_ARGS": "configdir='/etc/hsm' slot=0"}
    on_shim(token, shim)
    refused = checks(token, env)["module"]
    assert refused["status"] == "FAIL" and "CKR_ARGUMENTS_BAD" in refused["detail"]
    assert "init_args" in refused["hint"]
    text = token.config_path.read_text()
    token.config_path.write_text(text.replace("[pkcs11]\n", "[pkcs11]\ninit_args = \"configdir='/etc/hsm' slot=0\"\n"))
    accepted = checks(token, env)
    assert accepted["module"]["status"] == "ok", accepted["module"]
    assert accepted["pin"]["status"] == "ok", accepted["pin"]
