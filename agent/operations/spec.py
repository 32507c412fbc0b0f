"""What an operation is, as data: its name, what it acts on, who may ask, the key purposes it needs.

Every capability of the agent is one :class:`Spec` (see :mod:`agent.operations.registry`); the socket's router
and the CLI run them through :func:`agent.operations.core.execute`, so both give the same answer.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent.config import KeyPurpose

if TYPE_CHECKING:
    from agent.operations.core import Context


class Operation(enum.StrEnum):
    """The names ``[policy.rules.*] operations`` grant, the audit trail records and the request log shows."""

    HEALTH = "health"
    READY = "ready"
    KEYS = "keys"
    PUBLIC = "public"
    SIGN = "sign"
    JWS = "jws"
    CSR = "csr"
    DISCOVERY = "discovery"
    REGISTER = "register"
    CLIENT_ASSERTION = "client_assertion"
    TOKEN = "token"
    PAR = "par"
    FORWARD = "forward"
    CONSENT_CALLBACK = "consent_callback"
    CONSENT_REFRESH = "consent_refresh"
    VERIFY = "verify"
    SIGNED_BODY = "signed_body"
    ENCRYPT_PERSONAL_DATA = "encrypt_personal_data"
    RECEIVE_EVENT = "receive_event"
    METRICS = "metrics"
    ROTATE = "rotate"  # every rotation step: admins only
    ROTATION_STATUS = "rotation_status"
    REGISTER_ALL = "register_all"
    DIRECTORY = "directory"


class Resource(enum.Enum):
    """What an operation acts on, named in its path: the router checks that it is configured."""

    NONE = "none"
    KEY = "key"    # one configured key alias
    KEYS = "keys"  # the configured keys the caller may see (a listing)
    BANK = "bank"  # one [banks.NAME]


class Access(enum.Enum):
    OPEN = "open"    # anyone who can reach the socket (health, ready)
    RULE = "rule"    # a [policy.rules.*] entry, or an admin
    ADMIN = "admin"  # admins only


In = TypeVar("In")


@dataclasses.dataclass(frozen=True)
class Spec(Generic[In]):
    """One operation: declared once, run by the router (socket) and the CLI's in-process path alike."""

    name: str  # unique; several specs may share an operation (public: one key's public half, and the JWKS)
    operation: Operation
    summary: str
    resource: Resource
    input: type[In]  # a dataclass parsed strictly from JSON (agent.operations.inputs)
    run: Callable[[Context, In], Any]  # the work: returns JSON-ready data
    access: Access = Access.RULE
    purposes: frozenset[KeyPurpose] = frozenset()  # KEY/KEYS resources: the purposes a key must have
    raw_sign: bool = False  # the key must also declare raw_sign = true
    calls_bank: bool = False  # may call a bank: the server runs it on the bank workers
    # The answer's shape: a TypedDict or dataclass (agent/operations/results.py), documented in docs/openapi.json.
    # Optional here only so that a Spec without one still imports: tests/daemon/test_openapi.py fails on it.
    result: Any = None

    def refusal(self, purpose: KeyPurpose, raw_sign: bool) -> str | None:
        """Why a key of ``purpose`` may not be used by this operation, or None when it may."""
        if self.resource not in (Resource.KEY, Resource.KEYS):
            return None
        if purpose not in self.purposes:
            allowed = ", ".join(sorted(p.value for p in self.purposes))
            return f"its purpose is {purpose.value!r}; {self.operation.value} is for {allowed} keys only"
        if self.raw_sign and not raw_sign:
            return "it does not declare raw_sign = true"
        return None
