"""Every registration attempt, in ``STATE_DIR/registrations.sqlite3``.

The row is written *before* the POST (outcome ``pending``) and completed after it, in
WAL mode with ``synchronous=FULL``: an attempt that may have reached the bank is on disk
even if the agent dies during the request. Nothing retries on its own; the log is what
an operator reads to decide.

The log is also what decides whether a registration may be sent: :meth:`RegistrationLog.claim`
reads the earlier attempts and writes the new ``pending`` row in one ``BEGIN IMMEDIATE``
transaction, so of the threads and processes sharing a state dir only one can claim it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import sqlite3
from collections.abc import Iterator
from pathlib import Path

DB_NAME = "registrations.sqlite3"
BODY_LIMIT = 4096  # enough for any error document; a bank that sends a page of HTML gets cut

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    bank           TEXT NOT NULL,
    endpoint       TEXT NOT NULL,
    attempted_at   TEXT NOT NULL,
    cert_sha256    TEXT NOT NULL,
    cert_subject   TEXT NOT NULL,
    interaction_id TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    status         INTEGER,
    response_body  TEXT,
    error          TEXT,
    duration_ms    REAL
);
CREATE INDEX IF NOT EXISTS registrations_bank_cert ON registrations (bank, cert_sha256, outcome);
"""

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
    """The last attempt for this bank and certificate is pending or uncertain: it may have reached the bank."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(f"registration attempt {attempt.id} for bank {attempt.bank!r} is {attempt.outcome}")
        self.attempt = attempt


def truncate_body(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    if len(text) <= BODY_LIMIT:
        return text
    return text[:BODY_LIMIT] + f"… [truncated, {len(body)} bytes in all]"


class RegistrationLog:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        state_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    def claim(self, bank: str, cert_sha256: str, cert_subject: str, interaction_id: str, *,
              force: bool) -> Attempt:
        """The attempt that stands for this bank and certificate: the last ``registered`` one, or else a new
        ``pending`` one, which only this caller holds.

        Raises :class:`UnresolvedAttemptError` when the last attempt is pending or uncertain. ``force``
        skips both checks. The new row's endpoint is empty until :meth:`address` (discovery needs the
        network, and nothing here may wait on it while holding the write lock).
        """
        with self._connect() as db:
            # IMMEDIATE takes the write lock at BEGIN: a second claimant waits here, then sees this one's row.
            db.execute("BEGIN IMMEDIATE")
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            try:
                if not force:
                    registered = _last(db, bank, cert_sha256, REGISTERED)
                    if registered is not None:
                        return registered
                    last = _last(db, bank, cert_sha256)
                    if last is not None and last.outcome in (PENDING, UNCERTAIN):
                        raise UnresolvedAttemptError(last)
                cursor = db.execute(
                    "INSERT INTO registrations (bank, endpoint, attempted_at, cert_sha256, cert_subject,"
                    " interaction_id, outcome) VALUES (?, '', ?, ?, ?, ?, ?)",
                    (bank, now, cert_sha256, cert_subject, interaction_id, PENDING))
                claimed = _attempt(db.execute("SELECT * FROM registrations WHERE id = ?", (cursor.lastrowid,)))
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
        assert claimed is not None
        return claimed

    def address(self, row_id: int, endpoint: str) -> None:
        """Where the claimed attempt goes: written before it is sent."""
        with self._connect() as db:
            db.execute("UPDATE registrations SET endpoint = ? WHERE id = ?", (endpoint, row_id))

    def release(self, row_id: int) -> None:
        """Give up a claim that was never sent (discovery failed): it was no attempt, the log keeps none."""
        with self._connect() as db:
            db.execute("DELETE FROM registrations WHERE id = ? AND outcome = ?", (row_id, PENDING))

    def finish(self, row_id: int, outcome: str, *, status: int | None, body: bytes | None, error: str | None,
               duration_ms: float) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE registrations SET outcome = ?, status = ?, response_body = ?, error = ?, duration_ms = ?"
                " WHERE id = ?",
                (outcome, status, truncate_body(body) if body is not None else None, error, round(duration_ms, 1),
                 row_id))

    def attempts(self, bank: str | None = None) -> list[Attempt]:
        with self._connect() as db:
            if bank is None:
                rows = db.execute("SELECT * FROM registrations ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM registrations WHERE bank = ? ORDER BY id", (bank,)).fetchall()
        return [Attempt(**dict(row)) for row in rows]


def _attempt(cursor: sqlite3.Cursor) -> Attempt | None:
    row = cursor.fetchone()
    return Attempt(**dict(row)) if row else None


def _last(db: sqlite3.Connection, bank: str, cert_sha256: str, outcome: str | None = None) -> Attempt | None:
    """The last attempt for this bank and certificate (with this outcome, when given)."""
    return _attempt(db.execute("SELECT * FROM registrations WHERE bank = ? AND cert_sha256 = ?"
                               " AND (? IS NULL OR outcome = ?) ORDER BY id DESC LIMIT 1",
                               (bank, cert_sha256, outcome, outcome)))
