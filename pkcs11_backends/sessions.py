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
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol, TypeVar, cast

import pkcs11
from pkcs11.constants import TokenFlag

from pkcs11_backends.errors import (
    PinError,
    PinIncorrectError,
    PinLockedError,
    Pkcs11Error,
    TokenNotFoundError,
    TokenTimeoutError,
    TokenUnavailableError,
)
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.native import ReturnValue

T = TypeVar("T")

# Errors after which the session (and maybe the whole module state) is useless.
STALE_ERRORS: tuple[type[Exception], ...] = (
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.TokenNotRecognised,
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.KeyHandleInvalid,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.GeneralError,
)


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


class _Gate:
    """Many threads may be inside the module at once; ``C_Finalize`` needs none to be."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._closed = False

    def enter(self, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._closed, timeout):
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Yield True once nobody is inside (newcomers wait meanwhile), False on timeout."""
        with self._cond:
            self._closed = True
            drained = self._cond.wait_for(lambda: self._inside == 0, timeout)
        try:
            yield drained
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


class SessionPool:
    RECOVERY_INTERVAL = 1.0
    DRAIN_TIMEOUT = 5.0

    def __init__(
        self,
        module: Module,
        selector: TokenSelector,
        pin: Callable[[], bytes],
        max_sessions: int = 8,
        call_timeout: float | None = None,
    ) -> None:
        self.module = module
        self.call_timeout = call_timeout
        self._watch: _Watch | None = None
        self._hung = 0
        self.selector = selector
        self._pin = pin
        self._max = max_sessions
        self._idle: queue.LifoQueue[PooledSession] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._gate = _Gate()
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

    def _refuse(self, error: PinError) -> None:
        self._pin_failure = error
        self._set_state(PoolState.PIN_REFUSED, str(error))
        raise error

    # -- borrowing -----------------------------------------------------------
    @contextlib.contextmanager
    def session(self, timeout: float = 30.0) -> Iterator[PooledSession]:
        """Borrow a session for the current thread.

        A PKCS#11 error that means the handles are stale is turned into
        :class:`TokenUnavailableError` after starting recovery.
        """
        self.ensure_ready()
        if not self._slots.acquire(timeout=timeout):
            raise TokenUnavailableError(
                f"no free PKCS#11 session within {timeout:.0f}s ({self._max} in use)",
                hint="raise [pkcs11] max_sessions or reduce concurrent load",
            )
        if not self._gate.enter(timeout):
            self._slots.release()
            raise TokenUnavailableError(f"token {self.selector} is being re-initialised")
        pooled: PooledSession | None = None
        stale: tuple[int, Exception] | None = None
        try:
            pooled = self._take()
            yield pooled
        except STALE_ERRORS as exc:
            stale = (pooled.generation if pooled else self._generation, exc)
            self._discard(pooled)
            pooled = None
            raise TokenUnavailableError(f"token {self.selector} stopped answering: {exc!r}") from exc
        finally:
            if pooled is not None:
                if pooled.generation == self._generation:
                    self._idle.put(pooled)
                else:
                    self._discard(pooled)
            self._gate.leave()
            self._slots.release()
            # Only after leaving the gate: recovery may hold the pool lock while it waits for us.
            if stale is not None:
                self._mark_stale(*stale)

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
        watch.enter(thread, limit)
        try:
            result = self._call(operation)
        finally:
            late = watch.leave(thread)
            if late:
                self._hung_call_returned()
        if late:  # its caller was already told it failed: the result must not leave
            raise TokenTimeoutError(f"token {self.selector} did not answer within {limit:g}s")
        return result

    def _call(self, operation: Callable[[PooledSession], T]) -> T:
        try:
            with self.session() as pooled:
                return operation(pooled)
        except TokenUnavailableError:
            with self.session() as pooled:
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

    def _take(self) -> PooledSession:
        while True:
            try:
                pooled = self._idle.get_nowait()
            except queue.Empty:
                break
            if pooled.generation == self._generation:
                return pooled
            self._discard(pooled)
        token = self._token
        if token is None or self._health.state is not PoolState.READY:
            # Never wait for the pool lock here: recovery holds it while it waits for us to leave.
            raise TokenUnavailableError(f"token {self.selector} is unavailable: {self._health.detail}")
        # A stale error here is handled by session(), outside the gate.
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

    def _mark_stale(self, generation: int, cause: Exception) -> None:
        with self._lock:
            if generation != self._generation or self._health.state is not PoolState.READY:
                return
            self._set_state(PoolState.RECOVERING, f"stale handles: {cause!r}")
            self._anchor = None

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
            try:
                try:
                    self._login()
                except (TokenNotFoundError, TokenUnavailableError, pkcs11.PKCS11Error):
                    # The module's own view of slots may be stale: start it afresh.
                    self._reinitialize()
                    self._login()
            except PinError:
                raise
            except (Pkcs11Error, pkcs11.PKCS11Error) as exc:
                self._set_state(PoolState.UNAVAILABLE, f"token {self.selector} unavailable: {exc}")
                raise TokenUnavailableError(f"token {self.selector} is unavailable: {exc}") from exc
            self._set_state(PoolState.READY, f"recovered: logged in to {self.selector}", recovered=True)

    def _reinitialize(self) -> None:
        with self._gate.exclusive(self.DRAIN_TIMEOUT) as drained:
            if not drained:
                raise TokenUnavailableError(
                    f"PKCS#11 calls on token {self.selector} did not return within {self.DRAIN_TIMEOUT:.0f}s",
                    hint="the HSM may be hung; the agent retries, restart it if this persists")
            self._epoch += 1
            while True:  # their handles died with C_Finalize: drop them unclosed
                try:
                    self._idle.get_nowait()
                except queue.Empty:
                    break
            self.module.reinitialize()

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            while True:
                try:
                    self._discard(self._idle.get_nowait())
                except queue.Empty:
                    break
            if self._anchor is not None:
                with contextlib.suppress(pkcs11.PKCS11Error):
                    self.module.native.logout(session_handle(self._anchor))
                    self._anchor.close()
                self._anchor = None
            self._set_state(PoolState.CLOSED, "closed")
