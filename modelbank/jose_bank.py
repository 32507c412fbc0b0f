"""The model bank's own JOSE: its keys, its JWKS at ``/jwks``, what it signs and what it encrypts or decrypts.

Test infrastructure. The bank's private keys are test data made in memory (never written anywhere). It uses
libraries the agent does not use for the same job, so that a test reading back what the agent made, or the agent
reading what the bank made, crosses two implementations:

* signing (answers, id_tokens, events): PyJWT, PS256;
* encrypting events to the TPP: jwcrypto (the agent decrypts with the token and its own A256GCM step);
* decrypting what the TPP encrypted (personal data): ``cryptography`` by hand (the agent encrypts with jwcrypto).

``rotate()`` publishes a new signing key and signs with it from then on (the old one stays published);
``unpublished`` is a key whose signatures no JWKS ever lists: the unknown-``kid`` case.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk

from modelbank.reply import Reply

JWKS_PATH = "/jwks"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclasses.dataclass(frozen=True)
class BankKey:
    kid: str
    private: rsa.RSAPrivateKey
    use: str

    @classmethod
    def new(cls, use: str) -> BankKey:
        return cls(f"{use}-{uuid.uuid4().hex[:12]}", rsa.generate_private_key(public_exponent=65537, key_size=2048),
                   use)

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        alg = "PS256" if self.use == "sig" else "RSA-OAEP-256"
        return {"kty": "RSA", "n": jwk["n"], "e": jwk["e"], "kid": self.kid, "use": self.use, "alg": alg}


class BankJose:
    """Keys and JOSE operations of one model bank; ``handle`` serves ``GET /jwks`` (counted in ``jwks_fetches``)."""

    def __init__(self) -> None:
        self.signing = BankKey.new("sig")
        self.published: list[BankKey] = [self.signing, BankKey.new("enc")]
        self.unpublished = BankKey.new("sig")
        self.jwks_fetches = 0
        self.jwks_padding = 0  # bytes of junk in the published JWKS (an oversized set, for the negative tests)
        self._lock = threading.Lock()

    @property
    def encryption(self) -> BankKey:
        return next(k for k in self.published if k.use == "enc")

    def jwks(self) -> dict[str, Any]:
        keys = [k.public_jwk() for k in self.published]
        if self.jwks_padding:
            keys.append({"kty": "oct", "kid": "padding", "use": "sig", "k": "A" * self.jwks_padding})
        return {"keys": keys}

    def rotate(self) -> BankKey:
        """A new signing key, published and used from now on."""
        fresh = BankKey.new("sig")
        with self._lock:
            self.published.insert(0, fresh)
            self.signing = fresh
        return fresh

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes,
               cert: bytes | None) -> Reply | None:
        if (method, path.split("?", 1)[0]) != ("GET", JWKS_PATH):
            return None
        with self._lock:
            self.jwks_fetches += 1
        return Reply.json(200, self.jwks())

    # -- signing ---------------------------------------------------------------------
    def sign(self, claims: dict[str, Any], *, key: BankKey | None = None, corrupt: bool = False,
             header: dict[str, Any] | None = None) -> str:
        """A PS256 JWS of ``claims``; ``corrupt`` flips one bit of the signature (a forged answer)."""
        chosen = key or self.signing
        token = jwt.encode(claims, chosen.private, algorithm="PS256", headers={"kid": chosen.kid, **(header or {})})
        if not corrupt:
            return token
        head, payload, signature = token.split(".")
        raw = bytearray(_unb64(signature))
        raw[len(raw) // 2] ^= 0x01
        return f"{head}.{payload}.{_b64(bytes(raw))}"

    # -- encryption ------------------------------------------------------------------
    @staticmethod
    def encrypt_to(recipient: dict[str, Any], plaintext: bytes, *, cty: str = "JWT") -> str:
        """A compact JWE (RSA-OAEP-256, A256GCM) to a TPP's public encryption JWK, made by jwcrypto."""
        key = jwcrypto_jwk.JWK(**{k: recipient[k] for k in ("kty", "n", "e", "kid") if k in recipient})
        protected = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "cty": cty, "kid": recipient.get("kid")}
        token = jwcrypto_jwe.JWE(plaintext, protected=json.dumps(protected))
        token.add_recipient(key)
        compact: str = token.serialize(compact=True)
        return compact

    def decrypt(self, token: str) -> tuple[dict[str, Any], bytes]:
        """Header and plaintext of a JWE the TPP encrypted to this bank's ``use: enc`` key (checked strictly)."""
        parts = token.split(".")
        if len(parts) != 5:
            raise ValueError("not a compact JWE")
        header = json.loads(_unb64(parts[0]))
        if header.get("alg") != "RSA-OAEP-256" or header.get("enc") != "A256GCM":
            raise ValueError(f"alg/enc {header.get('alg')}/{header.get('enc')} refused")
        if header.get("kid") != self.encryption.kid:
            raise ValueError(f"kid {header.get('kid')!r} is not the bank's encryption key")
        encrypted_key, iv, ciphertext, tag = (_unb64(p) for p in parts[1:])
        cek = self.encryption.private.decrypt(
            encrypted_key, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        plaintext = AESGCM(cek).decrypt(iv, ciphertext + tag, parts[0].encode("ascii"))
        return header, plaintext
