"""The state that the agents of one application share: registrations and rotation state.

    [state]
    dir = "/var/lib/tpp-agent"                                   # this host's own files
    database = "postgresql://tpp@db.example/tpp?sslmode=verify-full"   # shared by a fleet (default: SQLite)

Without ``database`` it is ``STATE_DIR/registrations.sqlite3`` (the name it has always had: an existing
file keeps working, its schema is brought up to date on first open). With a ``postgresql://`` URL every host
of the fleet opens the same database; a registration claim is a transaction with a row lock there, as it is a
``BEGIN IMMEDIATE`` transaction in SQLite. What each host keeps to itself is in docs/fleet.md.
"""

from __future__ import annotations

from agent.config import Config
from agent.state.store import StateError, StateStore

SQLITE_NAME = "registrations.sqlite3"

__all__ = ["SQLITE_NAME", "StateError", "StateStore", "open_state"]


def open_state(config: Config) -> StateStore:
    """The state store ``[state]`` names, its schema brought up to date."""
    url = database_url(config)
    if url is None:
        from agent.state.sqlite import SqliteStore

        return SqliteStore(config.state_dir / SQLITE_NAME)
    from agent.state.postgres import PostgresStore

    return PostgresStore(url)


def database_url(config: Config) -> str | None:
    where = str(config.path) if config.path else "the configuration"
    value = config.section("state").get("database")
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
        raise StateError(f"[state] database must be a postgresql:// URL in {where}, got {value!r}",
                         hint="leave it out for the SQLite file in the state dir")
    return value
