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
