"""The state in PostgreSQL, shared by the hosts of a fleet (``[state] database = "postgresql://…"``).

Driver: psycopg 3 from the distribution (python3-psycopg). A transaction is PostgreSQL's default READ
COMMITTED; what it decides on, it locks: a registration claim selects its claim row ``FOR UPDATE``, so a
second host's claim for the same certificate and endpoint waits for the first to commit and then reads its
row. A schema upgrade takes a transaction-scoped advisory lock.

No password in the URL: the configuration file is readable by more than the agent. Use libpq's own
sources — ``passfile=`` (or ``~/.pgpass``, mode 0600) or a client certificate (``sslcert=``/``sslkey=``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from agent.state.store import Row, StateError, StateStore, Transaction, translated

CONNECT_TIMEOUT = 10  # seconds, unless the URL says connect_timeout=
_SCHEMA_LOCK = 0x7470_7061  # "tppa": the advisory lock id schema upgrades hold


class _PostgresTransaction(Transaction):
    lock_clause = " FOR UPDATE"
    id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    def __init__(self, db: psycopg.Connection[Row]) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        # The layers above write SQLite's "?" placeholders; none of their SQL holds a literal "?" or "%".
        cursor = self.db.execute(sql.replace("?", "%s"), tuple(params))
        return cursor.fetchall() if cursor.description is not None else []

    def has_table(self, name: str) -> bool:
        row = self.one("SELECT to_regclass(?) IS NOT NULL AS found", (name,))
        return bool(row and row["found"])

    def exclusive(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))


class PostgresStore(StateStore):
    def __init__(self, url: str) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StateError(f"[state] database is not a valid PostgreSQL URL: {exc}") from None
        if params.get("password"):
            raise StateError("[state] database carries a password: the configuration file is not the place for it",
                             hint="put it in a passfile (libpq's ~/.pgpass, mode 0600, or passfile= in the URL), "
                                  "or authenticate with a client certificate (sslcert=, sslkey=)")
        self._conninfo = url if "connect_timeout" in params else make_conninfo(url, connect_timeout=CONNECT_TIMEOUT)
        self.description = f"PostgreSQL {params.get('dbname') or params.get('user') or ''}@" \
                           f"{params.get('host') or 'localhost'}"
        self.migrate()

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Transaction]:
        del write  # READ COMMITTED either way: writers lock the rows they decide on
        with translated(self.description, (psycopg.Error,)):
            db = psycopg.connect(self._conninfo, row_factory=dict_row)
            try:
                with db.transaction():
                    yield _PostgresTransaction(db)
            finally:
                db.close()
