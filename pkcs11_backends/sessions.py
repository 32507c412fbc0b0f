"""A thread-safe pool of sessions on one token, with login state and recovery.

* One *anchor* session holds the login for the whole application (PKCS#11 login
  is per application); worker sessions are opened without a PIN and inherit it.
  Closing a worker never logs out; only :meth:`SessionPool.close` does.
* Each thread borrows its own session: PKCS#11 forbids concurrent use of one.
* A wrong PIN is tried once. After that the pool refuses to log in again until it
  is given a new PIN source, so the agent can never lock the token out.
* Stale handles (token removed, module restarted) trigger the recovery ladder:
  new sessions → log in again → finalize/initialise the module. Meanwhile
  callers fail fast with :class:`TokenUnavailableError`.
* Errors are told apart by return code (``returns.Fault``): ``CKR_GENERAL_ERROR`` is a
  failed call, answered as such, not a token that went away. The ladder climbs to
  ``C_Finalize``/``C_Initialize`` at once when calls keep failing (``FAULT_LIMIT`` in
  a row) or fail again right after a login that "succeeded" (a module whose connection
  dropped may answer ``CKR_USER_ALREADY_LOGGED_IN`` and then fail every ``C_Sign``).
* Every other module error leaves a loan as :class:`TokenOperationError`: one line,
  with its ``CKR_`` name.
* ``C_Finalize`` while another thread is inside the module crashes it, so the last
  rung waits, under a :class:`_Gate`, until no borrowed session is in use.
* A bounded call (``call_timeout``) runs on a spare thread so that a hung HSM cannot
  hold its caller; but when a :class:`CallSupervisor` covers the calling thread (the
  daemon's request workers), it runs inline, with no thread hand-off, and a watch
  thread tells the supervisor about a caller that is overdue so that it answers for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar, cast

import pkcs11
from pkcs11.constants import TokenFlag

from pkcs11_backends.errors import (
    ModuleLimitError,
    PinError,
    PinIncorrectError,
    PinLockedError,
    Pkcs11Error,
    TokenNotFoundError,
    TokenOperationError,
    TokenTimeoutError,
    TokenUnavailableError,
)
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.native import UNAVAILABLE_INFORMATION
from pkcs11_backends.returns import Fault, ReturnValue, describe, fault_of, rv_of

T = TypeVar("T")

def _stale(exc: BaseException | None) -> pkcs11.PKCS11Error | None:
    """``exc`` if it says the session (and maybe the whole module state) is useless (``returns.Fault.STALE``)."""
    if isinstance(exc, pkcs11.PKCS11Error):
        rv = rv_of(exc)
        if rv is not None and fault_of(rv) is Fault.STALE:
            return exc
    return None


def session_handle(session: pkcs11.Session) -> int:
    """The raw CK_SESSION_HANDLE (python-pkcs11 has it, its type stubs do not)."""
    return int(cast(Any, session).handle)


class PoolState(enum.Enum):
    NEW = "new"
    READY = "ready"
    RECOVERING = "recovering"
    UNAVAILABLE = "unavailable"
    HUNG = "hung"
    PIN_REFUSED = "pin-refused"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class PoolHealth:
    state: PoolState
    detail: str
    since: float
    recoveries: int

    @property
    def ready(self) -> bool:
        return self.state is PoolState.READY


class PooledSession:
    """A borrowed session plus a cache of objects already found on it."""

    def __init__(self, session: pkcs11.Session, generation: int, epoch: int) -> None:
        self.session = session
        self.generation = generation  # login generation: stale after any recovery
        self.epoch = epoch  # module epoch: the handle is meaningless after C_Finalize
        self.objects: dict[Hashable, Any] = {}

    def cached(self, key: Hashable, find: Callable[[pkcs11.Session], T]) -> T:
        try:
            found: T = self.objects[key]
        except KeyError:
            found = self.objects[key] = find(self.session)
        return found


class CallSupervisor(Protocol):
    """Someone who can answer for a thread stuck in a PKCS#11 call (the daemon answers its client)."""

    def covers(self, thread: int) -> bool:
        """Whether calls on this thread (``threading.get_ident()``) may run inline under supervision."""

    def overdue(self, thread: int, error: TokenTimeoutError) -> None:
        """The call on ``thread`` passed its limit: answer its caller with ``error`` now (watch thread)."""


class _Watch:
    """Deadlines of the supervised calls in flight, checked by one thread a few times per limit.

    Registering a call costs a dict entry, not a wake-up: the thread polls, which is
    cheap at this rate, and a limit is seconds long.
    """

    def __init__(self, supervisor: CallSupervisor, on_overdue: Callable[[float], TokenTimeoutError]) -> None:
        self.supervisor = supervisor
        self._on_overdue = on_overdue
        self._calls: dict[int, tuple[float, float]] = {}  # thread -> (deadline, limit)
        self._reported: set[int] = set()
        self._lock = threading.Lock()
        self._tick = 1.0
        self._thread: threading.Thread | None = None

    def enter(self, thread: int, limit: float) -> None:
        with self._lock:
            self._calls[thread] = (time.monotonic() + limit, limit)
            if limit / 5 < self._tick:
                self._tick = max(0.01, limit / 5)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pkcs11-watch", daemon=True)
                self._thread.start()

    def leave(self, thread: int) -> bool:
        """Forget the call; True if it had been reported overdue."""
        with self._lock:
            del self._calls[thread]
            if thread in self._reported:
                self._reported.discard(thread)
                return True
            return False

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:  # marked hung before leave() can see the report: the pool's count stays exact
                late = [(thread, self._on_overdue(limit)) for thread, (deadline, limit) in self._calls.items()
                        if deadline <= now and thread not in self._reported]
                self._reported.update(thread for thread, _ in late)
            for thread, error in late:
                self.supervisor.overdue(thread, error)


class _Lending:
    """Idle sessions, how many are lent, and the gate ``C_Finalize`` closes: all under one lock.

    Borrowing and giving back take that lock once each and wait on nothing unless every
    session is lent or the gate is closed: this is on the path of every signature.
    A lent session is one in use inside the module, so the gate waits for none to be lent.
    """

    def __init__(self, limit: int, name: str) -> None:
        self._name = name  # the token, for errors
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._idle: list[PooledSession] = []
        self._lent = 0
        self._limit = limit
        self._closed = False
        self._waiting = 0

    def borrow(self, timeout: float) -> PooledSession | None:
        """Count one more session lent; an idle one, or None (open one). TokenUnavailableError on timeout."""
        with self._lock:
            if self._closed or self._lent >= self._limit:
                self._wait(timeout)
            self._lent += 1
            return self._idle.pop() if self._idle else None

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._waiting += 1
        try:
            while self._closed or self._lent >= self._limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    if self._closed:
                        raise TokenUnavailableError(f"token {self._name} is being re-initialised")
                    raise TokenUnavailableError(
                        f"no free PKCS#11 session within {timeout:.0f}s ({self._limit} in use)",
                        hint="raise [pkcs11] max_sessions or reduce concurrent load")
                self._changed.wait(left)
        finally:
            self._waiting -= 1

    def give_back(self, pooled: PooledSession | None) -> None:
        """One session less lent; ``pooled`` (if any) is idle again."""
        with self._lock:
            self._lent -= 1
            if pooled is not None:
                self._idle.append(pooled)
            if self._waiting or self._closed:  # a borrower waits for a session, or exclusive() for none lent
                self._changed.notify_all()

    def counts(self) -> tuple[int, int]:
        """Sessions lent and idle, read without the lock (a sample for metrics, not a decision)."""
        return self._lent, len(self._idle)

    def take_idle(self) -> list[PooledSession]:
        with self._lock:
            idle, self._idle = self._idle, []
            return idle

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Yield True once no session is lent (newcomers wait meanwhile), False on timeout."""
        with self._lock:
            self._closed = True
            drained = self._changed.wait_for(lambda: self._lent == 0, timeout)
        try:
            yield drained
        finally:
            with self._lock:
                self._closed = False
                self._changed.notify_all()


class _Loan:
    """``with pool.session() as pooled``: a class, not a generator, as it is entered for every signature."""

    __slots__ = ("_pool", "_pooled", "_timeout")

    def __init__(self, pool: SessionPool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._pooled: PooledSession | None = None

    def __enter__(self) -> PooledSession:
        pool = self._pool
        pool.ensure_ready()
        idle = pool._lending.borrow(self._timeout)
        try:
            self._pooled = pool._take(idle)
        except BaseException as exc:
            self._end(exc)
            raise
        return self._pooled

    def __exit__(self, _kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        pool, pooled = self._pool, self._pooled
        stale = _stale(exc)
        if stale is not None:
            generation = pooled.generation if pooled else pool._generation
            pool._discard(pooled)
            pool._lending.give_back(None)
            # Only once given back: recovery may hold the pool lock while it waits for every loan to end.
            pool._mark_stale(generation, stale)
            raise TokenUnavailableError(f"token {pool.selector} stopped answering: {describe(stale)}") from exc
        if pooled is not None and pooled.generation == pool._generation:
            pool._lending.give_back(pooled)
        else:
            pool._discard(pooled)
            pool._lending.give_back(None)
        if exc is None:
            if pool._faults or pool._on_probation:  # plain reads on the path of every signature
                pool._faults, pool._on_probation = 0, False
        elif isinstance(exc, pkcs11.PKCS11Error):
            rv = rv_of(exc)
            if rv is not None and fault_of(rv) is Fault.MODULE:
                pool._note_fault(pooled.generation if pooled else pool._generation, exc)
            raise TokenOperationError(f"token {pool.selector}: the module answered {describe(exc)}", rv) from exc


class SessionPool:
    RECOVERY_INTERVAL = 1.0
    DRAIN_TIMEOUT = 5.0
    FAULT_LIMIT = 3  # failed calls in a row (CKR_GENERAL_ERROR...) after which the module is started afresh

    def __init__(
        self,
        module: Module,
        selector: TokenSelector,
        pin: Callable[[], bytes],
        max_sessions: int = 8,
        call_timeout: float | None = None,
        *,
        processes: int = 1,
    ) -> None:
        self.module = module
        self.processes = processes
        self._faults = 0
        self._on_probation = False  # recovered by a login alone: the next failure goes to C_Finalize
        self._escalate = False
        self.call_timeout = call_timeout
        self._watch: _Watch | None = None
        self._hung = 0
        self.selector = selector
        self._pin = pin
        self._max = max_sessions
        self._lending = _Lending(max_sessions, str(selector))
        self._lock = threading.Lock()
        self._token: pkcs11.Token | None = None
        self._anchor: pkcs11.Session | None = None
        self._generation = 0
        self._epoch = 0
        self._pin_failure: PinError | None = None
        self._next_recovery = 0.0
        self._health = PoolHealth(PoolState.NEW, "not logged in yet", time.time(), 0)

    # -- state ---------------------------------------------------------------
    @property
    def health(self) -> PoolHealth:
        return self._health

    @property
    def max_sessions(self) -> int:
        return self._max

    def sessions(self) -> tuple[int, int]:
        """Sessions lent (in a call now) and idle (open, waiting for one)."""
        return self._lending.counts()

    @property
    def token(self) -> pkcs11.Token:
        self.start()
        assert self._token is not None
        return self._token

    def _set_state(self, state: PoolState, detail: str, recovered: bool = False) -> None:
        recoveries = self._health.recoveries + (1 if recovered else 0)
        self._health = PoolHealth(state, detail, time.time(), recoveries)

    def set_pin_source(self, pin: Callable[[], bytes]) -> None:
        """A new PIN source (config reload) lifts the refusal after a wrong PIN."""
        with self._lock:
            self._pin = pin
            self._pin_failure = None
            if self._health.state is PoolState.PIN_REFUSED:
                self._set_state(PoolState.NEW, "new PIN source; not logged in yet")

    # -- login ---------------------------------------------------------------
    def start(self) -> None:
        """Log in (once). Raises a :class:`PinError` or :class:`TokenNotFoundError`."""
        if self._anchor is not None:
            return
        with self._lock:
            if self._anchor is None:
                self._login()

    def _login(self) -> None:
        if self._pin_failure is not None:
            raise self._pin_failure
        token = self.module.find_token(self.selector)
        if self._token is None:
            self._check_limits(token)
        flags = token.flags
        if flags & TokenFlag.USER_PIN_LOCKED:
            self._refuse(PinLockedError(f"user PIN of token {token.label!r} is locked"))
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            self._refuse(PinLockedError(
                f"token {token.label!r} has one user PIN try left; the agent will not spend it",
            ))
        if not flags & TokenFlag.USER_PIN_INITIALIZED:
            self._refuse(PinError(
                f"token {token.label!r} has no user PIN set",
                hint="initialise the user PIN (softhsm/make_token.py or pkcs11-tool --init-pin)",
            ))
        anchor = token.open(rw=True)
        rv = self.module.native.login(session_handle(anchor), self._pin())
        if rv in (ReturnValue.OK, ReturnValue.USER_ALREADY_LOGGED_IN):
            self._token, self._anchor = token, anchor
            if self.module.instance_per_call:
                self.module.login_pin = self._pin  # the OpenSSL engine's own instance logs in with it
            self._generation += 1
            self._set_state(PoolState.READY, f"logged in to {token.label!r}")
            return
        anchor.close()
        if rv == ReturnValue.PIN_INCORRECT:
            self._refuse(PinIncorrectError(f"wrong user PIN for token {token.label!r} (tried once, not retried)"))
        if rv == ReturnValue.PIN_LOCKED:
            self._refuse(PinLockedError(f"user PIN of token {token.label!r} is locked"))
        if rv in (ReturnValue.PIN_INVALID, ReturnValue.PIN_LEN_RANGE, ReturnValue.PIN_EXPIRED):
            self._refuse(PinIncorrectError(f"token {token.label!r} rejected the PIN: {ReturnValue.name_of(rv)}"))
        raise TokenUnavailableError(f"C_Login on token {token.label!r} failed: {ReturnValue.name_of(rv)}")

    def _check_limits(self, token: pkcs11.Token) -> None:
        """Refuse a configuration that needs more sessions than the token allows at a time."""
        info = self.module.token_info(token)
        wanted = (self._max + 1) * self.processes  # the anchor holds the login beside the workers
        for limit, what in ((info.ulMaxSessionCount, "sessions"), (info.ulMaxRwSessionCount, "read-write sessions")):
            if limit not in (0, UNAVAILABLE_INFORMATION) and wanted > limit:
                raise ModuleLimitError(
                    f"token {token.label!r} allows {limit} {what} at a time; [pkcs11] max_sessions = {self._max} "
                    f"(plus one for the login) in each of {self.processes} process(es) needs {wanted}")

    def _refuse(self, error: PinError) -> None:
        self._pin_failure = error
        self._set_state(PoolState.PIN_REFUSED, str(error))
        raise error

    # -- borrowing -----------------------------------------------------------
    def session(self, timeout: float = 30.0) -> AbstractContextManager[PooledSession]:
        """Borrow a session for the current thread.

        A PKCS#11 error that means the handles are stale is turned into
        :class:`TokenUnavailableError` after starting recovery.
        """
        return _Loan(self, timeout)

    def call(self, operation: Callable[[PooledSession], T], timeout: float | None = None) -> T:
        """Run an idempotent operation; retried once on a fresh session after recovery.

        With a ``timeout`` (or the pool's ``call_timeout``) the operation runs on a
        worker thread and the caller waits at most that long: a hung HSM cannot hold
        the caller. The hung call keeps its thread; until it returns the pool is
        ``HUNG`` and every new call fails at once. On a thread the supervisor covers
        (:meth:`supervise`) the operation runs inline instead, and the supervisor
        answers for the caller when the limit passes; the late result is dropped.
        """
        limit = timeout if timeout is not None else self.call_timeout
        if limit is None:
            return self._call(operation)
        self._fail_if_hung()
        watch, thread = self._watch, threading.get_ident()
        if watch is not None and watch.supervisor.covers(thread):
            return self._supervised(watch, thread, operation, limit)
        future = self._executor.submit(self._call, operation)
        try:
            return future.result(limit)
        except concurrent.futures.TimeoutError:
            error = self._note_hung(limit)
            future.add_done_callback(self._hung_call_returned)
            raise error from None

    def supervise(self, supervisor: CallSupervisor) -> None:
        """Run bounded calls inline on the threads ``supervisor`` covers; it answers for overdue callers."""
        self._watch = _Watch(supervisor, self._note_hung)

    def _supervised(self, watch: _Watch, thread: int, operation: Callable[[PooledSession], T], limit: float) -> T:
        """The call is timed from when it has its session: a wait for one (every session busy on a slow HSM, with
        more workers than sessions) is not the token hanging. That wait is bounded by ``limit`` too."""
        late = False

        def timed(pooled: PooledSession) -> T:
            nonlocal late
            watch.enter(thread, limit)
            try:
                return operation(pooled)
            finally:
                if watch.leave(thread):
                    late = True
                    self._hung_call_returned()

        result = self._call(timed, limit)
        if late:  # its caller was already told it failed: the result must not leave
            raise TokenTimeoutError(f"token {self.selector} did not answer within {limit:g}s")
        return result

    def _call(self, operation: Callable[[PooledSession], T], wait: float = 30.0) -> T:
        """``operation`` on a session (waiting at most ``wait`` for one), once more on a fresh one if stale."""
        try:
            with self.session(wait) as pooled:
                return operation(pooled)
        except TokenUnavailableError:
            with self.session(wait) as pooled:
                return operation(pooled)

    @functools.cached_property
    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(self._max, thread_name_prefix="pkcs11-call")

    def _fail_if_hung(self) -> None:
        if self._health.state is PoolState.HUNG:
            raise TokenTimeoutError(f"token {self.selector} is not answering: {self._health.detail}")

    def _note_hung(self, limit: float) -> TokenTimeoutError:
        """A call passed its limit: the pool is HUNG until every such call has returned."""
        with self._lock:
            self._hung += 1
            if self._health.state is PoolState.READY:
                self._set_state(PoolState.HUNG, f"a PKCS#11 call has not returned after {limit:g}s")
        return TokenTimeoutError(f"token {self.selector} did not answer within {limit:g}s")

    def _hung_call_returned(self, _: object = None) -> None:
        with self._lock:
            self._hung -= 1
            if self._hung == 0 and self._health.state is PoolState.HUNG:
                self._set_state(PoolState.READY, "the hung PKCS#11 call returned", recovered=True)

    def _take(self, idle: PooledSession | None) -> PooledSession:
        """The session to lend: ``idle`` if it is still of this login, else a new one."""
        if idle is not None:
            if idle.generation == self._generation:
                return idle
            self._discard(idle)
            for stale in self._lending.take_idle():  # all of the same older login
                self._discard(stale)
        token = self._token
        if token is None or self._health.state is not PoolState.READY:
            # Never wait for the pool lock here: recovery holds it while it waits for us to leave.
            raise TokenUnavailableError(f"token {self.selector} is unavailable: {self._health.detail}")
        # A stale error here is handled by the loan, after it has been given back.
        return PooledSession(token.open(rw=True), self._generation, self._epoch)

    def _discard(self, pooled: PooledSession | None) -> None:
        # After C_Finalize a handle number may belong to a new session: never close it then.
        if pooled is None or pooled.epoch != self._epoch:
            return
        with contextlib.suppress(pkcs11.PKCS11Error):
            pooled.session.close()

    # -- recovery ------------------------------------------------------------
    def ensure_ready(self) -> None:
        """Return at once when ready; else log in or walk the recovery ladder (rate-limited), or raise."""
        state = self._health.state
        if state is PoolState.READY:
            return
        if state is PoolState.PIN_REFUSED and self._pin_failure is not None:
            raise self._pin_failure
        if state is PoolState.NEW:
            self.start()
            return
        if state is PoolState.CLOSED:
            raise TokenUnavailableError("session pool is closed")
        self._fail_if_hung()
        self.recover()

    def _mark_stale(self, generation: int, cause: pkcs11.PKCS11Error, escalate: bool = False) -> None:
        with self._lock:
            if generation != self._generation or self._health.state is not PoolState.READY:
                return
            self._escalate = escalate or self._on_probation
            why = "the module keeps failing" if escalate else "stale handles"
            self._set_state(PoolState.RECOVERING, f"{why}: {describe(cause)}")
            self._anchor = None

    def _note_fault(self, generation: int, cause: pkcs11.PKCS11Error) -> None:
        self._faults += 1
        if self._faults >= self.FAULT_LIMIT or self._on_probation:
            self._mark_stale(generation, cause, escalate=True)

    def recover(self, force: bool = False) -> None:
        """Walk the recovery ladder once; raise if the token is still away.

        Attempts are spaced by ``RECOVERY_INTERVAL`` so that a burst of requests
        during an outage fails fast instead of hammering the module.
        """
        with self._lock:
            if self._health.state is PoolState.READY:
                return
            if self._health.state is PoolState.PIN_REFUSED and self._pin_failure is not None:
                raise self._pin_failure
            self._fail_if_hung()
            now = time.monotonic()
            if not force and now < self._next_recovery:
                raise TokenUnavailableError(f"token {self.selector} is unavailable: {self._health.detail}")
            self._next_recovery = now + self.RECOVERY_INTERVAL
            self._generation += 1  # every borrowed and idle session is now stale
            self._anchor = None
            escalate, self._escalate = self._escalate, False
            try:
                if escalate:
                    self._reinitialize()
                    self._login()
                else:
                    try:
                        self._login()
                    except (TokenNotFoundError, TokenUnavailableError, pkcs11.PKCS11Error):
                        # The module's own view of slots may be stale: start it afresh.
                        escalate = True
                        self._reinitialize()
                        self._login()
            except PinError:
                raise
            except pkcs11.PKCS11Error as exc:
                self._escalate = True
                self._set_state(PoolState.UNAVAILABLE, f"token {self.selector} unavailable: {describe(exc)}")
                raise TokenUnavailableError(f"token {self.selector} is unavailable: {describe(exc)}") from exc
            except Pkcs11Error as exc:
                self._escalate = True
                self._set_state(PoolState.UNAVAILABLE, f"token {self.selector} unavailable: {exc}")
                raise TokenUnavailableError(f"token {self.selector} is unavailable: {exc}") from exc
            # A login alone may "succeed" on a module that lost its connection: prove it with the next call.
            self._faults, self._on_probation = 0, not escalate
            self._set_state(PoolState.READY, f"recovered: logged in to {self.selector}", recovered=True)

    def _reinitialize(self) -> None:
        with self._lending.exclusive(self.DRAIN_TIMEOUT) as drained:
            if not drained:
                raise TokenUnavailableError(
                    f"PKCS#11 calls on token {self.selector} did not return within {self.DRAIN_TIMEOUT:.0f}s",
                    hint="the HSM may be hung; the agent retries, restart it if this persists")
            self._epoch += 1
            self._lending.take_idle()  # their handles died with C_Finalize: drop them unclosed
            self.module.reinitialize()

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            for pooled in self._lending.take_idle():
                self._discard(pooled)
            if self._anchor is not None:
                with contextlib.suppress(pkcs11.PKCS11Error):
                    self.module.native.logout(session_handle(self._anchor))
                    self._anchor.close()
                self._anchor = None
            self._set_state(PoolState.CLOSED, "closed")
