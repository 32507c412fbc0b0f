"""Rotation state per key alias, shared by the hosts of a fleet: which key is current, which is its successor,
which are retired; when the overlap started and the signing switch happened; bank by bank, when the transport
switched.

Every change is a compare-and-set on ``version``: a host saves the state it read, changed; if another host
saved in between, :class:`RotationConflictError` says so and nothing is written (read again, decide again).
The rotation commands themselves (``tpp-agent rotate``) build on this; this module only keeps the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from agent.state.store import StateError, StateStore, Transaction

CURRENT, SUCCESSOR, RETIRED = "current", "successor", "retired"


class RotationConflictError(StateError):
    hint = "another host changed this rotation meanwhile: read its state again (tpp-agent rotate status) and retry"


@dataclasses.dataclass(frozen=True)
class RotationKey:
    label: str
    role: str  # current | successor | retired
    since: str


@dataclasses.dataclass(frozen=True)
class BankSwitch:
    key_label: str  # the key whose certificate this bank now gets
    switched_at: str


@dataclasses.dataclass(frozen=True)
class RotationState:
    key_alias: str
    keys: tuple[RotationKey, ...] = ()
    overlap_started_at: str | None = None
    signing_switched_at: str | None = None
    banks: Mapping[str, BankSwitch] = dataclasses.field(default_factory=dict)
    version: int = 0  # 0: not saved yet
    updated_at: str = ""
    updated_by: str = ""

    def labels(self, role: str) -> list[str]:
        return [key.label for key in self.keys if key.role == role]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class RotationLog:
    def __init__(self, store: StateStore, changed: Path | None = None) -> None:
        self.store = store
        self.changed = changed  # replaced after each save: this host's other processes then read the state again

    def get(self, key_alias: str) -> RotationState | None:
        with self.store.transaction(write=False) as tx:
            return _read(tx, key_alias, lock=False)

    def save(self, state: RotationState) -> RotationState:
        """Store ``state`` if the stored one is still the one it was read as; the stored state (version + 1)."""
        for key in state.keys:
            if key.role not in (CURRENT, SUCCESSOR, RETIRED):
                raise ValueError(f"rotation key role {key.role!r}")
        saved = dataclasses.replace(state, version=state.version + 1, updated_at=now(),
                                    updated_by=socket.gethostname())
        with self.store.transaction() as tx:
            if state.version == 0:
                inserted = tx.execute(
                    "INSERT INTO rotations (key_alias, overlap_started_at, signing_switched_at, version, updated_at,"
                    " updated_by) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING key_alias",
                    (saved.key_alias, saved.overlap_started_at, saved.signing_switched_at, saved.version,
                     saved.updated_at, saved.updated_by))
                if not inserted:
                    raise RotationConflictError(f"rotation of {state.key_alias!r} was started by another host")
            else:
                stored = _read(tx, state.key_alias, lock=True)
                if stored is None or stored.version != state.version:
                    by = f" (version {stored.version}, by {stored.updated_by})" if stored else ""
                    raise RotationConflictError(f"rotation of {state.key_alias!r} changed since it was read{by}")
                tx.execute("UPDATE rotations SET overlap_started_at = ?, signing_switched_at = ?, version = ?,"
                           " updated_at = ?, updated_by = ? WHERE key_alias = ?",
                           (saved.overlap_started_at, saved.signing_switched_at, saved.version, saved.updated_at,
                            saved.updated_by, saved.key_alias))
                tx.execute("DELETE FROM rotation_keys WHERE key_alias = ?", (saved.key_alias,))
                tx.execute("DELETE FROM rotation_banks WHERE key_alias = ?", (saved.key_alias,))
            for key in saved.keys:
                tx.execute("INSERT INTO rotation_keys (key_alias, key_label, role, since) VALUES (?, ?, ?, ?)",
                           (saved.key_alias, key.label, key.role, key.since))
            for bank, switch in saved.banks.items():
                tx.execute("INSERT INTO rotation_banks (key_alias, bank, key_label, switched_at) VALUES (?, ?, ?, ?)",
                           (saved.key_alias, bank, switch.key_label, switch.switched_at))
        if self.changed is not None:
            announce(self.changed)
        return saved


def announce(marker: Path) -> None:
    """Replace ``marker`` (a new inode each time: two saves within one clock tick still differ); a host whose
    state directory is not writable just goes on (the others read the state at their next health check)."""
    partial = marker.with_name(f".{marker.name}.{os.getpid()}")
    try:
        partial.write_bytes(b"")
        os.replace(partial, marker)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()


def _read(tx: Transaction, key_alias: str, *, lock: bool) -> RotationState | None:
    query = "SELECT * FROM rotations WHERE key_alias = ?"
    row = tx.one(tx.for_update(query) if lock else query, (key_alias,))
    if row is None:
        return None
    keys = tuple(RotationKey(r["key_label"], r["role"], r["since"]) for r in tx.execute(
        "SELECT key_label, role, since FROM rotation_keys WHERE key_alias = ? ORDER BY since, key_label",
        (key_alias,)))
    banks = {r["bank"]: BankSwitch(r["key_label"], r["switched_at"]) for r in tx.execute(
        "SELECT bank, key_label, switched_at FROM rotation_banks WHERE key_alias = ? ORDER BY bank", (key_alias,))}
    return RotationState(key_alias, keys, row["overlap_started_at"], row["signing_switched_at"], banks,
                         int(row["version"]), row["updated_at"], row["updated_by"])


def all_states(store: StateStore) -> list[RotationState]:
    """Every alias's rotation state, in one read (what a running agent follows)."""
    with store.transaction(write=False) as tx:
        aliases = [row["key_alias"] for row in tx.execute("SELECT key_alias FROM rotations ORDER BY key_alias")]
        found = [_read(tx, alias, lock=False) for alias in aliases]
    return [state for state in found if state is not None]
