"""Errors of the JOSE layer: each refuses before anything is signed and says what to change."""

from __future__ import annotations

from agent.errors import AgentError


class JoseError(AgentError):
    hint = "see the [keys.ALIAS] and [jose] settings in config.example.toml"


class AlgorithmNotAllowedError(JoseError):
    """The key may not sign with this algorithm (policy), or cannot (wrong key type or curve)."""


class KidError(JoseError):
    hint = "set [keys.ALIAS] kid to a literal value, \"x5t#S256\" (needs a certificate on the token) or \"thumbprint\""


class ClaimsError(JoseError):
    """Claims that break the ecosystem's rules; nothing was signed."""

    hint = "fix the claims (or the [jose] settings); the agent never signs a JWT that a bank must refuse"


# -- what the bank signs or encrypts, refused ------------------------------------------------------
# One class per reason, so that a caller (and a test) can tell a forged answer from an expired one.

class VerificationError(JoseError):
    """A JWS or JWE from the bank did not pass; nothing from it may be used."""

    hint = "do not act on this message; the x-fapi-interaction-id lets the bank find it in its logs"


class MalformedError(VerificationError):
    """Not a compact JWS/JWE, or its header or payload is not a JSON object."""


class AlgorithmRefusedError(VerificationError):
    """An algorithm the UAE profile does not allow (JWS: PS256 only; JWE: RSA-OAEP-256 with A256GCM)."""


class UnknownKidError(VerificationError):
    """The ``kid`` is not in the bank's JWKS, even after fetching it again once."""

    hint = "the bank signed with a key it does not publish: ask the bank, or check jwks_uri in its discovery document"


class SignatureInvalidError(VerificationError):
    """The signature does not verify with the bank's key of that ``kid``."""


class ClaimRejectedError(VerificationError):
    """A claim is missing or wrong; the subclasses say which check failed."""


class WrongIssuerError(ClaimRejectedError):
    pass


class WrongAudienceError(ClaimRejectedError):
    pass


class ExpiredError(ClaimRejectedError):
    hint = "the message is past its exp: ask for a new one (and check this host's clock)"


class NotYetValidError(ClaimRejectedError):
    hint = "the message's nbf/iat is in the future: check this host's clock"


class NonceMismatchError(ClaimRejectedError):
    hint = "the id_token was not issued for this authorization request: start the consent again"


class ReplayError(ClaimRejectedError):
    """The ``jti`` was seen before: the same message delivered twice (or replayed by someone else)."""

    hint = "nothing to do: the first delivery was already accepted"


class WrongRecipientError(VerificationError):
    """A JWE encrypted to another key than ours (its ``kid`` names another key)."""

    hint = "the sender used another encryption key: check which encryption certificate the directory publishes"


class DecryptionFailedError(VerificationError):
    """The JWE names our key but does not decrypt (damaged, or the key does not match)."""


class JwksError(JoseError):
    """The bank's JWKS could not be fetched or read."""

    hint = "check jwks_uri in the bank's discovery document and that the bank serves it"
