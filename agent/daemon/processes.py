"""Several serving processes on one socket (``[daemon] processes``): one interpreter lock each.

Python runs one thread at a time in a process, so one process cannot keep a
multi-core host's token busy with short signatures (ES256), and its threads spend
CPU handing the lock to each other. With ``processes = N`` the process systemd
started stays the one it knows, holds no PKCS#11 state, and forks N serving
processes, each with its own login, sessions, bank connections and access-token
cache. This process accepts the connections and hands each one to the serving
processes in turn (``SCM_RIGHTS`` over a socket pair): a shared listener would let
the first process awake take them all. Each keeps an audit trail of its own
(``audit.N.jsonl`` beside ``[daemon] audit_file``: no lock between them per record);
the registration records (SQLite) are shared.

What this process tells systemd sums up what they tell it:

* READY=1 once every serving process is ready. Each starts once the one before is
  ready, so a wrong PIN is tried once, and no login writes the token's files (SoftHSM2)
  while another process reads them; a serving process that fails to start passes its
  exit status on (78 for a wrong PIN or a bad config).
* WATCHDOG=1 once every serving process has pinged since the last one: a token call
  that hangs in any of them stops the pings, as with one process.
* SIGHUP: RELOADING=1, each process reloads, READY=1 once all have.
* SIGTERM, SIGINT: STOPPING=1, each process drains, exit 0.
* Each serving process runs on its own share of the CPUs the service may use (``[daemon] cpu_affinity``,
  "auto"), when there are at least as many as processes: one each with ``processes = "auto"``. A request crosses
  a process's threads several times (the I/O thread, a worker waiting on the token, the audit trail's committer),
  each time with the interpreter lock; within one CPU that is a switch on that CPU, across CPUs a wake-up of
  another one (in a VM, an exit) and the lock's cache lines moving. Measured on 2 vCPUs in turns, pinned against
  not: a network HSM (2 ms per signature) signed 12 to 30% faster in the throughput profile and 12 to 45% in the
  default one, ES256 on a local token 9 to 35% faster in the default profile and the same in the throughput
  one (docs/performance.md). With fewer CPUs than processes the shares would overlap, and the kernel balances
  better.
* A serving process that dies unexpectedly stops the others, and the exit status is
  non-zero so that systemd restarts the whole service: one unit, one state. Serving
  processes die with this one (``PR_SET_PDEATHSIG``), never outlive it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable

from agent.daemon.http import HttpError
from agent.daemon.server import Accept, refuse_connection
from agent.daemon.systemd import Notifier
from agent.errors import AgentError, exit_status
from agent.log import get_logger
from pkcs11_backends.errors import Pkcs11Error

log = get_logger("tpp-agent.daemon")

Serve = Callable[[socket.socket], int]  # runs in a serving process, given its channel to this one
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class _Child:
    index: int
    pid: int
    channel: socket.socket  # its sd_notify messages to us, its connections from us
    exited: int  # a pidfd: readable once the process has ended
    ready: bool = False
    pinged: bool = False
    status: int | None = None


def supervise(count: int, listener: socket.socket, serve: Serve, notifier: Notifier, drain_timeout: float, *,
              pin: bool = True) -> int:
    """Run ``serve`` in ``count`` forked processes until told to stop; the exit status for systemd. ``pin``:
    each on its own share of the CPUs (:func:`cpu_shares`)."""
    shares = cpu_shares(count, os.sched_getaffinity(0)) if pin else None
    return _Supervisor(count, listener, serve, notifier, drain_timeout, shares=shares).run()


def cpu_shares(count: int, allowed: Iterable[int]) -> list[frozenset[int]] | None:
    """The CPUs of each of ``count`` serving processes: ``allowed`` cut into runs of neighbours, as even as can
    be; None with one process, or fewer CPUs than processes (shares would overlap)."""
    cpus = sorted(allowed)
    if count < 2 or len(cpus) < count:
        return None
    return [frozenset(cpus[index * len(cpus) // count:(index + 1) * len(cpus) // count]) for index in range(count)]


def connections_from(channel: socket.socket) -> Accept:
    """In a serving process: the connections its supervisor hands over (for :class:`Server`)."""
    def take() -> socket.socket:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
        if not fds:
            raise BlockingIOError("no connection handed over")
        return socket.socket(fileno=fds[0])

    return take


class _Supervisor:
    def __init__(self, count: int, listener: socket.socket, serve: Serve, notifier: Notifier,
                 drain_timeout: float, *, shares: list[frozenset[int]] | None = None) -> None:
        self.count = count
        self.shares = shares
        self.listener = listener
        self._turn = 0
        self.serve = serve
        self.notifier = notifier
        self.drain_timeout = drain_timeout
        self.children: list[_Child] = []
        self._reloading = False
        self._signals_r, self._signals_w = socket.socketpair()

    def run(self) -> int:
        for end in (self._signals_r, self._signals_w):
            end.setblocking(False)
        previous = signal.set_wakeup_fd(self._signals_w.fileno(), warn_on_full_buffer=False)
        for signum in (*_STOP_SIGNALS, signal.SIGHUP):
            signal.signal(signum, _noted)  # the wake-up fd carries the signal to the loop
        try:
            self.notifier.status(f"starting {self.count} serving processes")
            for index in range(self.count):
                self._start(index)
                failed = self._until(lambda: self.children[-1].ready)
                if failed is not None:
                    return failed
            log.info("processes_ready", processes=self.count, pids=[child.pid for child in self.children])
            self.notifier.ready(f"{self.count} serving processes ready")
            self.listener.setblocking(False)
            return self._until(lambda: False, accepting=True) or 0
        finally:
            self._stop()
            signal.set_wakeup_fd(previous)
            self._signals_r.close()
            self._signals_w.close()

    # -- the serving processes -----------------------------------------------
    def _start(self, index: int) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (ours, theirs):  # room for a burst of connections handed over (~1,000)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ours.settimeout(1.0)  # a serving process that takes no connection for a second is skipped
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ours.close()
                self._forget_parent_state()
                _die_with(parent)
                if self.shares is not None:
                    # Before the process starts a thread: every thread it starts inherits the share.
                    _pin(self.shares[index])
                if os.environ.get("WATCHDOG_PID") == str(parent):
                    os.environ["WATCHDOG_PID"] = str(os.getpid())  # its pings go to us, at systemd's pace
                status = self.serve(theirs)
            except (AgentError, Pkcs11Error) as exc:
                # As one process says it (agent/cli): the error, what to do, the status systemd acts on.
                print(f"error: {exc}", file=sys.stderr)
                if exc.hint:
                    print(f"hint: {exc.hint}", file=sys.stderr)
                status = exit_status(exc)
            except BaseException:
                log.exception("serving_process_failed", process=index + 1)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        theirs.close()
        child = _Child(index, pid, ours, os.pidfd_open(pid))
        self.children.append(child)
        return child

    def _forget_parent_state(self) -> None:
        """In a new serving process: the supervisor's fds and signal handling are not its own."""
        signal.set_wakeup_fd(-1)
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it: it has just read the config
        self._signals_r.close()
        self._signals_w.close()
        self.listener.close()
        for child in self.children:
            child.channel.close()
            os.close(child.exited)

    def _until(self, done: Callable[[], bool], accepting: bool = False) -> int | None:
        """Relay and supervise until ``done()``: None; or the exit status when stopping or a process ended."""
        while not done():
            watched: list[int] = [self._signals_r.fileno()] + ([self.listener.fileno()] if accepting else [])
            for child in self.children:
                if child.status is None:
                    watched += [child.channel.fileno(), child.exited]
            readable, _, _ = select.select(watched, [], [], 1.0)
            for fd in readable:
                if fd == self.listener.fileno():
                    self._hand_over()
                    continue
                if fd == self._signals_r.fileno():
                    stop = self._signalled()
                    if stop:
                        return 0
                    continue
                for child in self.children:
                    if fd == child.channel.fileno():
                        self._relay(child, child.channel.recv(4096))
                    elif fd == child.exited and child.status is None:
                        # systemd's stop signals every process of the unit: one may end before our own signal
                        # shows in this select, and its end is then no failure.
                        if self._signalled():
                            return 0
                        return self._ended(child)
        return None

    def _hand_over(self) -> None:
        """Each waiting connection to the next serving process (round robin)."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the connection waits in the backlog
                log.warning("accept_failed", error=exc.strerror)
                return
            for _ in range(self.count):
                child = self.children[self._turn % self.count]
                self._turn += 1
                if child.status is not None:
                    continue
                try:
                    socket.send_fds(child.channel, [b"c"], [sock.fileno()])
                except OSError:
                    continue
                sock.close()
                break
            else:
                refuse_connection(sock, HttpError(503, "agent_busy", "no serving process took the connection",
                                                  "retry after a second", (("Retry-After", "1"),)))

    def _signalled(self) -> bool:
        try:
            received = self._signals_r.recv(64)
        except BlockingIOError:
            return False
        if any(signum in received for signum in _STOP_SIGNALS):
            return True
        if signal.SIGHUP in received:
            self._reload()
        return False

    def _relay(self, child: _Child, message: bytes) -> None:
        for line in message.decode("utf-8", "replace").split("\n"):
            key, _, value = line.partition("=")
            if key == "READY":
                child.ready = True
            elif key == "WATCHDOG":
                child.pinged = True
            elif key == "STATUS":
                self.notifier.status(f"process {child.index + 1}/{self.count}: {value}")
        if all(c.pinged for c in self.children) and len(self.children) == self.count:
            self.notifier.watchdog()
            for c in self.children:
                c.pinged = False
        if self._reloading and all(c.ready for c in self.children):
            self._reloading = False
            self.notifier.ready(f"{self.count} serving processes reloaded")

    def _reload(self) -> None:
        self.notifier.notify(RELOADING="1", STATUS="reloading configuration",
                             MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        self._reloading = True
        for child in self.children:
            child.ready = False
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGHUP)

    def _ended(self, child: _Child) -> int:
        _, wait_status = os.waitpid(child.pid, 0)
        child.status = os.waitstatus_to_exitcode(wait_status)
        log.error("serving_process_ended", process=child.index + 1, pid=child.pid, status=child.status,
                  hint="the other serving processes are stopped; systemd restarts the service")
        return child.status if child.status > 0 else 1

    def _stop(self) -> None:
        """Each living serving process drains (SIGTERM), then is killed if it outlasts the drain."""
        living = [child for child in self.children if child.status is None]
        if living:
            self.notifier.stopping()
        for child in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + 5
        for child in living:
            remaining = max(0.0, deadline - time.monotonic())
            if not select.select([child.exited], [], [], remaining)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            _, wait_status = os.waitpid(child.pid, 0)
            child.status = os.waitstatus_to_exitcode(wait_status)
        for child in self.children:
            child.channel.close()
            os.close(child.exited)


def _noted(signum: int, frame: object) -> None:
    """A Python-level handler must exist for the wake-up fd to be written instead of the default action."""


def cpu_list(cpus: Iterable[int]) -> str:
    """As the kernel writes it (``Cpus_allowed_list``): "0-3,8"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def _pin(cpus: frozenset[int]) -> None:
    # Refused by a seccomp filter (a unit without packaging/systemd's SystemCallFilter=sched_setaffinity) or for a
    # CPU taken offline since the supervisor looked: the kernel places this process, and the service goes on.
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        log.warning("cpu_affinity_failed", cpus=sorted(cpus), error=exc.strerror)


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
