"""Compact JWE (RFC 7516) as the UAE profile uses it: ``RSA-OAEP-256`` key wrapping, ``A256GCM`` content.

* :func:`encrypt` — to a bank's public ``use: enc`` key, with jwcrypto (a public-key operation: no token needed).
* :func:`decrypt` — a JWE addressed to one of *our* keys (:class:`Recipient`: more than one while a rotation
  publishes two, or keeps a retired one for the events still in flight). The header's ``kid`` names the key; the
  content-encryption key is unwrapped by that key's ``unwrap`` (the token: ``pkcs11_backends.decryption``), the
  A256GCM step is done here with the CEK in memory for one call. jwcrypto cannot be used for this half: it wants
  the private key as a JWK.

Only the compact form, only these two algorithms, no ``zip``: anything else is refused before the token is asked.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from agent.jose.encoding import b64url_decode, compact_json
from agent.jose.errors import (
    AlgorithmRefusedError,
    DecryptionFailedError,
    JoseError,
    MalformedError,
    WrongRecipientError,
)
from agent.jose.verify import unverified_header
from pkcs11_backends.decryption import DecryptionError

KEY_ALGORITHM = "RSA-OAEP-256"
CONTENT_ALGORITHM = "A256GCM"
_CEK_BYTES = 32
_IV_BYTES = 12
_TAG_BYTES = 16
# Header members the caller may add; alg/enc/kid are the agent's, zip is never used (compression oracles).
_CALLER_HEADERS = frozenset({"cty", "typ"})


@dataclasses.dataclass(frozen=True)
class Recipient:
    """One of our keys a JWE may be encrypted to: the ``kid`` we publish it under, and its unwrapping on the token."""

    kid: str
    unwrap: Callable[[bytes], bytes] = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Decrypted:
    header: dict[str, Any]
    plaintext: bytes = dataclasses.field(repr=False)
    kid: str = ""  # the recipient key that decrypted it


def encrypt(plaintext: bytes, recipient: jwcrypto_jwk.JWK, *, header: Mapping[str, Any] | None = None) -> str:
    """``plaintext`` encrypted to ``recipient`` (an RSA public JWK with a ``kid``)."""
    extra = dict(header or {})
    unknown = sorted(set(extra) - _CALLER_HEADERS)
    if unknown:
        raise JoseError(f"JWE header member(s) {', '.join(unknown)} are not allowed",
                        hint=f"only {', '.join(sorted(_CALLER_HEADERS))} may be set; alg, enc and kid are the agent's")
    if recipient.get("kty") != "RSA":
        raise JoseError(f"the recipient key {recipient.get('kid')!r} is not RSA: RSA-OAEP-256 needs an RSA key")
    protected = {"alg": KEY_ALGORITHM, "enc": CONTENT_ALGORITHM, "kid": recipient.get("kid"), **extra}
    token = jwcrypto_jwe.JWE(plaintext, protected=compact_json(protected).decode("utf-8"))
    token.allowed_algs = [KEY_ALGORITHM, CONTENT_ALGORITHM]
    token.add_recipient(recipient)
    compact: str = token.serialize(compact=True)
    return compact


def decrypt(token: str, recipients: Sequence[Recipient]) -> Decrypted:
    """The plaintext of a JWE encrypted to one of our keys ``recipients`` (the one encrypted to first).

    The header's ``kid`` names the key (RFC 7516 §4.1.6); one that names none of ours is
    :class:`WrongRecipientError`. A JWE without ``kid`` (it is optional) is tried with each key in turn: a bank
    that leaves it out must not lose its events while a rotation publishes two keys. A CEK that does not unwrap
    is not reported as such: a random CEK is used instead (RFC 7516 §11.5), so every failure is the same
    :class:`DecryptionFailedError` as for damaged content and the token cannot be used as a padding oracle; trying
    the next key on every failure keeps that (only a JWE made by whoever knows its CEK stops early).
    """
    if not recipients:
        raise JoseError("JWE: no key of ours to decrypt with")
    header = unverified_header(token, "JWE")
    parts = token.split(".")
    if len(parts) != 5:
        raise MalformedError("JWE: a compact JWE has five dot-separated parts")
    if header.get("alg") != KEY_ALGORITHM or header.get("enc") != CONTENT_ALGORITHM:
        raise AlgorithmRefusedError(f"JWE: alg {header.get('alg')!r} / enc {header.get('enc')!r}; only "
                                    f"{KEY_ALGORITHM} / {CONTENT_ALGORITHM} are accepted")
    if "zip" in header or "crit" in header:
        raise AlgorithmRefusedError("JWE: zip and crit are not accepted")
    chosen = list(recipients)
    if "kid" in header:
        chosen = [r for r in recipients if r.kid == header["kid"]]
        if not chosen:
            ours = ", ".join(repr(r.kid) for r in recipients)
            raise WrongRecipientError(f"JWE: encrypted to key {header['kid']!r}, which is not one of ours ({ours})")
    try:
        encrypted_key, iv, ciphertext, tag = (b64url_decode(p) for p in parts[1:])
    except ValueError:
        raise MalformedError("JWE: a part is not base64url") from None
    if len(iv) != _IV_BYTES or len(tag) != _TAG_BYTES:
        raise MalformedError(f"JWE: A256GCM needs a {_IV_BYTES}-byte iv and a {_TAG_BYTES}-byte tag")
    for recipient in chosen:
        try:
            cek = recipient.unwrap(encrypted_key)
        except DecryptionError:  # only this one: a token that is away must not look like a bad message
            cek = b""
        if len(cek) != _CEK_BYTES:
            cek = os.urandom(_CEK_BYTES)
        try:
            # The AAD is the protected header exactly as received (RFC 7516 §5.2 step 14), not re-encoded.
            plaintext = AESGCM(cek).decrypt(iv, ciphertext + tag, parts[0].encode("ascii"))
        except InvalidTag:
            continue
        return Decrypted(header, plaintext, recipient.kid)
    raise DecryptionFailedError("JWE: does not decrypt with our key (damaged, or encrypted to another key)",
                                hint="ask the sender to send it again")
