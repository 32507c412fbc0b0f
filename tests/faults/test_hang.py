"""A PKCS#11 call that hangs: the caller's wait is bounded, others fail fast, service resumes by itself."""

from __future__ import annotations

import os
import threading
import time

import pytest

from agent.config import read_pin_file
from pkcs11_backends.errors import TokenTimeoutError
from pkcs11_backends.keys import KeySpec, KeyStore, SignatureScheme
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.sessions import PoolState, SessionPool
from pkcs11_backends.uri import Pkcs11Uri
from tests.conftest import Token
from tests.faults.conftest import Shim


def _pool_on_the_shim(token: Token, shim: Shim, label: str) -> tuple[SessionPool, KeyStore, Pkcs11Uri]:
    """A pool with a 0.5 s call limit on the fault-injection module, and a new P-256 key on it."""
    os.environ.update(shim.environment())
    pool = SessionPool(Module.load(str(shim.path)), TokenSelector(label=token.label),
                       lambda: read_pin_file(token.user_pin_file), call_timeout=0.5)
    keys = KeyStore(pool)
    return pool, keys, keys.generate(label, KeySpec.parse("ec:p256")).uri


def test_hung_sign_is_bounded_and_the_pool_resumes_when_it_returns(token: Token, shim: Shim) -> None:
    pool, keys, uri = _pool_on_the_shim(token, shim, "hang")
    assert len(keys.sign(uri, b"before", SignatureScheme.ECDSA_SHA256)) == 64

    shim.set(hang_sign=1)
    with pytest.raises(TokenTimeoutError, match=r"did not answer within 0\.5s"):
        keys.sign(uri, b"hangs", SignatureScheme.ECDSA_SHA256)
    assert pool.health.state is PoolState.HUNG
    # While the HSM still hangs, a new call is refused at once instead of queueing behind it.
    with pytest.raises(TokenTimeoutError, match="not answering"):
        keys.sign(uri, b"refused", SignatureScheme.ECDSA_SHA256)
    assert shim.control.read_text() == "hang_sign=1\n"

    shim.set()
    deadline = time.monotonic() + 10
    while not pool.health.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.health.ready and pool.health.recoveries == 1
    assert len(keys.sign(uri, b"after", SignatureScheme.ECDSA_SHA256)) == 64
    pool.close()


class _Supervisor:
    """Covers one thread, as the daemon covers a worker serving a request; records what it was told."""

    def __init__(self) -> None:
        self.thread = 0
        self.told: list[tuple[int, TokenTimeoutError, float]] = []

    def covers(self, thread: int) -> bool:
        return thread == self.thread

    def overdue(self, thread: int, error: TokenTimeoutError) -> None:
        self.told.append((thread, error, time.monotonic()))


def test_supervised_call_runs_inline_and_the_supervisor_answers_when_it_hangs(token: Token, shim: Shim) -> None:
    pool, keys, uri = _pool_on_the_shim(token, shim, "hang-inline")
    supervisor = _Supervisor()
    pool.supervise(supervisor)
    outcome: list[object] = []

    def sign(data: bytes) -> None:
        supervisor.thread = threading.get_ident()
        try:
            outcome.append(keys.sign(uri, data, SignatureScheme.ECDSA_SHA256))
        except TokenTimeoutError as exc:
            outcome.append(exc)

    # Inline: the operation runs on the covered thread itself, not on one of the pool's call threads.
    ran_on: list[str] = []
    supervisor.thread = threading.get_ident()
    pool.call(lambda _: ran_on.append(threading.current_thread().name))
    assert ran_on == [threading.current_thread().name]
    worker = threading.Thread(target=sign, args=(b"before",), name="covered")
    worker.start()
    worker.join()
    assert isinstance(outcome.pop(), bytes) and supervisor.told == []

    shim.set(hang_sign=1)
    started = time.monotonic()
    worker = threading.Thread(target=sign, args=(b"hangs",), name="covered")
    worker.start()
    deadline = time.monotonic() + 10
    while not supervisor.told and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [thread for thread, _, _ in supervisor.told] == [worker.ident]
    _, error, when = supervisor.told[0]
    assert "did not answer within 0.5s" in str(error) and when - started < 5
    assert worker.is_alive() and pool.health.state is PoolState.HUNG  # the caller itself is still in C_Sign
    with pytest.raises(TokenTimeoutError, match="not answering"):  # others are refused at once meanwhile
        keys.sign(uri, b"refused", SignatureScheme.ECDSA_SHA256)

    shim.set()
    worker.join(10)
    # The late signature never reaches the caller: it gets the same error its client was given.
    assert isinstance(outcome.pop(), TokenTimeoutError)
    assert pool.health.ready and pool.health.recoveries == 1
    assert len(keys.sign(uri, b"after", SignatureScheme.ECDSA_SHA256)) == 64
    pool.close()


class _Workers(_Supervisor):
    """Covers every thread that registers, as the daemon covers all its workers."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def covers(self, thread: int) -> bool:
        return thread in self.threads


def test_a_call_that_waits_for_a_session_is_timed_from_when_it_has_one(token: Token, shim: Shim) -> None:
    # A slow HSM that answers every call within the limit, and more workers than sessions (as [daemon] workers =
    # "auto" grows to): a worker that first waits for a session is not a hung call.
    os.environ.update(shim.environment())
    pool = SessionPool(Module.load(str(shim.path)), TokenSelector(label=token.label),
                       lambda: read_pin_file(token.user_pin_file), max_sessions=1, call_timeout=0.5)
    keys = KeyStore(pool)
    uri = keys.generate("slow", KeySpec.parse("ec:p256")).uri
    supervisor = _Workers()
    pool.supervise(supervisor)
    shim.set(delay_us=300_000)  # each signature 0.3 s: two in a row on one session take longer than the limit
    outcome: list[object] = []

    def sign(data: bytes) -> None:
        supervisor.threads.add(threading.get_ident())
        try:
            outcome.append(keys.sign(uri, data, SignatureScheme.ECDSA_SHA256))
        except TokenTimeoutError as exc:
            outcome.append(exc)

    try:
        workers = [threading.Thread(target=sign, args=(data,)) for data in (b"first", b"second")]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(10)
        assert supervisor.told == [] and pool.health.ready
        assert [len(signature) for signature in outcome if isinstance(signature, bytes)] == [64, 64]
    finally:
        shim.set()
        pool.close()
