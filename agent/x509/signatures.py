"""Signature algorithms of X.509 objects: identifiers for what the token signs, checks in software.

The checks use pyca/cryptography directly on the signed bytes, so they work for
every scheme we emit (RSASSA-PSS included) whatever the installed version supports
in its X.509 layer.
"""

from __future__ import annotations

import enum

from asn1crypto import algos, core, keys
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.errors import InputError
from pkcs11_backends.keys import KeyKind, SignatureScheme

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
PSS_SALT_LENGTH = 32  # what the token uses for PS256 (CKM_SHA256_RSA_PKCS_PSS with sLen = hLen)


class CsrAlgorithm(enum.Enum):
    """What ``tpp-agent csr --alg`` offers; ``ecdsa`` takes the hash that matches the curve."""

    RSA_PKCS1 = "rsa-pkcs1"
    RSA_PSS = "rsa-pss"
    ECDSA = "ecdsa"
    ECDSA_SHA256 = "ecdsa-sha256"
    ECDSA_SHA384 = "ecdsa-sha384"

    @classmethod
    def parse(cls, text: str) -> CsrAlgorithm:
        for alg in cls:
            if alg.value == text.lower():
                return alg
        raise InputError(f"unknown signature algorithm {text!r}",
                         hint="use one of " + ", ".join(a.value for a in cls))

    def scheme_for(self, spki: keys.PublicKeyInfo) -> SignatureScheme:
        kind = KeyKind.RSA if spki.algorithm == "rsa" else KeyKind.EC
        wanted = KeyKind.RSA if self in (CsrAlgorithm.RSA_PKCS1, CsrAlgorithm.RSA_PSS) else KeyKind.EC
        if kind is not wanted:
            raise InputError(f"--alg {self.value} needs an {wanted.name} key; this key is {kind.name}",
                             hint="use rsa-pkcs1 or rsa-pss with RSA keys, ecdsa with EC keys")
        if self is CsrAlgorithm.RSA_PKCS1:
            return SignatureScheme.RSA_PKCS1_SHA256
        if self is CsrAlgorithm.RSA_PSS:
            return SignatureScheme.RSA_PSS_SHA256
        if self is CsrAlgorithm.ECDSA_SHA256 or (self is CsrAlgorithm.ECDSA and spki.curve[1] == "secp256r1"):
            return SignatureScheme.ECDSA_SHA256
        return SignatureScheme.ECDSA_SHA384

    @classmethod
    def default_for(cls, spki: keys.PublicKeyInfo) -> CsrAlgorithm:
        return cls.RSA_PKCS1 if spki.algorithm == "rsa" else cls.ECDSA


def algorithm_identifier(scheme: SignatureScheme) -> algos.SignedDigestAlgorithm:
    """The AlgorithmIdentifier for a scheme, encoded as ``openssl req`` encodes it."""
    if scheme is SignatureScheme.RSA_PKCS1_SHA256:
        # RFC 4055: the parameters of sha256WithRSAEncryption MUST be NULL.
        return algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa", "parameters": core.Null()})
    if scheme is SignatureScheme.RSA_PSS_SHA256:
        sha256 = {"algorithm": "sha256", "parameters": core.Null()}
        return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": {
            "hash_algorithm": sha256,
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": sha256},
            "salt_length": PSS_SALT_LENGTH,
        }})
    # RFC 5758: ecdsa-with-SHA256/384 have absent parameters.
    return algos.SignedDigestAlgorithm({"algorithm": f"{scheme.hash_name}_ecdsa"})


def der_signature(scheme: SignatureScheme, raw: bytes) -> bytes:
    """X.509 wants ECDSA signatures as DER ``Ecdsa-Sig-Value``; the token gives raw ``r||s``."""
    if scheme.kind is KeyKind.EC:
        return bytes(algos.DSASignature.from_p1363(raw).dump())
    return raw


def load_public_key(spki: keys.PublicKeyInfo) -> PublicKey:
    try:
        key = serialization.load_der_public_key(spki.dump())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"unsupported public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise InputError(f"unsupported public key type {spki.algorithm!r}", hint="only RSA and EC keys are supported")
    return key


def same_public_key(a: keys.PublicKeyInfo, b: keys.PublicKeyInfo) -> bool:
    """Compares the keys, not their encodings (an EC point may be compressed in one of them)."""
    key_a, key_b = load_public_key(a), load_public_key(b)
    if isinstance(key_a, rsa.RSAPublicKey) and isinstance(key_b, rsa.RSAPublicKey):
        return key_a.public_numbers() == key_b.public_numbers()
    if isinstance(key_a, ec.EllipticCurvePublicKey) and isinstance(key_b, ec.EllipticCurvePublicKey):
        return (key_a.curve.name == key_b.curve.name
                and key_a.public_numbers() == key_b.public_numbers())
    return False


def is_valid(spki: keys.PublicKeyInfo, algorithm: algos.SignedDigestAlgorithm, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies under the public key; False for unknown algorithms."""
    key = load_public_key(spki)
    try:
        hash_class = _HASHES.get(algorithm.hash_algo)
        if hash_class is None:
            return False
        if algorithm.signature_algo == "rsassa_pss" and isinstance(key, rsa.RSAPublicKey):
            params = algorithm["parameters"]
            mgf_hash = _HASHES[params["mask_gen_algorithm"]["parameters"]["algorithm"].native]
            key.verify(signature, data, padding.PSS(padding.MGF1(mgf_hash()), params["salt_length"].native),
                       hash_class())
        elif algorithm.signature_algo == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hash_class())
        elif algorithm.signature_algo == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hash_class()))
        else:
            return False
    except (InvalidSignature, KeyError, ValueError):
        return False
    return True
