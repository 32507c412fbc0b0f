"""A registration is sent once, whoever asks at the same moment: threads of one agent, or
agent processes sharing a state dir. The log's claim decides, in one SQLite write transaction."""

from __future__ import annotations

import contextvars
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.openfinance.records import (
    DB_NAME,
    FAILED,
    PENDING,
    REGISTERED,
    UNCERTAIN,
    RegistrationLog,
    UnresolvedAttemptError,
)
from agent.openfinance.registration import RegistrationOutcomeUnknownError, RegistrationResult
from agent.openfinance.service import OpenFinance
from modelbank import Behaviour, ModelBank
from modelbank.server import REGISTRATION_PATH, Registration
from tests.openfinance.conftest import BANK

CALLERS = 4
REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32


def _posts(bank: ModelBank) -> list[str]:
    return [interaction for method, path, interaction in bank.requests
            if method == "POST" and path.endswith(REGISTRATION_PATH)]


@pytest.mark.parametrize("slow_bank", [True, False], ids=["bank-answers-late", "bank-answers-at-once"])
def test_concurrent_callers_send_one_registration(service: OpenFinance, bank: ModelBank, slow_bank: bool) -> None:
    registrars = [service.registrar(BANK) for _ in range(CALLERS)]
    start = threading.Barrier(CALLERS)
    finished = threading.Condition()
    outcomes: list[RegistrationResult | Exception] = []

    def call(index: int) -> None:
        start.wait()
        try:
            outcome: RegistrationResult | Exception = registrars[index].register()
        except Exception as exc:  # the assertions below name what was expected
            outcome = exc
        with finished:
            outcomes.append(outcome)
            finished.notify_all()

    def answer_late(_: Registration) -> None:
        # The bank holds its answer until every other caller is done: they all come while the first is pending.
        with finished:
            finished.wait_for(lambda: len(outcomes) == CALLERS - 1, timeout=60)

    if slow_bank:
        bank.on_registration = answer_late
    # Each thread in the caller's context (who the bank calls are audited for), as the daemon's workers are.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(call, i)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(_posts(bank)) == 1 and len(bank.registrations) == 1
    [sent] = [o for o in outcomes if isinstance(o, RegistrationResult) and o.already is None]
    assert sent.status == 204 and sent.interaction_id == bank.registrations[0].interaction_id
    others = [o for o in outcomes if o is not sent]
    for other in others:
        if isinstance(other, RegistrationOutcomeUnknownError):
            assert other.attempt.interaction_id == sent.interaction_id and other.attempt.outcome == PENDING
        else:
            assert isinstance(other, RegistrationResult) and other.already is not None, other
            assert other.interaction_id == sent.interaction_id
    if slow_bank:
        assert all(isinstance(o, RegistrationOutcomeUnknownError) for o in others)
    [attempt] = service.records.attempts()
    assert (attempt.outcome, attempt.interaction_id) == (REGISTERED, sent.interaction_id)
    assert service.registrar(BANK).register().already == attempt


def test_forced_registration_is_sent_while_another_is_pending(service: OpenFinance, bank: ModelBank) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold_first(_: Registration) -> None:
        if not holding.is_set():
            holding.set()
            release.wait(timeout=60)

    bank.on_registration = hold_first
    first = threading.Thread(target=contextvars.copy_context().run, args=(service.registrar(BANK).register,))
    first.start()
    try:
        assert holding.wait(timeout=60)
        with pytest.raises(RegistrationOutcomeUnknownError):
            service.registrar(BANK).register()
        forced = service.registrar(BANK).register(force=True)
    finally:
        release.set()
        first.join()
    assert forced.already is None and len(bank.registrations) == 2
    assert [a.outcome for a in service.records.attempts()] == [REGISTERED, REGISTERED]


def test_discovery_failure_releases_the_claim(service: OpenFinance, bank: ModelBank) -> None:
    bank.behaviour = Behaviour.failing("wrong-issuer")
    with pytest.raises(Exception, match="issuer"):
        service.registrar(BANK).register()
    assert service.records.attempts() == [] and not _posts(bank)
    bank.behaviour = Behaviour()
    assert service.registrar(BANK).register().status == 204


def test_already_registered_needs_no_discovery(service: OpenFinance, bank: ModelBank) -> None:
    first = service.registrar(BANK).register()
    service.discovery(BANK).cache_file.unlink()
    bank.behaviour = Behaviour.failing("wrong-issuer")  # a fetch now would fail
    assert service.registrar(BANK).register().already is not None
    assert first.interaction_id == service.records.attempts()[0].interaction_id


def test_claim_decides_by_the_earlier_attempts(tmp_path: Path) -> None:
    log = RegistrationLog(tmp_path)
    first = log.claim(BANK, SHA, "CN=tpp", "one", force=False)
    assert first.outcome == PENDING and first.endpoint == ""
    with pytest.raises(UnresolvedAttemptError) as pending:
        log.claim(BANK, SHA, "CN=tpp", "two", force=False)
    assert pending.value.attempt == first
    assert log.claim(BANK, "cd" * 32, "CN=tpp", "other certificate", force=False).outcome == PENDING

    log.finish(first.id, UNCERTAIN, status=None, body=None, error="ReadTimeoutError", duration_ms=1)
    with pytest.raises(UnresolvedAttemptError):
        log.claim(BANK, SHA, "CN=tpp", "three", force=False)
    forced = log.claim(BANK, SHA, "CN=tpp", "forced", force=True)
    log.finish(forced.id, FAILED, status=500, body=b"", error="BankServerError", duration_ms=1)
    retry = log.claim(BANK, SHA, "CN=tpp", "after a refusal", force=False)
    assert retry.outcome == PENDING

    log.address(retry.id, "https://bank/tpp-registration")
    log.finish(retry.id, REGISTERED, status=204, body=b"", error=None, duration_ms=1)
    already = log.claim(BANK, SHA, "CN=tpp", "again", force=False)
    assert already.interaction_id == "after a refusal" and already.endpoint == "https://bank/tpp-registration"
    assert log.claim(BANK, SHA, "CN=tpp", "forced again", force=True).outcome == PENDING
    assert len(log.attempts()) == 5


_CLAIMANT = """
import json, sys
from pathlib import Path
from agent.openfinance.records import RegistrationLog, UnresolvedAttemptError
log = RegistrationLog(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
print("claiming", flush=True)
try:
    attempt = log.claim("mb", sys.argv[2], "CN=tpp", sys.argv[3], force=False)
    print(json.dumps({"claimed": attempt.interaction_id}), flush=True)
except UnresolvedAttemptError as exc:
    print(json.dumps({"refused": exc.attempt.interaction_id}), flush=True)
"""


def test_processes_sharing_a_state_dir_claim_once(tmp_path: Path) -> None:
    RegistrationLog(tmp_path)
    # The test holds the write lock until every claimant is on its way: they all wait at BEGIN, then race.
    blocker = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    claimants = [subprocess.Popen([sys.executable, "-c", _CLAIMANT, str(tmp_path), SHA, f"process-{i}"], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(CALLERS)]
    try:
        for proc in claimants:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in claimants:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in claimants:
            assert proc.stdout is not None and proc.stdout.readline() == "claiming\n"
        blocker.execute("ROLLBACK")
        answers = [json.loads(proc.communicate(timeout=60)[0]) for proc in claimants]
    finally:
        blocker.close()
        for proc in claimants:
            proc.kill()
            proc.wait()
    assert all(proc.returncode == 0 for proc in claimants)
    [winner] = [a["claimed"] for a in answers if "claimed" in a]
    assert sorted(a.get("refused", "") for a in answers) == [""] + [winner] * (CALLERS - 1)
    [row] = RegistrationLog(tmp_path).attempts()
    assert (row.interaction_id, row.outcome) == (winner, PENDING)
