"""Lending sessions, and the gate that C_Finalize closes: whoever waits is told as soon as a session comes back."""

from __future__ import annotations

import threading
import time

from pkcs11_backends.sessions import _Lending

LONG = 30.0  # longer than the test may take: a waiter that is not told waits this out and fails the test


def test_finalize_goes_ahead_as_soon_as_the_last_lent_session_is_given_back() -> None:
    lending = _Lending(4, "t")
    assert lending.borrow(1.0) is None  # lent, nothing idle: the borrower opens a session
    seen: list[tuple[bool, float]] = []
    started = time.monotonic()

    def finalize() -> None:
        with lending.exclusive(LONG) as drained:
            seen.append((drained, time.monotonic() - started))

    closer = threading.Thread(target=finalize)
    closer.start()
    time.sleep(0.2)
    assert not seen  # still lent: the gate waits
    lending.give_back(None)
    closer.join(LONG)
    assert seen and seen[0][0] and seen[0][1] < LONG / 3


def test_a_borrower_waiting_for_a_free_session_gets_the_one_given_back() -> None:
    lending = _Lending(1, "t")
    lending.borrow(1.0)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(lending.borrow(LONG)))
    waiter.start()
    time.sleep(0.2)
    assert not got
    returned = object()
    lending.give_back(returned)  # type: ignore[arg-type]  # any object stands for an idle session here
    waiter.join(LONG)
    assert got == [returned]
