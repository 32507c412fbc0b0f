"""JOSE on the token: JWS, JWK/JWKS, client assertions and request objects.

Every function takes the :class:`~pkcs11_backends.keys.KeyStore` and the :class:`~agent.config.Config`; keys are
named by alias or ``pkcs11:`` URI. The daemon and the CLI call these and nothing below them.

What others sign or encrypt is read by :mod:`agent.jose.verify` (a bank's JWS) and :mod:`agent.jose.jwe` (JWE to a
bank's key, or from a bank to ours, unwrapped on the token): sans-I/O, on jwcrypto.
"""

from agent.jose.assertions import (
    CLIENT_ASSERTION_TYPE,
    AuthorizationRequest,
    JoseSettings,
    check_client_assertion,
    check_request_object,
    client_assertion,
    request_object,
)
from agent.jose.errors import AlgorithmNotAllowedError, ClaimsError, JoseError, KidError
from agent.jose.jwk import jwks, to_jwk
from agent.jose.jws import sign_claims, sign_jws
from agent.jose.keys import JoseKey, resolve

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "AlgorithmNotAllowedError",
    "AuthorizationRequest",
    "ClaimsError",
    "JoseError",
    "JoseKey",
    "JoseSettings",
    "KidError",
    "check_client_assertion",
    "check_request_object",
    "client_assertion",
    "jwks",
    "request_object",
    "resolve",
    "sign_claims",
    "sign_jws",
    "to_jwk",
]
