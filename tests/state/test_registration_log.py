"""The registration log on both backends: what a claim decides, that it is per certificate and endpoint, and
that of processes racing on one store (one host's processes on SQLite, several hosts' on PostgreSQL) one wins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.openfinance.records import FAILED, PENDING, REGISTERED, UNCERTAIN, RegistrationLog, UnresolvedAttemptError
from agent.state import StateStore, open_state
from tests.pg import PostgresServer
from tests.state.conftest import state_config

REPO = Path(__file__).resolve().parents[2]
SHA, OTHER_SHA = "ab" * 32, "cd" * 32
SANDBOX, PRODUCTION = "https://sandbox.bank.example/tpp-registration", "https://bank.example/tpp-registration"
CALLERS = 4


def test_claim_decides_by_the_earlier_attempts(store: StateStore) -> None:
    log = RegistrationLog(store)
    first = log.claim("mb", SHA, "CN=tpp", SANDBOX, "one", force=False)
    assert (first.outcome, first.endpoint) == (PENDING, SANDBOX)
    with pytest.raises(UnresolvedAttemptError) as pending:
        log.claim("mb", SHA, "CN=tpp", SANDBOX, "two", force=False)
    assert pending.value.attempt == first
    assert log.claim("mb", OTHER_SHA, "CN=tpp", SANDBOX, "other certificate", force=False).outcome == PENDING

    log.finish(first.id, UNCERTAIN, status=None, body=None, error="ReadTimeoutError", duration_ms=1)
    with pytest.raises(UnresolvedAttemptError):
        log.claim("mb", SHA, "CN=tpp", SANDBOX, "three", force=False)
    forced = log.claim("mb", SHA, "CN=tpp", SANDBOX, "forced", force=True)
    log.finish(forced.id, FAILED, status=500, body=b"", error="BankServerError", duration_ms=1)
    retry = log.claim("mb", SHA, "CN=tpp", SANDBOX, "after a refusal", force=False)
    assert retry.outcome == PENDING

    log.finish(retry.id, REGISTERED, status=204, body=b"", error=None, duration_ms=12.5)
    already = log.claim("mb", SHA, "CN=tpp", SANDBOX, "again", force=False)
    assert (already.interaction_id, already.outcome, already.duration_ms) == ("after a refusal", REGISTERED, 12.5)
    assert log.standing(SHA, SANDBOX) == already
    assert log.claim("mb", SHA, "CN=tpp", SANDBOX, "forced again", force=True).outcome == PENDING
    assert len(log.attempts()) == 5 and log.attempts("other") == []


def test_a_registration_counts_at_its_endpoint_only(store: StateStore) -> None:
    log = RegistrationLog(store)
    sandbox = log.claim("mb", SHA, "CN=tpp", SANDBOX, "sandbox", force=False)
    log.finish(sandbox.id, REGISTERED, status=204, body=b"", error=None, duration_ms=1)
    # The bank moved to production: the same certificate is not registered there.
    assert log.standing(SHA, PRODUCTION) is None
    production = log.claim("mb", SHA, "CN=tpp", PRODUCTION, "production", force=False)
    assert (production.outcome, production.endpoint) == (PENDING, PRODUCTION)
    assert log.claim("mb", SHA, "CN=tpp", SANDBOX, "sandbox again", force=False).interaction_id == "sandbox"


_CLAIMANT = """
import json, sys
from agent import config
from agent.openfinance.records import RegistrationLog, UnresolvedAttemptError
from agent.state import open_state
state = json.loads(sys.argv[1])
log = RegistrationLog(open_state(config.parse({"state": state})))
print("ready", flush=True)
sys.stdin.readline()
print("claiming", flush=True)
try:
    attempt = log.claim("mb", sys.argv[2], "CN=tpp", sys.argv[3], sys.argv[4], force=False)
    print(json.dumps({"claimed": attempt.interaction_id}), flush=True)
except UnresolvedAttemptError as exc:
    print(json.dumps({"refused": exc.attempt.interaction_id}), flush=True)
"""


@pytest.mark.parametrize("earlier", ["none", "refused"])
def test_processes_sharing_a_store_claim_once(store: StateStore, database: str | None, tmp_path: Path,
                                              earlier: str) -> None:
    """Each claimant is its own process with its own state dir: on PostgreSQL they stand for hosts of a fleet.

    ``none``: the pair was never claimed (the claimants meet at its claim row's insertion); ``refused``: an
    earlier attempt was refused, so every claimant may try again (they meet at the committed row's lock)."""
    log = RegistrationLog(store)
    before = []
    if earlier == "refused":
        first = log.claim("mb", SHA, "CN=tpp", SANDBOX, "refused", force=False)
        log.finish(first.id, FAILED, status=400, body=b"", error="RegistrationRejectedError", duration_ms=1)
        before = ["refused"]
    claimants = []
    # The test holds the pair's claim row until every claimant is on its way: they all wait, then race.
    with store.transaction() as blocker:
        blocker.execute("INSERT INTO registration_claims (cert_sha256, endpoint) VALUES (?, ?) ON CONFLICT DO NOTHING",
                        (SHA, SANDBOX))
        blocker.execute(blocker.for_update("SELECT * FROM registration_claims WHERE cert_sha256 = ?"), (SHA,))
        for i in range(CALLERS):
            own_dir = tmp_path / f"host-{i}" if database else tmp_path / "state"
            state = {"dir": str(own_dir), **({"database": database} if database else {})}
            claimants.append(subprocess.Popen(
                [sys.executable, "-c", _CLAIMANT, json.dumps(state), SHA, SANDBOX, f"process-{i}"], cwd=REPO,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            for proc in claimants:
                assert proc.stdout is not None and proc.stdout.readline() == "ready\n", _died(proc)
            for proc in claimants:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in claimants:
                assert proc.stdout is not None and proc.stdout.readline() == "claiming\n", _died(proc)
        except BaseException:
            for proc in claimants:
                proc.kill()
            raise
        # Leaving the block commits the blocker's claim row; the claimants then queue on it.
    try:
        outputs = [proc.communicate(timeout=60) for proc in claimants]
        answers = [json.loads(out) for out, _ in outputs]
    finally:
        for proc in claimants:
            proc.kill()
            proc.wait()
    assert all(proc.returncode == 0 for proc in claimants), [err for _, err in outputs]
    [winner] = [a["claimed"] for a in answers if "claimed" in a]
    assert sorted(a.get("refused", "") for a in answers) == [""] + [winner] * (CALLERS - 1)
    *earlier_rows, row = log.attempts()
    assert [r.interaction_id for r in earlier_rows] == before
    assert (row.interaction_id, row.outcome) == (winner, PENDING)


def _died(proc: subprocess.Popen[str]) -> str:
    """What a claimant that stopped early said: its exit status and stderr, for the assertion's message."""
    proc.kill()
    _, err = proc.communicate(timeout=30)
    return f"claimant exited {proc.returncode}: {err[-2000:]}"


def test_two_state_dirs_share_one_database(postgres_server: PostgresServer, tmp_path: Path) -> None:
    database = postgres_server.create_database()
    one = RegistrationLog(open_state(state_config(tmp_path / "host-a", database)))
    two = RegistrationLog(open_state(state_config(tmp_path / "host-b", database)))
    claimed = one.claim("mb", SHA, "CN=tpp", SANDBOX, "host a", force=False)
    one.finish(claimed.id, REGISTERED, status=204, body=b"", error=None, duration_ms=1)
    assert two.claim("mb", SHA, "CN=tpp", SANDBOX, "host b", force=False).interaction_id == "host a"
    assert not (tmp_path / "host-b" / "registrations.sqlite3").exists()
