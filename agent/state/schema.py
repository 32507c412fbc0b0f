"""The state schema and its versions: each step takes a database from one version to the next.

Version 1 is the registrations table as tpp-agent has always written it (a file of that age has it and no
``schema_version`` table). Version 2 keys registrations by the transport certificate *and* the bank's
registration endpoint (a claim row per pair, the row a registration claim locks), and adds the rotation
state. Version 3 adds the consent flow's pending authorizations and the events' seen ``jti`` values
(``agent/openfinance/flow_state.py``). Version 4 gives pending authorizations their bank and owner as columns:
a callback takes only its bank's, and the bound is per caller. Steps run in one transaction with the version
read, so two hosts starting at once migrate once.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.state.store import SchemaTooNewError, Transaction

VERSION = 4


def _v1(tx: Transaction) -> None:
    tx.execute(f"""CREATE TABLE registrations (
        id             {tx.id_column},
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
        duration_ms    DOUBLE PRECISION)""")
    tx.execute("CREATE INDEX registrations_bank_cert ON registrations (bank, cert_sha256, outcome)")


def _v2(tx: Transaction) -> None:
    tx.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    tx.execute("INSERT INTO schema_version (version) VALUES (1)")
    # One row per (certificate, endpoint) ever claimed: the row a claim locks (SELECT ... FOR UPDATE), so
    # claims for one pair queue behind each other on every host while other pairs go on.
    tx.execute("""CREATE TABLE registration_claims (
        cert_sha256 TEXT NOT NULL,
        endpoint    TEXT NOT NULL,
        PRIMARY KEY (cert_sha256, endpoint))""")
    tx.execute("CREATE INDEX registrations_cert_endpoint ON registrations (cert_sha256, endpoint, id)")
    # Version 1 claimed before discovery and wrote the endpoint after it: a pending row without one was
    # never sent (the endpoint was written before every POST). It stays in the log, marked for what it is.
    tx.execute("UPDATE registrations SET outcome = 'failed', error = 'never sent: the agent stopped before "
               "discovery answered' WHERE endpoint = '' AND outcome = 'pending'")
    tx.execute("INSERT INTO registration_claims (cert_sha256, endpoint) SELECT DISTINCT cert_sha256, endpoint "
               "FROM registrations WHERE endpoint <> ''")
    # Rotation (issue 20, item 1): a key alias's keys by role, when its overlap started and its signing
    # switch happened, and bank by bank when its transport switched. ``version`` makes every update a
    # compare-and-set: a host changes only the state it read.
    tx.execute("""CREATE TABLE rotations (
        key_alias           TEXT PRIMARY KEY,
        overlap_started_at  TEXT,
        signing_switched_at TEXT,
        version             INTEGER NOT NULL,
        updated_at          TEXT NOT NULL,
        updated_by          TEXT NOT NULL)""")
    tx.execute("""CREATE TABLE rotation_keys (
        key_alias TEXT NOT NULL REFERENCES rotations (key_alias),
        key_label TEXT NOT NULL,
        role      TEXT NOT NULL CHECK (role IN ('current', 'successor', 'retired')),
        since     TEXT NOT NULL,
        PRIMARY KEY (key_alias, key_label))""")
    tx.execute("""CREATE TABLE rotation_banks (
        key_alias   TEXT NOT NULL REFERENCES rotations (key_alias),
        bank        TEXT NOT NULL,
        key_label   TEXT NOT NULL,
        switched_at TEXT NOT NULL,
        PRIMARY KEY (key_alias, bank))""")


def _v3(tx: Transaction) -> None:
    # Consent flows (issue 19): a callback may reach another process or host than its PAR; an event may be
    # delivered to two of them. Rows live minutes (pending) or until the event's exp (seen).
    tx.execute("""CREATE TABLE pending_authorizations (
        state      TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        data       TEXT NOT NULL)""")
    tx.execute("CREATE INDEX pending_authorizations_created ON pending_authorizations (created_at)")
    tx.execute("""CREATE TABLE seen_events (
        bank       TEXT NOT NULL,
        jti        TEXT NOT NULL,
        kept_until DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (bank, jti))""")


def _v4(tx: Transaction) -> None:
    # Rows of version 3 live ten minutes and name neither: dropping them fails at most those consents' callbacks.
    tx.execute("DELETE FROM pending_authorizations")
    tx.execute("ALTER TABLE pending_authorizations ADD COLUMN bank TEXT NOT NULL DEFAULT ''")
    tx.execute("ALTER TABLE pending_authorizations ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
    tx.execute("CREATE INDEX pending_authorizations_owner ON pending_authorizations (owner, created_at)")


_STEPS: dict[int, Callable[[Transaction], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4}


def found_version(tx: Transaction) -> int:
    if tx.has_table("schema_version"):
        row = tx.one("SELECT version FROM schema_version")
        return int(row["version"]) if row else 1
    return 1 if tx.has_table("registrations") else 0


def upgrade(tx: Transaction, description: str) -> int:
    """Run the steps the database lacks, inside ``tx``; the version it had."""
    tx.exclusive()
    found = found_version(tx)
    if found > VERSION:
        raise SchemaTooNewError(f"state database {description} has schema version {found}; this tpp-agent knows "
                                f"versions up to {VERSION}")
    for version in range(found + 1, VERSION + 1):
        _STEPS[version](tx)
    if found < VERSION:
        tx.execute("UPDATE schema_version SET version = ?", (VERSION,))
    return found
