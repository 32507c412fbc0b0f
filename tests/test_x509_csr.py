"""CSRs signed on a real SoftHSM2 token, checked by ``openssl req -verify`` and by pyca/cryptography."""

from __future__ import annotations

import subprocess

import pytest
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from agent.errors import InputError
from agent.runtime import Runtime
from agent.x509.csr import CsrSignatureError, build_csr
from agent.x509.signatures import CsrAlgorithm
from agent.x509.subject import directory_subject, parse_subject
from pkcs11_backends.keys import KeySpec, KeyStore, SignatureScheme
from pkcs11_backends.uri import Pkcs11Uri
from tests.x509_helpers import ARABIC_NAME, CLIENT_ID, ORG_ID, openssl_verify_csr

CASES = [
    ("rsa:2048", None, "sha256WithRSAEncryption"),
    ("rsa:2048", CsrAlgorithm.RSA_PSS, "rsassaPss"),
    ("rsa:3072", CsrAlgorithm.RSA_PKCS1, "sha256WithRSAEncryption"),
    ("rsa:4096", CsrAlgorithm.RSA_PSS, "rsassaPss"),
    ("ec:p256", None, "ecdsa-with-SHA256"),
    ("ec:p384", None, "ecdsa-with-SHA384"),
    ("ec:p256", CsrAlgorithm.ECDSA_SHA384, "ecdsa-with-SHA384"),
    ("ec:p384", CsrAlgorithm.ECDSA_SHA256, "ecdsa-with-SHA256"),
]


@pytest.mark.parametrize("spec,alg,openssl_name", CASES)
def test_every_key_type_makes_a_csr_openssl_and_cryptography_accept(
        runtime: Runtime, spec: str, alg: CsrAlgorithm | None, openssl_name: str) -> None:
    key = str(runtime.keys.generate("k", KeySpec.parse(spec)).uri)
    signed = build_csr(runtime.keys, key, directory_subject(ARABIC_NAME, ORG_ID, CLIENT_ID), alg)

    result = openssl_verify_csr(signed.pem)
    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout + result.stderr  # OpenSSL 3.5 prints it on stdout, 3.0 on stderr
    text = subprocess.run(["openssl", "req", "-noout", "-text"], input=signed.pem,
                                        capture_output=True, text=True, check=True).stdout
    assert f"Signature Algorithm: {openssl_name}" in text

    loaded = x509.load_pem_x509_csr(signed.pem.encode())
    assert loaded.is_signature_valid
    public = loaded.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert public == runtime.keys.public_key_info(key).dump()  # the token's key, nothing else
    # Order C, O, OU, CN in the DER; the Arabic legal name comes back unchanged.
    assert [attr.oid for attr in loaded.subject] == [NameOID.COUNTRY_NAME, NameOID.ORGANIZATION_NAME,
                                                     NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME]
    assert loaded.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == ARABIC_NAME
    assert loaded.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CLIENT_ID
    # No extensions, no SAN, no attributes at all.
    assert len(loaded.extensions) == 0
    info = asn1_csr.CertificationRequest.load(signed.der)["certification_request_info"]
    assert len(info["attributes"]) == 0
    assert info["version"].native == "v1"


def test_pss_parameters_are_explicit_and_match_openssl(runtime: Runtime) -> None:
    key = str(runtime.keys.generate("k", KeySpec.parse("rsa:2048")).uri)
    signed = build_csr(runtime.keys, key, parse_subject("CN=pss"), CsrAlgorithm.RSA_PSS)
    algorithm = signed.request["signature_algorithm"]
    params = algorithm["parameters"]
    assert algorithm["algorithm"].native == "rsassa_pss"
    assert params["hash_algorithm"]["algorithm"].native == "sha256"
    assert params["mask_gen_algorithm"]["algorithm"].native == "mgf1"
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha256"
    assert params["salt_length"].native == 32
    # The exact AlgorithmIdentifier `openssl req -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32` writes.
    assert algorithm.dump().hex() == (
        "304106092a864886f70d01010a3034a00f300d06096086480165030402010500a11c301a06092a864886f70d010108"
        "300d06096086480165030402010500a203020120")


def test_rsa_pkcs1_identifier_has_null_parameters(runtime: Runtime) -> None:
    key = str(runtime.keys.generate("k", KeySpec.parse("rsa:2048")).uri)
    algorithm = build_csr(runtime.keys, key, parse_subject("CN=x")).request["signature_algorithm"]
    assert algorithm.dump().hex() == "300d06092a864886f70d01010b0500"


def test_algorithm_must_fit_the_key(runtime: Runtime) -> None:
    ec_key = str(runtime.keys.generate("e", KeySpec.parse("ec:p256")).uri)
    rsa_key = str(runtime.keys.generate("r", KeySpec.parse("rsa:2048")).uri)
    with pytest.raises(InputError, match="rsa-pss needs an RSA key"):
        build_csr(runtime.keys, ec_key, parse_subject("CN=x"), CsrAlgorithm.RSA_PSS)
    with pytest.raises(InputError, match="ecdsa needs an EC key"):
        build_csr(runtime.keys, rsa_key, parse_subject("CN=x"), CsrAlgorithm.ECDSA)


class CorruptingKeyStore(KeyStore):
    """A token whose signatures come back damaged (fault injection; the token itself is real)."""

    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        signature = bytearray(super().sign(name, data, scheme, timeout))
        signature[len(signature) // 2] ^= 0x01
        return bytes(signature)


@pytest.mark.parametrize("spec", ["rsa:2048", "ec:p256"])
def test_a_bad_signature_is_never_emitted(runtime: Runtime, spec: str) -> None:
    key = str(runtime.keys.generate("k", KeySpec.parse(spec)).uri)
    with pytest.raises(CsrSignatureError, match="does not verify; no CSR was written"):
        build_csr(CorruptingKeyStore(runtime.pool), key, parse_subject("CN=x"))
