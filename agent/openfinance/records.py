"""Every registration attempt, in ``STATE_DIR/registrations.sqlite3``.

The row is written *before* the POST (outcome ``pending``) and completed after it, in
WAL mode with ``synchronous=FULL``: an attempt that may have reached the bank is on disk
even if the agent dies during the request. Nothing retries on its own; the log is what
an operator reads to decide.
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

    def begin(self, bank: str, endpoint: str, cert_sha256: str, cert_subject: str, interaction_id: str) -> int:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO registrations (bank, endpoint, attempted_at, cert_sha256, cert_subject, interaction_id,"
                " outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (bank, endpoint, now, cert_sha256, cert_subject, interaction_id, PENDING))
            row_id = cursor.lastrowid
        assert row_id is not None
        return row_id

    def finish(self, row_id: int, outcome: str, *, status: int | None, body: bytes | None, error: str | None,
               duration_ms: float) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE registrations SET outcome = ?, status = ?, response_body = ?, error = ?, duration_ms = ?"
                " WHERE id = ?",
                (outcome, status, truncate_body(body) if body is not None else None, error, round(duration_ms, 1),
                 row_id))

    def successful(self, bank: str, cert_sha256: str) -> Attempt | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM registrations WHERE bank = ? AND cert_sha256 = ? AND outcome = ?"
                " ORDER BY id DESC LIMIT 1", (bank, cert_sha256, REGISTERED)).fetchone()
        return Attempt(**dict(row)) if row else None

    def latest(self, bank: str, cert_sha256: str) -> Attempt | None:
        """The last attempt for this bank and certificate, whatever its outcome."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM registrations WHERE bank = ? AND cert_sha256 = ? ORDER BY id DESC LIMIT 1",
                             (bank, cert_sha256)).fetchone()
        return Attempt(**dict(row)) if row else None

    def attempts(self, bank: str | None = None) -> list[Attempt]:
        with self._connect() as db:
            if bank is None:
                rows = db.execute("SELECT * FROM registrations ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM registrations WHERE bank = ? ORDER BY id", (bank,)).fetchall()
        return [Attempt(**dict(row)) for row in rows]
