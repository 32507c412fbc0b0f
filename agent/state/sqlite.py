"""The state in one SQLite file: the default, for one host (its processes share it).

WAL mode with ``synchronous=FULL``: a committed row (a registration attempt written before its POST) is on
disk even if the host loses power during the request. A write transaction is ``BEGIN IMMEDIATE``: it takes
the database's write lock at its start, so what it read is what it writes over.

The directory and the file are created private (0700, 0600) whatever the umask: the log holds the banks'
answers and interaction ids. SQLite gives its ``-wal`` and ``-shm`` files the mode of the database file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.state.store import Row, StateError, StateStore, Transaction, translated

_TIMEOUT = 30.0  # seconds a writer waits for another's lock (a claim holds it for milliseconds)


class _SqliteTransaction(Transaction):
    lock_clause = ""  # BEGIN IMMEDIATE already holds the database's write lock
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        cursor = self.db.execute(sql, tuple(params))
        if cursor.description is None:
            return []
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def has_table(self, name: str) -> bool:
        return self.one("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None

    def exclusive(self) -> None:
        pass  # the write lock taken at BEGIN IMMEDIATE covers the schema too


class SqliteStore(StateStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"SQLite {path}"
        _private_file(path)
        self.migrate()

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Transaction]:
        with translated(self.description, (sqlite3.Error,)):
            db = sqlite3.connect(self.path, timeout=_TIMEOUT, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield _SqliteTransaction(db)
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            finally:
                db.close()


def _private_file(path: Path) -> None:
    """``path``'s missing directories (0700) and the file itself (0600); what exists is left as it is."""
    missing = [parent for parent in (path.parent, *path.parent.parents) if not parent.exists()]
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # another process made it in between: its mode is that one's business
            os.chmod(directory, 0o700)  # not mkdir(mode=): the umask would take bits off that too
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return  # an existing database keeps its mode (an operator may have chosen it)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StateError(f"cannot create the state database {path}: {exc.strerror}",
                         hint="check that the state dir ([state] dir) is writable by this user") from exc
