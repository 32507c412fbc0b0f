"""``POST {registration_endpoint}`` with ``{}`` over mTLS: the bank learns the TPP from its
transport certificate's subject.

Any 2xx is success. Each failure is its own error naming the bank, the interaction id
and what to check. Every attempt is logged (``records.py``) before it is sent; a
registration that succeeded for this bank and certificate is not sent again unless
forced, and nothing here ever retries on its own: a POST that may have reached the bank
is the operator's call. "Already registered" is per transport certificate and per
registration endpoint. The log's claim is atomic, so this holds for concurrent callers
too (daemon threads, agent processes sharing a state dir, hosts sharing a database).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from agent import interaction, log
from agent.errors import AgentError
from agent.openfinance.banks import BankConfig
from agent.openfinance.client import BankHttp
from agent.openfinance.discovery import Discovery
from agent.openfinance.records import (
    FAILED,
    REGISTERED,
    UNCERTAIN,
    Attempt,
    RegistrationLog,
    UnresolvedAttemptError,
    truncate_body,
)
from agent.transport.errors import (
    BankTimeoutError,
    ConnectionLostError,
    TransportError,
    answer_summary,
    refusal_hint,
)

_logger = log.get_logger("openfinance.registration")


class RegistrationError(AgentError):
    """The bank answered, but not with 2xx."""

    what_to_check = "read the bank's answer (tpp-agent registrations) and ask the bank about this interaction id"

    def __init__(self, bank: str, endpoint: str, interaction_id: str, status: int, body: bytes) -> None:
        self.bank, self.endpoint, self.interaction_id, self.status = bank, endpoint, interaction_id, status
        detail = answer_summary(body)
        super().__init__(
            f"bank {bank!r} refused the registration: HTTP {status}{': ' + detail if detail else ''} "
            f"({endpoint}, x-fapi-interaction-id {interaction_id})",
            hint=f"{refusal_hint(status, body) or self.what_to_check} (x-fapi-interaction-id {interaction_id})")


class RegistrationRejectedError(RegistrationError):  # 400
    what_to_check = ("the bank found the request malformed: check that the certificate subject is the directory's "
                     "(C=AE, O=legal name, OU=organisation id, CN=client id) and read the error body")


class RegistrationUnauthorizedError(RegistrationError):  # 401
    what_to_check = ("the bank did not see or accept a client certificate: check that the endpoint is its mTLS one "
                     "(use_mtls_aliases), and that the transport certificate is the one in the directory")


class RegistrationForbiddenError(RegistrationError):  # 403
    what_to_check = ("the bank knows the certificate but refuses this application: check its status and roles in "
                     "the directory, and that this bank is in the same environment (sandbox/production)")


class BankServerError(RegistrationError):  # 5xx
    what_to_check = ("the bank failed on its side; it may or may not have recorded the registration: try again "
                     "later with --force, and quote the interaction id to the bank")


class RegistrationOutcomeUnknownError(AgentError):
    """The last attempt may have reached the bank and its answer never came: nothing is sent blindly."""

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        super().__init__(
            f"bank {attempt.bank!r}: the registration attempt of {attempt.attempted_at} "
            f"(x-fapi-interaction-id {attempt.interaction_id}) may have reached the bank, its outcome is unknown "
            f"({attempt.outcome}{': ' + attempt.error if attempt.error else ''})",
            hint=f"ask the bank whether it registered x-fapi-interaction-id {attempt.interaction_id}; "
                 "if it did not, register again with --force")


class UnexpectedStatusError(RegistrationError):
    what_to_check = "the endpoint is not a registration endpoint: refresh discovery (tpp-agent discover --refresh)"


_BY_STATUS: dict[int, type[RegistrationError]] = {400: RegistrationRejectedError, 401: RegistrationUnauthorizedError,
                                                  403: RegistrationForbiddenError}


def _error_class(status: int) -> type[RegistrationError]:
    if status >= 500:
        return BankServerError
    return _BY_STATUS.get(status, UnexpectedStatusError)


@dataclasses.dataclass(frozen=True)
class Identity:
    """The transport certificate the bank will see."""

    sha256: str
    subject: str


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    bank: str
    endpoint: str
    interaction_id: str
    status: int
    duration_ms: float
    already: Attempt | None = None  # set when nothing was sent: this earlier success stands

    def as_dict(self) -> dict[str, object]:
        return {"bank": self.bank, "endpoint": self.endpoint, "interaction_id": self.interaction_id,
                "status": self.status, "duration_ms": self.duration_ms,
                "already_registered": self.already.as_dict() if self.already else None}


class Registrar:
    def __init__(self, bank: BankConfig, discovery: Discovery, http: BankHttp, records: RegistrationLog,
                 identity: Identity) -> None:
        self.bank = bank
        self.discovery = discovery
        self.http = http
        self.records = records
        self.identity = identity

    def register(self, force: bool = False) -> RegistrationResult:
        bank, identity = self.bank, self.identity
        served = interaction.current()  # the caller's id, which the registration log keeps too
        interaction_id = served.id if served is not None else str(uuid.uuid4())
        # The endpoint is part of what is registered (a bank moved to another URL registers again): discovery
        # first, from its cache while that is fresh, and never while the claim is held.
        endpoint = self.discovery.get().endpoint("registration_endpoint", bank.use_mtls_aliases)
        try:
            claimed = self.records.claim(bank.name, identity.sha256, identity.subject, endpoint, interaction_id,
                                         force=force)
        except UnresolvedAttemptError as exc:
            # A timeout, a lost connection or a crash mid-request: the bank may hold it. Never resend blindly.
            raise RegistrationOutcomeUnknownError(exc.attempt) from None
        if claimed.outcome == REGISTERED:
            return RegistrationResult(bank.name, claimed.endpoint, claimed.interaction_id, claimed.status or 0,
                                      0.0, already=claimed)
        row = claimed.id
        started = time.monotonic()

        def elapsed() -> float:
            return (time.monotonic() - started) * 1000

        try:
            response = self.http.request("POST", endpoint, body=b"{}", interaction_id=interaction_id,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        except TransportError as exc:
            # A timeout or a lost connection after sending may mean the bank has it: say so, don't resend.
            outcome = UNCERTAIN if isinstance(exc, BankTimeoutError | ConnectionLostError) else FAILED
            self.records.finish(row, outcome, status=None, body=None, error=f"{type(exc).__name__}: {exc}",
                                duration_ms=elapsed())
            _logger.warning("registration.failed", bank=bank.name, endpoint=endpoint, interaction_id=interaction_id,
                            error=type(exc).__name__, outcome=outcome)
            raise
        except BaseException as exc:
            self.records.finish(row, UNCERTAIN, status=None, body=None, error=f"{type(exc).__name__}: {exc}",
                                duration_ms=elapsed())
            raise
        duration = elapsed()
        status = response.status
        if 200 <= status < 300:
            self.records.finish(row, REGISTERED, status=status, body=response.body, error=None, duration_ms=duration)
            _logger.info("registration.succeeded", bank=bank.name, endpoint=endpoint, status=status,
                         interaction_id=interaction_id, duration_ms=round(duration, 1))
            return RegistrationResult(bank.name, endpoint, interaction_id, status, duration)
        error = _error_class(status)(bank.name, endpoint, interaction_id, status, response.body)
        self.records.finish(row, FAILED, status=status, body=response.body, error=f"{type(error).__name__}: {error}",
                            duration_ms=duration)
        _logger.warning("registration.refused", bank=bank.name, endpoint=endpoint, status=status,
                        interaction_id=interaction_id, body_excerpt=truncate_body(response.body)[:200])
        raise error
