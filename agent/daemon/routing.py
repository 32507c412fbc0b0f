"""The router: serves the socket's routes (agent/daemon/routes.py), each mapped to one operation (agent/operations/).

Built at start-up, it does for every route what no handler repeats: it sets the log fields, checks the
caller's grant (deny by default: only ``health`` and ``ready`` are open) and audits a refusal, then hands the
request's input to :func:`agent.operations.core.execute`, which checks the key or bank and its purpose and runs
the operation with its key uses audited for the caller.

Errors carry a stable ``code`` (clients branch on it), a ``message``, a ``hint`` and the ``interaction_id`` that
the request log line also carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.audit import AuditError, KeyUse
from agent.daemon.app import Agent
from agent.daemon.http import HttpError, Request, Response
from agent.daemon.policy import Peer, Policy
from agent.daemon.routes import ROUTES, Route, RouteTable
from agent.directory.client import DirectoryError, DirectoryServerError
from agent.errors import AgentError, ConfigError, InputError
from agent.jose import AlgorithmNotAllowedError, ClaimsError, JoseError
from agent.jose.errors import (
    AlgorithmRefusedError,
    ClaimRejectedError,
    DecryptionFailedError,
    ExpiredError,
    JwksError,
    MalformedError,
    NotYetValidError,
    ReplayError,
    SignatureInvalidError,
    UnknownKidError,
    WrongAudienceError,
    WrongIssuerError,
    WrongRecipientError,
)
from agent.log import get_logger
from agent.openfinance.banks import UnknownBankError
from agent.openfinance.consent import (
    AuthorizationDeniedError,
    CallbackExpiredError,
    CallbackIssuerError,
    ConsentFlowError,
    MalformedCallbackError,
    StateInUseError,
    TokenAnswerError,
    UnknownStateError,
)
from agent.openfinance.discovery import DiscoveryError
from agent.openfinance.registration import RegistrationError, RegistrationOutcomeUnknownError
from agent.openfinance.tokens import InvalidGrantError, TokenError
from agent.operations.consents import IdTokenRefusedError
from agent.operations.core import Caller, check_purpose, execute
from agent.operations.errors import KeyPurposeError, NotReadyError, PolicyDenied, UnknownKeyError
from agent.operations.inputs import InvalidInput
from agent.operations.spec import Access, Operation, Resource, Spec
from agent.rotation.errors import RotationStepError, RotationWindowError
from agent.state import StateError
from agent.state.rotation import RotationConflictError
from agent.transport.errors import BankBusyError, BankTimeoutError, ResponseTooLargeError, TransportError
from pkcs11_backends.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    KeyTemplateError,
    MechanismError,
    ModuleLimitError,
    PinError,
    Pkcs11Error,
    TokenOperationError,
    TokenUnavailableError,
)

log = get_logger("tpp-agent.daemon")


class PeerGrants:
    """The policy as one socket peer sees it (what typed operations and listings ask)."""

    __slots__ = ("peer", "policy")

    def __init__(self, policy: Policy, peer: Peer) -> None:
        self.policy, self.peer = policy, peer

    def allows(self, operation: Operation, key: str | None = None, bank: str | None = None) -> bool:
        return self.policy.allows(self.peer, operation.value, key, bank)

    def scopes(self, operation: Operation, bank: str) -> frozenset[str] | None:
        return self.policy.scopes(self.peer, operation.value, bank)

    def named(self) -> bool:
        return self.policy.knows(self.peer)


class Router:
    def __init__(self, agent: Agent, routes: Sequence[Route] = ROUTES) -> None:
        self.agent = agent
        self.table = RouteTable(routes)

    def remote(self, request: Request) -> bool:
        """Whether the request may call a bank (the server's ``remote``)."""
        return self.table.match(request.method, request.path).remote

    def routine(self, request: Request) -> bool:
        """Whether the request is routine, not an administrator's step (the server's ``routine``)."""
        return self.table.match(request.method, request.path).routine

    def __call__(self, request: Request) -> Response:
        found = self.table.match(request.method, request.path)
        route = found.route
        if route is None:
            if found.allowed:
                raise HttpError(405, "method_not_allowed", f"{request.path} accepts {', '.join(found.allowed)}",
                                headers=(("Allow", ", ".join(found.allowed)),))
            raise HttpError(404, "not_found", f"no endpoint {request.path}", "see GET /v1/health, /v1/keys")
        spec = route.spec
        key, bank = found.params.get("alias"), found.params.get("bank")
        request.log["operation"] = spec.operation.value
        if key is not None:
            request.log["key"] = key
        if bank is not None:
            request.log["bank"] = bank
        agent = self.agent
        grants = PeerGrants(agent.policy, request.peer)
        try:
            self._authorize(agent, spec, request.peer, key, bank)
            body = request.query if route.from_query else self._body(request)
            caller = Caller(request.peer.uid, request.peer.pid, request.interaction_id)
            result = execute(agent.core, spec, caller, grants, body, key=key, bank=bank, log=request.log,
                             from_query=route.from_query)
        except PolicyDenied as exc:
            self._audit_refusal(request, spec, key, bank, exc)
            raise HttpError(403, "forbidden", str(exc), exc.hint) from None
        except (Pkcs11Error, AgentError) as exc:
            error = http_error(exc)
            error.bank_interaction_id = getattr(exc, "bank_interaction_id", None)
            raise error from None
        return route.render(result)

    @staticmethod
    def _body(request: Request) -> Mapping[str, Any]:
        if request.head.headers.get("content-length", "0").strip() == "0":
            return {}
        return request.json()

    @staticmethod
    def _authorize(agent: Agent, spec: Spec[Any], peer: Peer, key: str | None, bank: str | None) -> None:
        """Deny by default: every operation but the open ones needs a rule (or an admin) for its resource."""
        if spec.access is Access.OPEN:
            return
        operation = spec.operation.value
        policy = agent.policy
        if spec.resource is Resource.KEYS:
            keys = agent.config.keys
            if keys and not any(policy.allows(peer, operation, key=alias) for alias in keys):
                policy.check(peer, operation, key="*")
            return
        try:
            policy.check(peer, operation, key=key, bank=bank)
        except PolicyDenied as exc:
            configured = agent.config.keys.get(key) if key is not None else None
            if configured is not None:
                try:
                    check_purpose(spec, key or "", configured)
                except KeyPurposeError as purpose:
                    # No hint to add a rule that the configuration would refuse.
                    raise PolicyDenied(f"{exc}; and no rule may grant it: {purpose}", purpose.hint) from None
            raise

    def _audit_refusal(self, request: Request, spec: Spec[Any], key: str | None, bank: str | None,
                       refusal: PolicyDenied) -> None:
        """A refused request is a record too: who asked what, for which key or bank (nothing was signed)."""
        configured = self.agent.config.keys.get(key) if key is not None else None
        named = configured.uri if configured is not None else (f"bank:{bank}" if bank else (key or "-"))
        peer = request.peer
        try:
            self.agent.audit.record(KeyUse(peer.uid, peer.pid, named, spec.operation.value, "-",
                                           f"{request.method} {request.path}".encode(), "denied",
                                           request.interaction_id))
        except AuditError as exc:  # the refusal stands; nothing was signed, so nothing is lost but the note
            log.error("refusal_not_audited", error=str(exc), interaction_id=request.interaction_id)


def http_error(exc: Pkcs11Error | AgentError) -> HttpError:
    hint = exc.hint or ""
    if isinstance(exc, InvalidInput):
        return HttpError(400, exc.code, str(exc), hint)
    if isinstance(exc, PolicyDenied):
        return HttpError(403, "forbidden", str(exc), hint)
    if isinstance(exc, KeyPurposeError):
        return HttpError(403, "key_purpose", str(exc), hint)
    if isinstance(exc, UnknownKeyError):
        return HttpError(404, "unknown_key", str(exc), hint)
    if isinstance(exc, NotReadyError):
        return HttpError(503, "not_ready", str(exc), hint, (("Retry-After", "1"),))
    if isinstance(exc, KeyNotFoundError | AmbiguousKeyError):
        return HttpError(404 if isinstance(exc, KeyNotFoundError) else 409, "key_not_found", str(exc), hint)
    if isinstance(exc, MechanismError):
        return HttpError(400, "unsupported_algorithm", str(exc), hint)
    if isinstance(exc, PinError):
        return HttpError(503, "token_login_refused", str(exc), hint)
    if isinstance(exc, TokenUnavailableError):
        return HttpError(503, "token_unavailable", str(exc), hint, (("Retry-After", "1"),))
    if isinstance(exc, TokenOperationError | KeyTemplateError | ModuleLimitError):  # the module said no, with a CKR_
        return HttpError(502, "token_error", str(exc), hint)
    if isinstance(exc, AuditError):
        return HttpError(500, "audit_unavailable", str(exc), hint)
    if isinstance(exc, UnknownBankError):
        return HttpError(404, "unknown_bank", str(exc), hint)
    if isinstance(exc, ConfigError):
        return HttpError(500, "config_error", str(exc), hint)
    if isinstance(exc, BankBusyError):
        return HttpError(503, "bank_busy", str(exc), hint, (("Retry-After", "1"),))
    if isinstance(exc, BankTimeoutError):
        return HttpError(504, "bank_timeout", str(exc), hint)
    if isinstance(exc, ResponseTooLargeError):
        return HttpError(502, "bank_answer_too_large", str(exc), hint)
    if isinstance(exc, TransportError):
        return HttpError(502, "bank_unreachable", str(exc), hint)
    if isinstance(exc, DiscoveryError):
        return HttpError(502, "discovery_failed", str(exc), hint)
    if isinstance(exc, RegistrationOutcomeUnknownError):
        return HttpError(409, "registration_outcome_unknown", str(exc), hint)
    if isinstance(exc, RegistrationError):
        return HttpError(502, "registration_failed", str(exc), hint)
    if isinstance(exc, InvalidGrantError):  # the code or refresh token is gone: the customer consents again
        return HttpError(400, "invalid_grant", str(exc), hint)
    if isinstance(exc, TokenError):
        return HttpError(502, "bank_refused", str(exc), hint)
    if isinstance(exc, IdTokenRefusedError):
        return HttpError(502, "id_token_refused", str(exc), hint)
    if isinstance(exc, TokenAnswerError):
        return HttpError(502, "token_answer_invalid", str(exc), hint)
    if isinstance(exc, AuthorizationDeniedError):
        return HttpError(403, "authorization_denied", str(exc), hint)
    if isinstance(exc, UnknownStateError):
        return HttpError(400, "unknown_state", str(exc), hint)
    if isinstance(exc, CallbackExpiredError):
        return HttpError(400, "callback_expired", str(exc), hint)
    if isinstance(exc, CallbackIssuerError):
        return HttpError(400, "issuer_mismatch", str(exc), hint)
    if isinstance(exc, MalformedCallbackError):
        return HttpError(400, "bad_callback", str(exc), hint)
    if isinstance(exc, StateInUseError):
        return HttpError(409, "state_in_use", str(exc), hint)
    if isinstance(exc, ConsentFlowError):
        return HttpError(400, "consent_flow_refused", str(exc), hint)
    if isinstance(exc, AlgorithmNotAllowedError):
        return HttpError(403, "algorithm_not_allowed", str(exc), hint)
    if isinstance(exc, ClaimsError):
        return HttpError(400, "claims_refused", str(exc), hint)
    # What the bank signed or encrypted, refused: one code per reason (a forged answer is not an expired one).
    if isinstance(exc, ReplayError):
        return HttpError(409, "replayed", str(exc), hint)
    if isinstance(exc, SignatureInvalidError):
        return HttpError(400, "bad_signature", str(exc), hint)
    if isinstance(exc, UnknownKidError):
        return HttpError(400, "unknown_kid", str(exc), hint)
    if isinstance(exc, ExpiredError):
        return HttpError(400, "expired", str(exc), hint)
    if isinstance(exc, NotYetValidError):
        return HttpError(400, "not_yet_valid", str(exc), hint)
    if isinstance(exc, WrongIssuerError):
        return HttpError(400, "wrong_issuer", str(exc), hint)
    if isinstance(exc, WrongAudienceError):
        return HttpError(400, "wrong_audience", str(exc), hint)
    if isinstance(exc, ClaimRejectedError):
        return HttpError(400, "claim_rejected", str(exc), hint)
    if isinstance(exc, AlgorithmRefusedError):
        return HttpError(400, "algorithm_refused", str(exc), hint)
    if isinstance(exc, WrongRecipientError):
        return HttpError(400, "wrong_recipient", str(exc), hint)
    if isinstance(exc, DecryptionFailedError):
        return HttpError(400, "undecryptable", str(exc), hint)
    if isinstance(exc, MalformedError):
        return HttpError(400, "malformed", str(exc), hint)
    if isinstance(exc, JwksError):
        return HttpError(502, "bank_jwks_unusable", str(exc), hint)
    if isinstance(exc, JoseError):
        return HttpError(400, "jose_refused", str(exc), hint)
    if isinstance(exc, DirectoryServerError):
        return HttpError(502, "directory_failed", str(exc), hint)
    if isinstance(exc, DirectoryError):
        return HttpError(502, "directory_refused", str(exc), hint)
    if isinstance(exc, RotationWindowError):
        wait = str(max(1, round(exc.retry_after)))
        return HttpError(409, "rotation_window", str(exc), hint, (("Retry-After", wait),))
    if isinstance(exc, RotationStepError):
        return HttpError(409, "rotation_step", str(exc), hint)
    if isinstance(exc, RotationConflictError):
        return HttpError(409, "rotation_conflict", str(exc), hint)
    if isinstance(exc, StateError):
        return HttpError(503, "state_unavailable", str(exc), hint)
    if isinstance(exc, InputError):
        return HttpError(400, "bad_input", str(exc), hint)
    return HttpError(500, "internal_error", str(exc), hint)
