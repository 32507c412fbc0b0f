"""Key generation, listing and signing on a real SoftHSM2 token."""

from __future__ import annotations

import threading
import time

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, ObjectClass

from agent.runtime import Runtime
from pkcs11_backends.errors import DuplicateKeyError, KeyNotFoundError, KeySpecError
from pkcs11_backends.keys import KeySpec, SignatureScheme
from pkcs11_backends.sessions import PooledSession
from pkcs11_backends.signing import Capabilities


def public_key(rt: Runtime, name: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(rt.keys.public_key_info(name).dump())
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return key


def verify(pub: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, sig: bytes, data: bytes, scheme: SignatureScheme) -> None:
    if isinstance(pub, rsa.RSAPublicKey):
        pad = (padding.PSS(padding.MGF1(hashes.SHA256()), 32) if scheme is SignatureScheme.RSA_PSS_SHA256
               else padding.PKCS1v15())
        pub.verify(sig, data, pad, hashes.SHA256())
    else:
        half = len(sig) // 2
        der = utils.encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
        algo = hashes.SHA256() if scheme is SignatureScheme.ECDSA_SHA256 else hashes.SHA384()
        pub.verify(der, data, ec.ECDSA(algo))


@pytest.mark.parametrize("spec,scheme", [
    ("rsa:2048", SignatureScheme.RSA_PKCS1_SHA256),
    ("rsa:3072", SignatureScheme.RSA_PSS_SHA256),
    ("rsa:4096", SignatureScheme.RSA_PSS_SHA256),
    ("ec:p256", SignatureScheme.ECDSA_SHA256),
    ("ec:p384", SignatureScheme.ECDSA_SHA384),
])
def test_generated_key_is_sensitive_non_extractable_and_signs(runtime: Runtime, spec: str,
                                                              scheme: SignatureScheme) -> None:
    info = runtime.keys.generate("k1", KeySpec.parse(spec), bytes.fromhex("0102"))
    assert str(info.spec) == spec
    assert info.uri.object == "k1" and info.uri.id == b"\x01\x02"

    with runtime.pool.session() as pooled:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            objs = list(pooled.session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: "k1"}))
            assert len(objs) == 1 and bytes(objs[0][Attribute.ID]) == b"\x01\x02"
        priv = pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="k1")
        assert priv[Attribute.TOKEN] and priv[Attribute.PRIVATE] and priv[Attribute.SENSITIVE]
        assert not priv[Attribute.EXTRACTABLE]
        assert priv[Attribute.NEVER_EXTRACTABLE] and priv[Attribute.ALWAYS_SENSITIVE]
        # SoftHSM2 says the value is sensitive; tpm2-pkcs11 has no such attribute (the TPM holds it): unreadable.
        with pytest.raises((pkcs11.exceptions.AttributeSensitive, pkcs11.exceptions.AttributeTypeInvalid)):
            _ = priv[Attribute.PRIVATE_EXPONENT if spec.startswith("rsa") else Attribute.VALUE]

    data = b"the quick brown fox"
    sig = runtime.keys.sign(str(info.uri), data, scheme)
    pub = public_key(runtime, str(info.uri))
    verify(pub, sig, data, scheme)
    with pytest.raises(InvalidSignature):
        verify(pub, sig, data + b"!", scheme)


def test_duplicate_label_or_id_is_refused_and_token_unchanged(runtime: Runtime) -> None:
    runtime.keys.generate("dup", KeySpec.parse("ec:p256"), b"\xaa")
    before = runtime.keys.list()
    with pytest.raises(DuplicateKeyError, match="label 'dup'"):
        runtime.keys.generate("dup", KeySpec.parse("rsa:2048"))
    with pytest.raises(DuplicateKeyError, match="id aa"):
        runtime.keys.generate("other", KeySpec.parse("rsa:2048"), b"\xaa")
    assert runtime.keys.list() == before


def test_key_spec_and_lookup_errors(runtime: Runtime) -> None:
    with pytest.raises(KeySpecError, match="rsa:1024"):
        KeySpec.parse("rsa:1024")
    with pytest.raises(KeyNotFoundError):
        runtime.keys.public_key_info("pkcs11:object=nope")
    with pytest.raises(KeyNotFoundError, match="this agent serves"):
        runtime.keys.public_key_info("pkcs11:token=elsewhere;object=x")


def test_threads_sign_concurrently_without_corruption(runtime: Runtime) -> None:
    """The C_Initialize trap: without CKF_OS_LOCKING_OK, SoftHSM2 crashes here."""
    rsa_uri = str(runtime.keys.generate("r", KeySpec.parse("rsa:2048")).uri)
    ec_uri = str(runtime.keys.generate("e", KeySpec.parse("ec:p256")).uri)
    pubs = {rsa_uri: public_key(runtime, rsa_uri), ec_uri: public_key(runtime, ec_uri)}
    failures: list[BaseException] = []
    counts = [0] * 8
    deadline = time.monotonic() + 3

    def work(n: int) -> None:
        uri, scheme = ((rsa_uri, SignatureScheme.RSA_PSS_SHA256) if n % 2 else (ec_uri, SignatureScheme.ECDSA_SHA256))
        try:
            while time.monotonic() < deadline:
                data = f"{n}-{counts[n]}".encode()
                verify(pubs[uri], runtime.keys.sign(uri, data, scheme), data, scheme)
                counts[n] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert all(c > 0 for c in counts)


@pytest.mark.softhsm2_only  # SoftHSM2 2.6 has CKM_ECDSA but no CKM_ECDSA_SHA256
def test_a_method_the_module_refuses_is_dropped_from_the_methods_worked_out_before(runtime: Runtime) -> None:
    # A module that does not list its mechanisms: every method is tried in table order, best first.
    info = runtime.keys.generate("k1", KeySpec.parse("ec:p256"))
    capabilities = Capabilities(None, "softhsm2")
    scheme = SignatureScheme.ECDSA_SHA256
    assert [str(m) for m in capabilities.methods(scheme)] == ["CKM_ECDSA_SHA256", "CKM_ECDSA over a local digest"]
    pub = public_key(runtime, str(info.uri))
    uri = info.uri
    for data in (b"first", b"second"):  # the first refusal teaches; the second signature asks the right way at once

        def sign(pooled: PooledSession, data: bytes = data) -> bytes:
            return capabilities.sign(runtime.keys.private_key(pooled, uri), data, scheme)

        verify(pub, runtime.pool.call(sign), data, scheme)
        assert [str(m) for m in capabilities.methods(scheme)] == ["CKM_ECDSA over a local digest"]
