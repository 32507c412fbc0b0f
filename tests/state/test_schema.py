"""Schema versions: a registrations file written before them keeps working; files are private whatever the umask;
a database from a newer tpp-agent, a bad URL, a password in the URL and an unreachable server are clear errors."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest

from agent.openfinance.records import FAILED, PENDING, REGISTERED, RegistrationLog
from agent.state import SQLITE_NAME, StateError, open_state
from agent.state.schema import VERSION
from agent.state.store import SchemaTooNewError
from tests.pg import PostgresServer
from tests.state.conftest import state_config

SHA = "ab" * 32
ENDPOINT = "https://bank.example/tpp-registration"

# The file as tpp-agent wrote it before schema versions (agent/openfinance/records.py, until this change).
_VERSION_1 = """
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


def _version_1_file(state: Path) -> None:
    state.mkdir()
    db = sqlite3.connect(state / SQLITE_NAME)
    db.executescript(_VERSION_1)
    rows = [("mb", ENDPOINT, "2026-01-01T00:00:00.000+00:00", SHA, "CN=tpp", "sent", "registered", 204, "", None, 9.5),
            ("mb", "", "2026-01-02T00:00:00.000+00:00", "ef" * 32, "CN=tpp", "claimed, never sent", "pending",
             None, None, None, None)]
    db.executemany("INSERT INTO registrations (bank, endpoint, attempted_at, cert_sha256, cert_subject, "
                   "interaction_id, outcome, status, response_body, error, duration_ms) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def test_a_file_from_before_schema_versions_is_migrated(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _version_1_file(state)
    store = open_state(state_config(state, None))
    log = RegistrationLog(store)
    registered, never_sent = log.attempts()
    # What was registered stays registered: nothing is sent again.
    already = log.claim("mb", SHA, "CN=tpp", ENDPOINT, "after upgrade", force=False)
    assert (already.interaction_id, already.outcome) == ("sent", REGISTERED) and already == registered
    # A claim of the old kind (before discovery, no endpoint) never reached a bank: it no longer blocks anything.
    assert (never_sent.outcome, never_sent.endpoint) == (FAILED, "") and "never sent" in (never_sent.error or "")
    assert log.claim("mb", "ef" * 32, "CN=tpp", ENDPOINT, "first real", force=False).outcome == PENDING
    assert store.migrate() == VERSION  # opened again: nothing left to do


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    open_state(state_config(state, None))
    db = sqlite3.connect(state / SQLITE_NAME)
    db.execute("UPDATE schema_version SET version = ?", (VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNewError, match=f"schema version {VERSION + 1}") as caught:
        open_state(state_config(state, None))
    assert "upgrade" in caught.value.hint


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_state_dir_and_file_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "new" / "state"
    previous = os.umask(umask)
    try:
        RegistrationLog(open_state(state_config(state, None))).claim("mb", SHA, "CN=tpp", ENDPOINT, "x", force=False)
        reader = sqlite3.connect(state / SQLITE_NAME)  # while a connection is open, its -wal and -shm exist
        reader.execute("SELECT count(*) FROM registrations").fetchone()
    finally:
        os.umask(previous)
    try:
        for directory in (state, state.parent):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for name in (SQLITE_NAME, SQLITE_NAME + "-wal", SQLITE_NAME + "-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        reader.close()


def test_bad_database_settings_are_clear_errors(tmp_path: Path, postgres_server: PostgresServer) -> None:
    with pytest.raises(StateError, match=r"must be a postgresql:// URL .* got 'mysql://db/tpp'"):
        open_state(state_config(tmp_path, "mysql://db/tpp"))
    with pytest.raises(StateError, match="carries a password") as caught:
        open_state(state_config(tmp_path, "postgresql://tpp:secret@127.0.0.1/tpp"))
    assert "passfile" in caught.value.hint and "secret" not in str(caught.value)
    refused = re.escape("state database PostgreSQL tpp@127.0.0.1: ")
    with socket_closed() as port, pytest.raises(StateError, match=refused):
        open_state(state_config(tmp_path, f"postgresql://tpp@127.0.0.1:{port}/tpp?connect_timeout=2"))
    with pytest.raises(StateError, match='database "missing" does not exist'):
        open_state(state_config(tmp_path, postgres_server.url("missing")))


def socket_closed() -> _ClosedPort:
    return _ClosedPort()


class _ClosedPort:
    """A loopback port nothing listens on, for as long as the block runs."""

    def __enter__(self) -> int:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused
        return int(self._socket.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        self._socket.close()
