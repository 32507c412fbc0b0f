"""Why an operation was refused before it ran: the caller's grant, the key's purpose, the resource's existence."""

from __future__ import annotations

from agent.errors import AgentError


class PolicyDenied(AgentError):
    """The peer is not allowed; ``str()`` says what is missing, ``hint`` how to add it."""


class KeyPurposeError(AgentError):
    """The key exists, but its purpose (``[keys.ALIAS] purpose``) forbids this operation for any caller."""

    hint = "each key is used for its purpose only: use a key whose purpose fits (see [keys.ALIAS] purpose)"


class UnknownKeyError(AgentError):
    """No ``[keys.ALIAS]`` of that name."""


class NotReadyError(AgentError):
    hint = "see the agent's log; it recovers by itself"
