"""Every registration attempt, in the state store (``agent/state``: SQLite by default, PostgreSQL for a fleet).

The row is written *before* the POST (outcome ``pending``) and completed after it: an attempt that may have
reached the bank is on disk even if the agent dies during the request. Nothing retries on its own; the log
is what an operator reads to decide.

An attempt is for one transport certificate (``cert_sha256``: the SHA-256 of its DER, its ``x5t#S256`` in
hex) at one registration endpoint (the URL the bank's discovery document names): the bank knows a TPP by the
certificate it registered, at the endpoint it registered it, so a bank moved from its sandbox to its
production URL is registered again, and so is a new certificate.

The log also decides whether a registration may be sent: :meth:`RegistrationLog.claim` reads the earlier
attempts for the pair and writes the new ``pending`` row in one transaction that holds the pair's claim row
locked, so of the threads, processes and hosts sharing the store only one can claim it.
"""

from __future__ import annotations

import dataclasses
import datetime

from agent.state import StateStore
from agent.state.store import Row, Transaction

BODY_LIMIT = 4096  # enough for any error document; a bank that sends a page of HTML gets cut

PENDING, REGISTERED, FAILED = "pending", "registered", "failed"
UNCERTAIN = "uncertain"  # the request may have reached the bank; its answer never came


@dataclasses.dataclass(frozen=True)
class Attempt:
    id: int
    bank: str
    endpoint: str
    attempted_at: str
    cert_sha256: str
    cert_subject: str
    interaction_id: str
    outcome: str
    status: int | None
    response_body: str | None
    error: str | None
    duration_ms: float | None

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class UnresolvedAttemptError(Exception):
    """The last attempt for this certificate and endpoint is pending or uncertain: it may have reached the bank."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(f"registration attempt {attempt.id} for bank {attempt.bank!r} is {attempt.outcome}")
        self.attempt = attempt


def truncate_body(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    if len(text) <= BODY_LIMIT:
        return text
    return text[:BODY_LIMIT] + f"… [truncated, {len(body)} bytes in all]"


class RegistrationLog:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def claim(self, bank: str, cert_sha256: str, cert_subject: str, endpoint: str, interaction_id: str, *,
              force: bool) -> Attempt:
        """The attempt that stands for this certificate at this endpoint: the last ``registered`` one, or else a
        new ``pending`` one, which only this caller holds.

        Raises :class:`UnresolvedAttemptError` when the last attempt is pending or uncertain. ``force``
        skips both checks. Nothing here waits on the network while it holds the pair's lock.
        """
        with self.store.transaction() as tx:
            tx.execute("INSERT INTO registration_claims (cert_sha256, endpoint) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (cert_sha256, endpoint))
            # The lock a second claimant (thread, process or host) waits on; it then sees this one's row.
            claim = "SELECT cert_sha256 FROM registration_claims WHERE cert_sha256 = ? AND endpoint = ?"
            tx.execute(tx.for_update(claim), (cert_sha256, endpoint))
            if not force:
                registered = _last(tx, cert_sha256, endpoint, REGISTERED)
                if registered is not None:
                    return registered
                last = _last(tx, cert_sha256, endpoint)
                if last is not None and last.outcome in (PENDING, UNCERTAIN):
                    raise UnresolvedAttemptError(last)
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            row = tx.one("INSERT INTO registrations (bank, endpoint, attempted_at, cert_sha256, cert_subject,"
                         " interaction_id, outcome) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING *",
                         (bank, endpoint, now, cert_sha256, cert_subject, interaction_id, PENDING))
        assert row is not None
        return _attempt(row)

    def finish(self, row_id: int, outcome: str, *, status: int | None, body: bytes | None, error: str | None,
               duration_ms: float) -> None:
        with self.store.transaction() as tx:
            tx.execute(
                "UPDATE registrations SET outcome = ?, status = ?, response_body = ?, error = ?, duration_ms = ?"
                " WHERE id = ?",
                (outcome, status, truncate_body(body) if body is not None else None, error, round(duration_ms, 1),
                 row_id))

    def standing(self, cert_sha256: str, endpoint: str) -> Attempt | None:
        """The last attempt for this certificate at this endpoint: what decides whether it is registered."""
        with self.store.transaction(write=False) as tx:
            registered = _last(tx, cert_sha256, endpoint, REGISTERED)
            return registered or _last(tx, cert_sha256, endpoint)

    def attempts(self, bank: str | None = None) -> list[Attempt]:
        with self.store.transaction(write=False) as tx:
            if bank is None:
                rows = tx.execute("SELECT * FROM registrations ORDER BY id")
            else:
                rows = tx.execute("SELECT * FROM registrations WHERE bank = ? ORDER BY id", (bank,))
        return [_attempt(row) for row in rows]


def _attempt(row: Row) -> Attempt:
    return Attempt(**row)


def _last(tx: Transaction, cert_sha256: str, endpoint: str, outcome: str | None = None) -> Attempt | None:
    """The last attempt for this certificate at this endpoint (with this outcome, when given)."""
    if outcome is None:
        row = tx.one("SELECT * FROM registrations WHERE cert_sha256 = ? AND endpoint = ? ORDER BY id DESC LIMIT 1",
                     (cert_sha256, endpoint))
    else:
        row = tx.one("SELECT * FROM registrations WHERE cert_sha256 = ? AND endpoint = ? AND outcome = ?"
                     " ORDER BY id DESC LIMIT 1", (cert_sha256, endpoint, outcome))
    return _attempt(row) if row is not None else None
