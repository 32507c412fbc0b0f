"""One interface over the two databases: a transaction that runs SQL and returns rows as dicts.

The SQL the layers above write is the common dialect of SQLite 3.35+ and PostgreSQL: ``?`` placeholders,
``INSERT ... ON CONFLICT DO NOTHING``, ``RETURNING``. What differs is said by the backend: how a write
transaction starts (SQLite takes the database's write lock at ``BEGIN IMMEDIATE``; PostgreSQL locks rows),
the lock clause of a ``SELECT`` (``FOR UPDATE`` in PostgreSQL, nothing in SQLite, whose write lock covers it),
and the column type of a generated key.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from agent.errors import AgentError

Row = dict[str, Any]


class StateError(AgentError):
    hint = "check [state] in the configuration, and that the database is reachable and writable"


class SchemaTooNewError(StateError):
    hint = "a newer tpp-agent wrote this database: upgrade this host's tpp-agent too (the fleet shares one schema)"


class Transaction(abc.ABC):
    lock_clause: str  # appended to a SELECT whose rows the transaction is about to decide on
    id_column: str  # DDL of an auto-generated integer primary key

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Run one statement; its rows (none for a statement that returns none)."""

    @abc.abstractmethod
    def has_table(self, name: str) -> bool: ...

    @abc.abstractmethod
    def exclusive(self) -> None:
        """Hold the whole database's schema lock until this transaction ends (migrations)."""

    def for_update(self, select: str) -> str:
        """``select`` with the backend's lock clause: its rows stay as read until this transaction ends."""
        return select + self.lock_clause

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None


class StateStore(abc.ABC):
    """Where the shared state lives. ``transaction()`` commits when its block ends, rolls back on an error."""

    description: str  # for messages: "SQLite /var/lib/tpp-agent/registrations.sqlite3", "PostgreSQL db@host"

    @abc.abstractmethod
    def transaction(self, write: bool = True) -> contextlib.AbstractContextManager[Transaction]:
        """A transaction; a ``write`` one is not changed under it by another writer: what it read, it writes over.
        A read-only one waits for no writer."""

    def migrate(self) -> int:
        """Bring the schema to :data:`agent.state.schema.VERSION`; the version found."""
        from agent.state.schema import VERSION, found_version, upgrade

        with self.transaction(write=False) as tx:
            found = found_version(tx)
        if found == VERSION:
            return found  # the usual case: no write lock to wait for (another process may hold it a while)
        with self.transaction() as tx:
            return upgrade(tx, self.description)


@contextlib.contextmanager
def translated(description: str, errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """The database's own errors as one :class:`StateError` naming the store."""
    try:
        yield
    except errors as exc:
        first = str(exc).strip().splitlines()
        raise StateError(f"state database {description}: {first[0] if first else type(exc).__name__}") from exc
