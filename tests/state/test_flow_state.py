"""Pending authorizations and seen event jti values: the same rules in memory and in the state store (SQLite and
PostgreSQL), with one winner per state or jti between threads and between processes (serving processes, hosts)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.jose.errors import ClaimRejectedError, ReplayError
from agent.openfinance.consent import (
    MemoryPendingStore,
    PendingAuthorization,
    PendingAuthorizations,
    PendingStore,
    UnknownStateError,
)
from agent.openfinance.events import MemoryReplayStore, ReplayGuard, ReplayStore, Seen
from agent.openfinance.flow_state import StatePendingStore, StateReplayStore
from agent.state import StateStore, open_state
from tests.conftest import REPO
from tests.pg import PostgresServer
from tests.state.conftest import state_config


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def pending_fields(state: str, owner: str = "1000", bank: str = "mb") -> dict[str, object]:
    return {"owner": owner, "bank": bank, "issuer": "https://bank.example", "client_id": "c", "state": state,
            "nonce": "n", "code_verifier": "v" * 43, "redirect_uri": "https://tpp.example/cb", "request_uri": "urn:r",
            "scope": "openid", "max_age": None}


def backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    """The state store on one backend (the ``store`` fixture's parameters cannot be combined with memory)."""
    if kind == "sqlite":
        return open_state(state_config(tmp_path / "state", None))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return open_state(state_config(tmp_path / "state", server.create_database()))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def pending_store(request: pytest.FixtureRequest, tmp_path: Path) -> PendingStore:
    if request.param == "memory":
        return MemoryPendingStore()
    return StatePendingStore(backend(request.param, request, tmp_path))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def replay_store(request: pytest.FixtureRequest, tmp_path: Path) -> ReplayStore:
    if request.param == "memory":
        return MemoryReplayStore()
    return StateReplayStore(backend(request.param, request, tmp_path), "mb")


def test_pending_round_trip_single_use_and_bound(pending_store: PendingStore) -> None:
    clock = Clock()
    flows = PendingAuthorizations(store=pending_store, max_pending=3, clock=clock)
    kept = flows.new(**pending_fields("s0"))
    assert flows.take("s0", "mb") == kept
    with pytest.raises(UnknownStateError):
        flows.take("s0", "mb")
    for i in range(5):
        clock.now += 1
        flows.new(**pending_fields(f"s{i}"))
    assert len(flows) == 3
    with pytest.raises(UnknownStateError):
        flows.take("s1", "mb")  # the oldest went first
    clock.now += 601
    flows.new(**pending_fields("late"))
    assert len(flows) == 1  # the expired ones were dropped to make room


def test_the_bound_is_per_caller_and_a_callback_takes_only_its_banks(pending_store: PendingStore) -> None:
    clock = Clock()
    flows = PendingAuthorizations(store=pending_store, max_pending=2, clock=clock)
    flows.new(**pending_fields("quiet", owner="2000"))
    for i in range(10):  # another caller floods: its own oldest go, never the quiet caller's
        clock.now += 1
        flows.new(**pending_fields(f"flood{i}", owner="3000"))
    assert len(flows) == 3
    with pytest.raises(UnknownStateError):
        flows.take("quiet", "other-bank")  # not this bank's: refused, and left for its own bank
    assert flows.take("quiet", "mb").owner == "2000"
    assert flows.take("flood9", "mb").state == "flood9"
    with pytest.raises(UnknownStateError):
        flows.take("flood7", "mb")


def test_replay_guard_rules(replay_store: ReplayStore) -> None:
    clock = Clock()
    guard = ReplayGuard(store=replay_store, max_entries=2, clock=clock)
    guard.record("a", clock.now + 60)
    with pytest.raises(ReplayError):
        guard.record("a", clock.now + 60)
    guard.record("b", clock.now + 5)
    with pytest.raises(ClaimRejectedError, match="unexpired events"):
        guard.record("c", clock.now + 60)  # full of unexpired entries: refused, none forgotten
    clock.now += 30  # b (kept until exp + 10 s leeway) has expired: room again
    guard.record("c", clock.now + 60)
    with pytest.raises(ReplayError):
        guard.record("a", clock.now + 60)
    clock.now += 100  # everything expired: an old jti may come again, and is then remembered again
    guard.record("a", clock.now + 60)
    with pytest.raises(ReplayError):
        guard.record("a", clock.now + 60)


def race(action: Callable[[], object], threads: int = 8) -> list[object]:
    results: list[object] = []
    barrier = threading.Barrier(threads)

    def run() -> None:
        barrier.wait()
        results.append(action())

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def test_one_winner_per_state_and_per_jti(store: StateStore) -> None:
    flows = PendingAuthorizations(store=StatePendingStore(store))
    flows.new(**pending_fields("contested"))
    popped = race(lambda: StatePendingStore(store).pop("contested", "mb"))
    assert sum(isinstance(p, PendingAuthorization) for p in popped) == 1
    seen = race(lambda: StateReplayStore(store, "mb").add("jti-1", 2e9, now=1.8e9, max_entries=10))
    assert seen.count(Seen.NEW) == 1 and seen.count(Seen.SEEN) == 7


def test_another_process_takes_what_this_one_kept(tmp_path: Path) -> None:
    """Serving processes share STATE_DIR's SQLite store: the PAR's process keeps, the callback's takes."""
    from agent.state.sqlite import SqliteStore

    path = tmp_path / "state.sqlite3"
    flows = PendingAuthorizations(store=StatePendingStore(SqliteStore(path)))
    flows.new(**pending_fields("from-the-par-process"))
    script = ("import sys; from pathlib import Path; from agent.state.sqlite import SqliteStore;"
              "from agent.openfinance.flow_state import StatePendingStore;"
              "p = StatePendingStore(SqliteStore(Path(sys.argv[1]))).pop('from-the-par-process', 'mb');"
              "print(p.code_verifier if p else 'none')")
    taken = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                           check=True, timeout=60, cwd=REPO)
    assert taken.stdout.strip() == "v" * 43
    with pytest.raises(UnknownStateError):
        flows.take("from-the-par-process", "mb")
