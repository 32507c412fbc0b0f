"""Consent-flow and event state shared by the serving processes of one host: ``STATE_DIR/flows.sqlite3``.

The daemon hands each connection to its serving processes in turn, so the callback of a consent may reach
another process than its PAR did, and the same event may be delivered to two of them. Both stores take their
decision in one ``BEGIN IMMEDIATE`` transaction (one writer at a time, across processes):

* :class:`SqlitePendingStore` — pending authorizations by state; ``pop`` reads and deletes in the same
  transaction, so of two callbacks with one state only one gets it.
* :class:`SqliteReplayStore` — seen event ``jti`` values per bank, each until its ``exp``.

The PKCE verifier is at rest here for at most the pending lifetime (10 minutes): in the agent's own state
directory (mode 0600 file), deleted when taken or expired. On its own it is useless: the exchange also needs the
code (sent only to the TPP's redirect) and the client's mTLS and signing keys (on the token). A fleet of hosts
behind one redirect needs one store for all of them: implement the same two protocols on the fleet's database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from agent.openfinance.consent import PendingAuthorization
from agent.openfinance.events import Seen

DB_NAME = "flows.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    state      TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    data       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_created ON pending (created_at);
CREATE TABLE IF NOT EXISTS seen_events (
    bank  TEXT NOT NULL,
    jti   TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (bank, jti)
);
CREATE INDEX IF NOT EXISTS seen_events_until ON seen_events (until);
"""


class FlowDatabase:
    """The SQLite file; one short connection per operation (threads and processes never share one)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.executescript(_SCHEMA)  # its own transaction (executescript commits before it runs)
        finally:
            db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()


class SqlitePendingStore:
    def __init__(self, database: FlowDatabase) -> None:
        self.database = database

    def __len__(self) -> int:
        with self.database.transaction() as db:
            count: int = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        return count

    def put(self, pending: PendingAuthorization, *, max_pending: int, now: float) -> bool:
        with self.database.transaction() as db:
            db.execute("DELETE FROM pending WHERE expires_at < ?", (now,))
            if db.execute("SELECT 1 FROM pending WHERE state = ?", (pending.state,)).fetchone():
                return False
            (count,) = db.execute("SELECT COUNT(*) FROM pending").fetchone()
            if count >= max_pending:
                db.execute("DELETE FROM pending WHERE state IN (SELECT state FROM pending ORDER BY created_at "
                           "LIMIT ?)", (count - max_pending + 1,))
            db.execute("INSERT INTO pending VALUES (?, ?, ?, ?)",
                       (pending.state, pending.created_at, pending.expires_at,
                        json.dumps(dataclasses.asdict(pending))))
        return True

    def pop(self, state: str) -> PendingAuthorization | None:
        with self.database.transaction() as db:
            row = db.execute("SELECT data FROM pending WHERE state = ?", (state,)).fetchone()
            db.execute("DELETE FROM pending WHERE state = ?", (state,))
        return PendingAuthorization(**json.loads(row[0])) if row else None


class SqliteReplayStore:
    def __init__(self, database: FlowDatabase, bank: str) -> None:
        self.database, self.bank = database, bank

    def __len__(self) -> int:
        with self.database.transaction() as db:
            count: int = db.execute("SELECT COUNT(*) FROM seen_events WHERE bank = ?", (self.bank,)).fetchone()[0]
        return count

    def add(self, jti: str, until: float, *, now: float, max_entries: int) -> Seen:
        with self.database.transaction() as db:
            row = db.execute("SELECT until FROM seen_events WHERE bank = ? AND jti = ?", (self.bank, jti)).fetchone()
            if row is not None and row[0] >= now:
                return Seen.SEEN
            count = self._count(db)
            if count >= max_entries:
                db.execute("DELETE FROM seen_events WHERE bank = ? AND until < ?", (self.bank, now))
                count = self._count(db)
            if count >= max_entries:
                return Seen.FULL
            db.execute("INSERT OR REPLACE INTO seen_events VALUES (?, ?, ?)", (self.bank, jti, until))
        return Seen.NEW

    def _count(self, db: sqlite3.Connection) -> int:
        count: int = db.execute("SELECT COUNT(*) FROM seen_events WHERE bank = ?", (self.bank,)).fetchone()[0]
        return count
