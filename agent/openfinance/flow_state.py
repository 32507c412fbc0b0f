"""Consent-flow and event state shared by the serving processes and by the hosts of a fleet: the state store.

The daemon hands each connection to its serving processes in turn, and a fleet puts several hosts behind one
redirect URL and one webhook, so the callback of a consent may reach another process or host than its PAR did,
and the same event may be delivered to two of them. Both stores here live in the state store ``[state]`` names
(``agent.state``: SQLite in STATE_DIR, or the fleet's PostgreSQL) and decide in one transaction:

* :class:`StatePendingStore` — pending authorizations by state (and bank); ``pop`` is one ``DELETE … RETURNING``,
  so of two callbacks with one state only one gets it. The bound is per owner (the caller that pushed the PAR).
* :class:`StateReplayStore` — seen event ``jti`` values per bank, each until its ``exp``; the row is locked while
  the decision is taken, and a concurrent insert of the same ``jti`` loses (``ON CONFLICT DO NOTHING``).

The PKCE verifier rests in the store for at most the pending lifetime (10 minutes), deleted when taken or
expired. On its own it is useless: the exchange also needs the code (sent only to the TPP's redirect) and the
client's mTLS and signing keys (on the token). The bounds are exact in SQLite (one writer at a time); on
PostgreSQL two hosts adding at the same moment may pass ``max_pending`` by one each until the next add.
"""

from __future__ import annotations

import dataclasses
import json

from agent.openfinance.consent import PendingAuthorization
from agent.openfinance.events import Seen
from agent.state.store import StateStore, Transaction


class StatePendingStore:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def __len__(self) -> int:
        with self.store.transaction(write=False) as tx:
            row = tx.one("SELECT COUNT(*) AS n FROM pending_authorizations")
        return int(row["n"]) if row else 0

    def put(self, pending: PendingAuthorization, *, max_pending: int, now: float) -> bool:
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM pending_authorizations WHERE expires_at < ?", (now,))
            if tx.one(tx.for_update("SELECT state FROM pending_authorizations WHERE state = ?"), (pending.state,)):
                return False
            row = tx.one("SELECT COUNT(*) AS n FROM pending_authorizations WHERE owner = ?", (pending.owner,))
            count = int(row["n"]) if row else 0
            if count >= max_pending:
                tx.execute("DELETE FROM pending_authorizations WHERE state IN (SELECT state FROM "
                           "pending_authorizations WHERE owner = ? ORDER BY created_at LIMIT ?)",
                           (pending.owner, count - max_pending + 1))
            tx.execute("INSERT INTO pending_authorizations (state, bank, owner, created_at, expires_at, data) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (pending.state, pending.bank, pending.owner, pending.created_at, pending.expires_at,
                        json.dumps(dataclasses.asdict(pending))))
        return True

    def pop(self, state: str, bank: str) -> PendingAuthorization | None:
        with self.store.transaction() as tx:
            row = tx.one("DELETE FROM pending_authorizations WHERE state = ? AND bank = ? RETURNING data",
                         (state, bank))
        return PendingAuthorization(**json.loads(row["data"])) if row else None


class StateReplayStore:
    def __init__(self, store: StateStore, bank: str) -> None:
        self.store, self.bank = store, bank

    def __len__(self) -> int:
        with self.store.transaction(write=False) as tx:
            return self._count(tx)

    def add(self, jti: str, until: float, *, now: float, max_entries: int) -> Seen:
        with self.store.transaction() as tx:
            row = tx.one(tx.for_update("SELECT kept_until FROM seen_events WHERE bank = ? AND jti = ?"),
                         (self.bank, jti))
            if row is not None and float(row["kept_until"]) >= now:
                return Seen.SEEN
            if self._count(tx) >= max_entries:
                tx.execute("DELETE FROM seen_events WHERE bank = ? AND kept_until < ?", (self.bank, now))
                row = None  # an expired row of this jti went with the others
                if self._count(tx) >= max_entries:
                    return Seen.FULL
            if row is not None:  # seen long ago, expired since: a new delivery of an expired event id
                tx.execute("UPDATE seen_events SET kept_until = ? WHERE bank = ? AND jti = ?", (until, self.bank, jti))
                return Seen.NEW
            inserted = tx.one("INSERT INTO seen_events (bank, jti, kept_until) VALUES (?, ?, ?) "
                              "ON CONFLICT DO NOTHING RETURNING jti", (self.bank, jti, until))
        return Seen.NEW if inserted is not None else Seen.SEEN

    def _count(self, tx: Transaction) -> int:
        row = tx.one("SELECT COUNT(*) AS n FROM seen_events WHERE bank = ?", (self.bank,))
        return int(row["n"]) if row else 0
