"""Key kinds and the signature algorithms the token is asked for (``keys``, ``signing`` and the agent share them)."""

from __future__ import annotations

import enum

from pkcs11_backends.errors import MechanismError


class KeyKind(enum.Enum):
    RSA = "rsa"
    EC = "ec"


class SignatureScheme(enum.Enum):
    """Signature algorithms the token is asked for; output is what the standard wants raw.

    ECDSA signatures come back as raw ``r||s`` (JWS form); X.509 callers convert to DER.
    """

    RSA_PKCS1_SHA256 = ("RS256", KeyKind.RSA, "sha256")
    RSA_PSS_SHA256 = ("PS256", KeyKind.RSA, "sha256")
    ECDSA_SHA256 = ("ES256", KeyKind.EC, "sha256")
    ECDSA_SHA384 = ("ES384", KeyKind.EC, "sha384")

    def __init__(self, jose_name: str, kind: KeyKind, hash_name: str) -> None:
        self.jose_name = jose_name
        self.kind = kind
        self.hash_name = hash_name

    @classmethod
    def from_jose(cls, name: str) -> SignatureScheme:
        scheme = _BY_JOSE_NAME.get(name)
        if scheme is not None:
            return scheme
        raise MechanismError(f"unsupported signature algorithm {name!r}", hint="use PS256, ES256, ES384 or RS256")


_BY_JOSE_NAME = {scheme.jose_name: scheme for scheme in SignatureScheme}
