"""A registration is sent once, whoever asks at the same moment: threads of one agent here; processes and
hosts sharing the state store in tests/state and tests/openfinance/test_fleet.py. The log's claim decides."""

from __future__ import annotations

import contextvars
import threading

import pytest

from agent.openfinance.records import PENDING, REGISTERED
from agent.openfinance.registration import RegistrationOutcomeUnknownError, RegistrationResult
from agent.openfinance.service import OpenFinance
from modelbank import Behaviour, ModelBank
from modelbank.server import DISCOVERY_PATH, REGISTRATION_PATH, Registration
from tests.openfinance.conftest import BANK

CALLERS = 4


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


def test_discovery_failure_leaves_no_attempt(service: OpenFinance, bank: ModelBank) -> None:
    bank.behaviour = Behaviour.failing("wrong-issuer")
    with pytest.raises(Exception, match="issuer"):
        service.registrar(BANK).register()
    assert service.records.attempts() == [] and not _posts(bank)
    bank.behaviour = Behaviour()
    assert service.registrar(BANK).register().status == 204


def test_already_registered_needs_no_connection(service: OpenFinance, bank: ModelBank) -> None:
    first = service.registrar(BANK).register()
    bank.behaviour = Behaviour.failing("wrong-issuer")  # a fetch now would fail: the cached document is used
    assert service.registrar(BANK).register().already is not None
    assert first.interaction_id == service.records.attempts()[0].interaction_id
    assert [path for _, path, _ in bank.requests].count(DISCOVERY_PATH) == 1
