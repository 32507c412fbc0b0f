"""RSA-OAEP-256 on the token (pkcs11_backends.decryption): decrypt-only keys, the probed route, one error for all.

Ciphertexts are made by ``cryptography`` (an independent OAEP implementation) with the public key read from the
token; the local OAEP decoding is also checked on encoded messages that ``cryptography``'s raw RSA opens.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given
from hypothesis import strategies as st
from pkcs11 import Attribute, ObjectClass

from agent.runtime import Runtime
from pkcs11_backends.decryption import (
    ROUTES,
    DecryptionError,
    TokenDecryptor,
    generate_encryption_key,
    oaep_sha256_decode,
)
from pkcs11_backends.errors import KeySpecError, MechanismError
from pkcs11_backends.keys import KeySpec

OAEP_256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
_SOFTWARE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_key(runtime: Runtime, uri: str) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(runtime.keys.public_key_info(uri).dump())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


@pytest.fixture
def encryption_uri(runtime: Runtime) -> str:
    return str(generate_encryption_key(runtime.keys, "encryption", KeySpec.parse("rsa:2048")).uri)


def test_encryption_key_is_decrypt_only_and_non_extractable(runtime: Runtime, encryption_uri: str) -> None:
    def attributes(pooled: object) -> tuple[dict[Attribute, object], dict[Attribute, object]]:
        session = pooled.session  # type: ignore[attr-defined]
        private = next(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: "encryption"}))
        public = next(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: "encryption"}))
        names = (Attribute.SIGN, Attribute.DECRYPT, Attribute.UNWRAP, Attribute.SENSITIVE, Attribute.EXTRACTABLE)
        return ({a: private[a] for a in names}, {a: public[a] for a in (Attribute.VERIFY, Attribute.ENCRYPT)})

    private, public = runtime.pool.call(attributes)
    assert private == {Attribute.SIGN: False, Attribute.DECRYPT: True, Attribute.UNWRAP: False,
                       Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
    assert public == {Attribute.VERIFY: False, Attribute.ENCRYPT: True}  # SoftHSM2 takes the first template


def test_only_rsa_encryption_keys(runtime: Runtime) -> None:
    with pytest.raises(KeySpecError, match="must be RSA"):
        generate_encryption_key(runtime.keys, "ec-encryption", KeySpec.parse("ec:p256"))


def test_decrypts_what_cryptography_encrypted(runtime: Runtime, encryption_uri: str) -> None:
    decryptor = TokenDecryptor(runtime.keys)
    public = public_key(runtime, encryption_uri)
    for message in (b"", os.urandom(32), os.urandom(190)):  # 190 = 256 - 2*32 - 2: the longest for RSA-2048
        assert decryptor.decrypt_oaep_sha256(encryption_uri, public.encrypt(message, OAEP_256)) == message
    assert decryptor.route(encryption_uri) in ROUTES


def test_softhsm2_takes_the_raw_route(runtime: Runtime, encryption_uri: str) -> None:
    """SoftHSM2 2.6 refuses CKM_RSA_PKCS_OAEP with SHA-256 (DESIGN.md): the probe must notice, not fail."""
    if "softhsm" not in runtime.config.pkcs11.module:
        pytest.skip("SoftHSM2's trap")
    assert TokenDecryptor(runtime.keys).route(encryption_uri).name.startswith("CKM_RSA_X_509")


def test_every_bad_ciphertext_gets_the_same_answer(runtime: Runtime, encryption_uri: str) -> None:
    decryptor = TokenDecryptor(runtime.keys)
    public = public_key(runtime, encryption_uri)
    good = public.encrypt(b"k" * 32, OAEP_256)
    flipped = bytearray(good)
    flipped[100] ^= 0x40
    bad = [
        bytes(flipped),
        public.encrypt(b"k" * 32, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)),
        public.encrypt(b"k" * 32, padding.PKCS1v15()),
        good[:-1],
        _SOFTWARE_KEY.public_key().encrypt(b"k" * 32, OAEP_256),  # for another key
        b"\xff" * 256,  # above the modulus: SoftHSM2 would answer CKR_GENERAL_ERROR
    ]
    messages = set()
    for ciphertext in bad:
        with pytest.raises(DecryptionError) as refused:
            decryptor.decrypt_oaep_sha256(encryption_uri, ciphertext)
        messages.add(str(refused.value))
    assert len(messages) == 1
    assert runtime.pool.health.ready  # no bad message looks like a token that went away


def test_a_signing_key_does_not_decrypt(runtime: Runtime) -> None:
    signing = runtime.keys.generate("signing", KeySpec.parse("rsa:2048"))
    with pytest.raises(MechanismError, match="may not decrypt"):
        TokenDecryptor(runtime.keys).decrypt_oaep_sha256(str(signing.uri), b"\0" * 256)


def _raw_open(ciphertext: bytes) -> bytes:
    numbers = _SOFTWARE_KEY.private_numbers()
    value = pow(int.from_bytes(ciphertext, "big"), numbers.d, numbers.public_numbers.n)
    return value.to_bytes(256, "big")


@given(st.binary(max_size=190))
def test_local_oaep_decoding_matches_cryptography(message: bytes) -> None:
    encoded = _raw_open(_SOFTWARE_KEY.public_key().encrypt(message, OAEP_256))
    assert oaep_sha256_decode(encoded, 256) == message


@given(st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=7))
def test_local_oaep_decoding_refuses_any_changed_byte(position: int, bit: int) -> None:
    encoded = bytearray(_raw_open(_SOFTWARE_KEY.public_key().encrypt(b"secret", OAEP_256)))
    encoded[position] ^= 1 << bit
    with pytest.raises(DecryptionError):
        oaep_sha256_decode(bytes(encoded), 256)
