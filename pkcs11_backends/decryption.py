"""RSA-OAEP-256 decryption on the token, for key pairs made for encryption (decrypt-only).

One operation is offered: :meth:`TokenDecryptor.decrypt_oaep_sha256` (RSAES-OAEP, SHA-256, MGF1-SHA-256, empty
label: what JWE ``RSA-OAEP-256`` is). How the token does it is chosen per key by a probe, from :data:`ROUTES`:

* ``CKM_RSA_PKCS_OAEP`` with SHA-256 parameters, when the module accepts them;
* else ``CKM_RSA_X_509`` (raw RSA) on the token and the OAEP decoding here. SoftHSM2 2.6.1 needs this: it
  refuses OAEP with SHA-256 (``CKR_ARGUMENTS_BAD``). The raw result is decoded at once and never leaves this
  module: no caller can ask for a raw RSA operation.

Every failure (bad padding, wrong length, a ciphertext made for another key) is the same
:class:`DecryptionError` with the same text: an attacker must not learn which check failed (Manger's attack on
OAEP needs exactly that oracle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import threading
from typing import Any, cast

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.mechanisms import MGF
from pkcs11.types import DecryptMixin

from pkcs11_backends.errors import KeySpecError, MechanismError, Pkcs11Error
from pkcs11_backends.keys import KeyInfo, KeyKind, KeySpec, KeyStore
from pkcs11_backends.sessions import PooledSession
from pkcs11_backends.uri import Pkcs11Uri

_HASH_LEN = 32  # SHA-256

# Decrypt-only: the private half may only decrypt (never sign, unwrap or derive), the public half only encrypt.
ENCRYPTION_PRIVATE_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: False,
    Attribute.DECRYPT: True,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# Public templates, tried in order. The public object's usage flags are never used (the bank encrypts with the
# certificate's key, off the token), but modules differ in what they accept: tpm2-pkcs11 makes one TPM object of
# both halves and wants public CKA_VERIFY equal to private CKA_DECRYPT, public CKA_ENCRYPT to private CKA_SIGN.
ENCRYPTION_PUBLIC_TEMPLATES = (
    {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: False, Attribute.ENCRYPT: True,
     Attribute.WRAP: False},
    {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
     Attribute.WRAP: False},
)
# What C_GenerateKeyPair answers for "not this template" (tpm2-pkcs11: CKR_GENERAL_ERROR).
_TEMPLATE_REFUSED = (pkcs11.exceptions.TemplateInconsistent, pkcs11.exceptions.TemplateIncomplete,
                     pkcs11.exceptions.AttributeValueInvalid, pkcs11.exceptions.AttributeTypeInvalid,
                     pkcs11.exceptions.AttributeReadOnly, pkcs11.exceptions.GeneralError,
                     pkcs11.exceptions.FunctionFailed)


class DecryptionError(Pkcs11Error):
    hint = "the message was not encrypted to this key, or it was damaged; ask the sender to encrypt it again"


@dataclasses.dataclass(frozen=True)
class OaepRoute:
    """One way to get RSA-OAEP-256 out of a module."""

    name: str
    mechanism: Mechanism
    parameter: tuple[Any, ...] | None
    decode_here: bool  # the token returns the raw RSA result; the OAEP decoding happens in this module


ROUTES = (
    OaepRoute("CKM_RSA_PKCS_OAEP (SHA-256, MGF1-SHA-256)", Mechanism.RSA_PKCS_OAEP,
              (Mechanism.SHA256, MGF.SHA256, None), decode_here=False),
    OaepRoute("CKM_RSA_X_509 with OAEP decoding in the agent", Mechanism.RSA_X_509, None, decode_here=True),
)

# What a module says when it does not do a route (SoftHSM2: ArgumentsBad for OAEP with SHA-256).
_UNSUPPORTED = (pkcs11.exceptions.MechanismInvalid, pkcs11.exceptions.MechanismParamInvalid,
                pkcs11.exceptions.ArgumentsBad, pkcs11.exceptions.FunctionNotSupported,
                pkcs11.exceptions.KeyTypeInconsistent, pkcs11.exceptions.FunctionFailed)


def generate_encryption_key(store: KeyStore, label: str, spec: KeySpec, key_id: bytes | None = None) -> KeyInfo:
    """A decrypt-only RSA key pair on the token (the TPP's encryption certificate key)."""
    if spec.kind is not KeyKind.RSA:
        raise KeySpecError(f"an encryption key must be RSA (JWE RSA-OAEP-256), not {spec}",
                           hint="pass --type rsa:2048 (or rsa:3072, rsa:4096)")
    if not label or len(label.encode("utf-8")) > 128:
        raise KeySpecError("a key label must be 1 to 128 bytes", hint="pass --label NAME")
    key_id = key_id if key_id is not None else os.urandom(8)
    store.check_free(label, key_id)
    refused: list[str] = []
    with store.pool.session() as pooled:
        for public_template in ENCRYPTION_PUBLIC_TEMPLATES:
            try:
                pooled.session.generate_keypair(KeyType.RSA, spec.bits, label=label, id=key_id, store=True,
                                                public_template=public_template,
                                                private_template=ENCRYPTION_PRIVATE_TEMPLATE)
                break
            except _TEMPLATE_REFUSED as exc:  # caught here: the pool must not take it for a token gone away
                refused.append(type(exc).__name__)
        else:
            raise KeySpecError(f"the module refused every decrypt-only key template ({', '.join(refused)})",
                               hint="the module may not allow RSA keys that only decrypt; see docs/consent-flow.md")
    return store.info(str(store.uri_for(label, key_id)))


class TokenDecryptor:
    """RSA-OAEP-256 with the token's encryption keys; the route per key is probed once and kept."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._routes: dict[str, OaepRoute] = {}  # key URI → the route its module accepted (bounded by the keys)
        self._lock = threading.Lock()

    def route(self, name: str | Pkcs11Uri) -> OaepRoute:
        """The route this key's module takes (probing it on first use): for ``doctor`` and the logs."""
        uri = self._uri(name)
        with self._lock:
            known = self._routes.get(str(uri))
        if known is not None:
            return known
        chosen = self._probe(uri)
        with self._lock:
            self._routes[str(uri)] = chosen
        return chosen

    def decrypt_oaep_sha256(self, name: str | Pkcs11Uri, ciphertext: bytes) -> bytes:
        """The plaintext of an RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label) ciphertext, decrypted on the token."""
        uri = self._uri(name)
        route = self.route(uri)
        modulus = self._modulus(uri)
        size = (modulus.bit_length() + 7) // 8
        # Checked here, not by the token: SoftHSM2 answers CKR_GENERAL_ERROR to a raw RSA input >= n, which
        # must not reach the pool as "the token stopped answering" (a sender could make the agent recover).
        if len(ciphertext) != size or int.from_bytes(ciphertext, "big") >= modulus:
            raise _refused()
        return self._decrypt(uri, route, ciphertext, size)

    # -- internals ---------------------------------------------------------------------
    def _uri(self, name: str | Pkcs11Uri) -> Pkcs11Uri:
        return name if isinstance(name, Pkcs11Uri) else self.store.resolve(name)

    def _modulus(self, uri: Pkcs11Uri) -> int:
        spki = self.store.public_key_info(str(uri))
        if spki.algorithm != "rsa":
            raise MechanismError(f"{uri} is not an RSA key: RSA-OAEP-256 needs one")
        modulus: int = spki["public_key"].parsed["modulus"].native
        return modulus

    def _decrypt(self, uri: Pkcs11Uri, route: OaepRoute, ciphertext: bytes, size: int) -> bytes:
        def run(pooled: PooledSession) -> bytes:
            key = cast(DecryptMixin, self.store.private_key(pooled, uri))
            if not key[Attribute.DECRYPT]:
                raise MechanismError(f"{uri} may not decrypt (CKA_DECRYPT is false): it is not an encryption key",
                                     hint="name the key made for encryption "
                                          "(`tpp-agent keys generate --purpose encryption`)")
            try:
                plain = key.decrypt(ciphertext, mechanism=route.mechanism, mechanism_param=route.parameter)
                return cast(bytes, plain)  # one buffer in, one out: python-pkcs11 yields chunks only for iterables
            except (pkcs11.exceptions.EncryptedDataInvalid, pkcs11.exceptions.EncryptedDataLenRange,
                    pkcs11.exceptions.DataLenRange, pkcs11.exceptions.DataInvalid,
                    pkcs11.exceptions.FunctionFailed, pkcs11.exceptions.ArgumentsBad):
                raise _refused() from None

        result = self.store.pool.call(run)
        if not route.decode_here:
            return result
        # Some modules drop the leading zero bytes of the raw result.
        return oaep_sha256_decode(result.rjust(size, b"\0"), size)

    def _probe(self, uri: Pkcs11Uri) -> OaepRoute:
        """The first route whose decryption of a fresh test message gives the message back."""
        spki = self.store.public_key_info(str(uri))
        numbers = spki["public_key"].parsed
        public = rsa.RSAPublicNumbers(numbers["public_exponent"].native, numbers["modulus"].native).public_key()
        secret = os.urandom(_HASH_LEN)
        test = public.encrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        size = (public.key_size + 7) // 8
        tried = []
        for route in ROUTES:
            try:
                if hmac.compare_digest(self._decrypt(uri, route, test, size), secret):
                    return route
            except (DecryptionError, *_UNSUPPORTED) as exc:
                tried.append(f"{route.name}: {type(exc).__name__}")
        raise MechanismError(f"the module cannot decrypt RSA-OAEP-256 with {uri} ({'; '.join(tried)})",
                             hint="check that the key was made for encryption (CKA_DECRYPT) and that the module "
                                  "offers CKM_RSA_PKCS_OAEP with SHA-256 or CKM_RSA_X_509")


def _refused() -> DecryptionError:
    return DecryptionError("cannot decrypt: not an RSA-OAEP-256 ciphertext for this key")


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    blocks = (hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
              for counter in range((length + _HASH_LEN - 1) // _HASH_LEN))
    return b"".join(blocks)[:length]


def oaep_sha256_decode(encoded: bytes, size: int) -> bytes:
    """EME-OAEP decoding (RFC 8017 §7.1.2 step 3) with SHA-256 and an empty label.

    Every check runs whatever the others found, and only one error comes out, so neither the time taken (as far
    as Python allows) nor the answer tells which one failed.
    """
    if len(encoded) != size or size < 2 * _HASH_LEN + 2:
        raise _refused()
    masked_seed, masked_db = encoded[1:1 + _HASH_LEN], encoded[1 + _HASH_LEN:]
    seed = bytes(a ^ b for a, b in zip(masked_seed, _mgf1_sha256(masked_db, _HASH_LEN), strict=True))
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1_sha256(seed, len(masked_db)), strict=True))
    bad = encoded[0]  # Y must be zero
    bad |= int(not hmac.compare_digest(db[:_HASH_LEN], hashlib.sha256(b"").digest()))
    # After lHash: zero bytes, then 0x01, then the message. Walk all of it with no data-dependent branch.
    found = 0
    start = 0
    for index in range(_HASH_LEN, len(db)):
        byte = db[index]
        is_one = int(byte == 1)
        is_zero = int(byte == 0)
        first = is_one & (1 - found)
        start |= index * first  # start is 0 until the separator; index * 1 sets it once
        bad |= (1 - found) & (1 - is_one) & (1 - is_zero)  # a non-zero byte before the separator
        found |= is_one
    bad |= 1 - found
    if bad:
        raise _refused()
    return db[start + 1:]
