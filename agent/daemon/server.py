"""HTTP/1.1 over a Unix socket: one I/O thread, a bounded pool of workers.

The I/O thread accepts, reads and parses; a connection reaches a worker only once
its whole request is buffered, so a slow or half-sent request costs no worker and
is answered 408 when its deadline passes. Beyond ``max_connections`` a new
connection gets 503 with ``Retry-After`` and is closed.

A worker that has answered a keep-alive request waits a moment (``linger``) for the
same client's next one, when no other connection is waiting for a worker: a client
that sends request after request is then served by one thread, with no hand-off
and no thread woken but the one that reads its socket. A request queued for a
worker meanwhile ends the wait at once (it would otherwise wait out the linger
behind a client that has nothing more to ask). That next request must
arrive whole to be served at once; a partial one goes back to the I/O thread with
its deadline. Connections sit in epoll with ``EPOLLONESHOT``: out of the I/O
thread's sight from when they become readable until a worker re-arms them.

The first ``busy_poll`` of a worker's linger is spent polling without sleeping: on
a VM, waking a thread that sleeps costs tens of µs (two processes playing ping-pong:
~60 µs per round trip when they sleep, ~19 when they spin). A client that sends its
next request within the busy poll finds the worker running (97 to 98% of requests
at 1 client with 50 µs); one that does not costs at most that much CPU per answer.
The poll releases the interpreter lock at each turn and sees a request queued for
a worker as the sleeping wait does.

The workers for requests that stay on this host number ``workers`` (the CPUs) while
requests compute, and grow up to ``max_workers`` (the token's sessions and the CPUs) while they
block, as on a network HSM: :mod:`agent.daemon.sizing` measures a sample of the
requests and the lane starts or retires workers to match.

Requests that call a bank (``remote``) have workers of their own, ``bank_workers``:
a bank that answers in seconds cannot hold the workers that sign, and signing needs
few workers (more threads in one process only hand the interpreter lock around).

While the local lane runs on one worker (``workers`` = 1, as each serving process has
under ``processes = "auto"``) and requests compute, the I/O thread answers the routine
requests it reads itself, in the order they came: with two threads that both compute,
every call that releases the interpreter lock (a send, a token call, a write) hands it
to the other thread and back, and each hand-off is a wake-up (ES256 at 8 clients, two
processes: +6 to +14% signatures/s, -12% CPU per request; docs/performance.md). An
administrator's step (``routine`` says which) goes to the worker, so signing goes on
while it generates a key. Once the lane grows (requests block, as on a network HSM),
requests go to the workers again; after a busy turn the I/O thread busy polls its
epoll as a lingering worker polls its client. The price: while a routine token call
is slow (under ``call_timeout``), this process reads no other request, bank calls
included; on a token that stalls those would mostly wait for it anyway (their TLS
and client assertions sign on it).

Token calls run on the serving thread itself (:meth:`Server.serving` tells the
session pool which threads those are); if one passes ``[pkcs11] call_timeout``, the
pool's watch thread has the server answer that client (:meth:`Server.answer_for`)
and start a worker in its place, or a new I/O thread when the stuck one is the I/O
thread; the stuck one drops its late answer and ends. So the I/O loop runs on a
thread of its own, never on the thread that calls :meth:`Server.serve_forever`:
that one (the main thread, where signal handlers run) must never be stuck in a
token call.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable

from agent import waiting
from agent.daemon.framing import CLOSED, EXPECT_CONTINUE, NEED_DATA, Message, RequestReader
from agent.daemon.http import HttpError, Request, Response, interaction_id, new_interaction_id, reply_interaction_id
from agent.daemon.limits import Limits
from agent.daemon.policy import Peer
from agent.daemon.sizing import Meter, Sizing
from agent.log import get_logger

log = get_logger("tpp-agent.daemon")

Handler = Callable[[Request], Response]
# The next connection from the listener; BlockingIOError when none is waiting.
Accept = Callable[[], socket.socket]
# Whether a request calls a bank (it then goes to the bank workers).
Remote = Callable[[Request], bool]
# Whether a local request is routine (a caller's signature, a JWKS): the I/O thread may answer it itself.
Routine = Callable[[Request], bool]
# Whether any policy rule names a peer: a caller with none gets the small quota of ``Limits.stranger_*``.
Known = Callable[[Peer], bool]
# Told of each answer: the operation (None: none was named), the status, the seconds since its first byte.
Observe = Callable[[str | None, int, float], None]
_ARMED = select.EPOLLIN | select.EPOLLONESHOT
IDLE_WORKER_SECONDS = 2.0  # a lane beyond its start that serves nothing this long gives a worker back


def refuse_connection(sock: socket.socket, error: HttpError) -> None:
    """Answer a connection that will not be served, and close it."""
    interaction = new_interaction_id()
    with contextlib.suppress(OSError):
        sock.send(Response.error(error, interaction).render(interaction, keep_alive=False))
        sock.shutdown(socket.SHUT_WR)
    log.info("request", status=error.status, code=error.code, interaction_id=interaction)
    sock.close()


class _Connection:
    def __init__(self, sock: socket.socket, peer: Peer, known: bool, now: float, limits: Limits) -> None:
        self.sock = sock
        self.peer = peer
        self.known = known
        self.reader = RequestReader(limits.max_header_bytes, limits.max_request_bytes)
        self.started = 0.0
        self.deadline = now + limits.idle_timeout
        self.busy = False  # a worker has it: no deadline, no reads until re-armed
        self.answered = False  # the request under way was answered for its worker (hung token call)
        self.writing = threading.Lock()  # the worker and the watch thread may both answer
        # An answer the client is slow to take: the I/O thread sends the rest, then the connection goes on
        # (or closes). A worker never waits on a client that does not read.
        self.outbox = b""
        self.close_after_write = False

    def reset(self, now: float, idle_timeout: float) -> None:
        self.started = 0.0
        self.deadline = now + idle_timeout

    def request_started(self, now: float, timeout: float) -> None:
        self.started = now
        self.deadline = now + timeout


class _Sent(enum.Enum):
    ALL = "all"
    QUEUED = "queued"  # the rest is in the connection's outbox, for the I/O thread
    FAILED = "failed"


class _Linger:
    """A worker's wait for its client's next request, cut short when a request is queued for a worker."""

    def __init__(self) -> None:
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._wake, select.POLLIN)

    def wait(self, sock: socket.socket, seconds: float, busy: float) -> bool:
        """Whether ``sock`` became readable within ``seconds`` (False too when woken); the first ``busy``
        seconds without sleeping."""
        fd = sock.fileno()
        self._poller.register(fd, select.POLLIN)
        try:
            ready: list[tuple[int, int]] = []
            if busy:
                until = time.monotonic() + busy
                while not (ready := self._poller.poll(0)) and time.monotonic() < until:
                    pass
            if not ready:
                ready = self._poller.poll(max(0.0, seconds - busy) * 1000)
        finally:
            self._poller.unregister(fd)
        readable = False
        for ready_fd, _ in ready:
            if ready_fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            else:
                readable = True
        return readable

    def wake(self) -> None:
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        os.close(self._wake)


class _Lane:
    """Workers for one kind of request, the requests waiting for them, and the workers lingering."""

    def __init__(self, name: str, size: int, sizing: Sizing | None = None) -> None:
        self.name = name
        self.size = size  # the workers at the start
        # None in the queue: the worker that takes it ends (the lane shrinks, or the server stops).
        self.queue: queue.SimpleQueue[tuple[_Connection, Request] | None] = queue.SimpleQueue()
        self.lingering: set[_Linger] = set()
        self.started = 0
        self.parked = 0  # requests waiting for their caller's share of this lane (guarded by the server's lock)
        self.sizing = sizing  # None: the lane keeps ``size`` workers
        self.workers = 0  # taking requests: started, less those retired or stuck in a hung call (under resizing)
        self.served = 0.0  # when one of its workers last started on a request (resized lanes only)
        self.resizing = threading.Lock()

    @property
    def idle(self) -> bool:
        """Nobody waits for one of these workers, in the queue or behind their caller's share."""
        return self.queue.empty() and not self.parked

    def put(self, item: tuple[_Connection, Request]) -> None:
        self.queue.put(item)
        self.nudge()

    def nudge(self) -> None:
        """A worker waiting on its last client would leave a request waiting: wake one."""
        if self.lingering:
            with contextlib.suppress(KeyError):
                self.lingering.pop().wake()


class Server:
    def __init__(self, listener: socket.socket, handler: Handler, limits: Limits, *, accept: Accept | None = None,
                 remote: Remote | None = None, routine: Routine | None = None, known: Known | None = None,
                 observe: Observe | None = None) -> None:
        """``listener``: readable when a connection waits; ``accept`` takes it (default: ``listener.accept()``)."""
        self.listener = listener
        self._take = accept or (lambda: listener.accept()[0])
        self.handler = handler
        self.limits = limits
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        grows = limits.max_workers is not None and limits.max_workers > limits.workers
        self._local = _Lane("worker", limits.workers,
                            Sizing(limits.workers, limits.max_workers) if grows and limits.max_workers else None)
        self._remote = remote
        self._routine = routine
        self._known = known
        self._observe = observe
        self._lanes = [self._local] + ([_Lane("bank", limits.bank_workers)] if remote else [])
        # Per caller: connections open, requests each lane holds for it, and those waiting for its share
        # (guarded by _lock). Entries go when they reach zero, so their size follows the callers present.
        self._uid_connections: collections.Counter[int] = collections.Counter()
        self._load: collections.Counter[tuple[int, str]] = collections.Counter()
        self._parked: dict[tuple[int, str], collections.deque[tuple[_Connection, Request]]] = {}
        self._lane_of: dict[int, _Lane] = {}  # by worker thread
        self._replaced: set[int] = set()  # workers stuck in a hung call: they end when it returns
        self._connections: dict[int, _Connection] = {}  # by fd, busy ones included (guarded by _lock)
        self._serving: dict[int, tuple[_Connection, Request]] = {}  # by worker thread, while the handler runs
        self._stopping = threading.Event()
        self._in_flight = 0  # connections a worker has or will have: from dispatch to hand-back
        self._lock = threading.Lock()
        self.heartbeat = time.monotonic()  # the watchdog checks that the I/O loop turns
        self._next_sweep = 0.0
        # The I/O loop's thread: a new generation takes over from one stuck in a token call (answer_for).
        self._loop_generation = 0
        self._loop_thread = 0
        self._ready: collections.deque[tuple[_Connection, Request]] = collections.deque()  # the I/O thread's own
        self._finished = threading.Event()  # the last I/O loop has drained
        self._loop_error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to stop accepting, finish in-flight requests and return (thread-safe)."""
        self._stopping.set()
        self._wake()

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        self._epoll.register(self.listener.fileno(), select.EPOLLIN)
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        for lane in self._lanes:
            for _ in range(lane.size):
                self._start_worker(lane)
        try:
            self._start_loop()
            while not self._finished.wait(0.5):
                pass
            if self._loop_error is not None:
                raise self._loop_error
        finally:
            self._epoll.close()
            self._wake_r.close()
            self._wake_w.close()

    def _start_loop(self) -> None:
        self._loop_generation += 1
        # A daemon thread: one stuck in a hung token call must not keep the process from exiting.
        threading.Thread(target=self._loop, args=(self._loop_generation,), name="io", daemon=True).start()

    def _loop(self, generation: int) -> None:
        """The I/O loop until the server stops (then the drain), or until another thread takes it over."""
        thread = threading.get_ident()
        self._loop_thread = thread
        self._lane_of[thread] = self._local
        waiting.defer_here()  # as a worker: the answers it makes leave once their records are durable
        meter = self._local.sizing.meter() if self._local.sizing is not None else None
        try:
            sent = False
            while self._loop_generation == generation and not self._stopping.is_set():
                sent = self._turn(generation, meter, spin=sent)
            if self._loop_generation == generation:
                while self._ready:  # taken for itself before the stop: the workers answer them
                    self._local.put(self._ready.popleft())
                self._drain()
        except BaseException as exc:  # serve_forever raises it
            if self._loop_generation == generation:
                self._loop_error = exc
        finally:
            del self._lane_of[thread]
            if meter is not None:
                meter.close()
            if self._loop_generation == generation:
                self._finished.set()

    def _turn(self, generation: int, meter: Meter | None, *, spin: bool) -> bool:
        """One turn of the I/O loop; whether it sent answers itself. The next turn then busy polls first, for the
        clients' next requests: not after answers that wait for a sync (``audit_sync = "always"``), which the
        audit trail's committer thread sends, and which a loop spinning on the interpreter lock would delay
        (PS256 at 8 clients -9 to -12%, with it; ES256 no gain)."""
        listener, wake = self.listener.fileno(), self._wake_r.fileno()
        if self._ready:  # requests it took for itself last turn wait: only what is ready now comes first
            events = self._epoll.poll(0)
        elif spin and self.limits.busy_poll:  # the clients just answered are likely to ask again within it
            until = time.monotonic() + self.limits.busy_poll
            while not (events := self._epoll.poll(0)) and time.monotonic() < until:
                pass
            if not events:
                events = self._epoll.poll(0.5)
        else:
            events = self._epoll.poll(0.5)
        for fd, _ in events:
            if fd == listener:
                self._accept()
            elif fd == wake:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            else:
                conn = self._connections.get(fd)
                if conn is not None:
                    self._event(conn)
        self.heartbeat = time.monotonic()
        sent = self._answer_ready(generation, meter)
        if self._loop_generation != generation:  # taken over while stuck: the new loop thread sweeps
            return sent
        now = time.monotonic()
        if now < self._next_sweep:  # deadlines are seconds long: a sweep per turn under load is waste
            return sent
        self._next_sweep = now + 0.1
        with self._lock:
            expired = [c for c in self._connections.values() if not c.busy and c.deadline < now]
        for conn in expired:
            if conn.outbox:
                log.info("request", peer_uid=conn.peer.uid, peer_pid=conn.peer.pid, code="write_timeout",
                         unsent_bytes=len(conn.outbox))
                self._close(conn)
            elif conn.reader.in_progress:
                self._refuse(conn, HttpError(408, "request_timeout",
                                             f"request not complete within {self.limits.request_timeout:g}s",
                                             "send the whole request at once"))
            else:
                self._close(conn)
        return sent

    def _answer_ready(self, generation: int, meter: Meter | None) -> bool:
        """Answer the requests the I/O thread took for itself (:meth:`_hand`) before this turn, in order; whether
        it sent any answer itself. Those taken meanwhile (a pipelined client's next one) wait for the next turn,
        behind what the other connections sent. Stops at once when another thread has taken the loop over (this
        one was stuck in a token call)."""
        thread = threading.get_ident()
        lane = self._local
        sent = False
        for _ in range(len(self._ready)):
            if self._loop_generation != generation:
                break
            conn, request = self._ready.popleft()
            if not self._one_worker(lane):  # the lane grew meanwhile (requests block) or stops: its workers
                lane.put((conn, request))
                continue
            following: Request | None = None
            try:
                following, out = self._serve(thread, lane, None, conn, request, meter=meter)
                sent = sent or out
            except Exception as exc:  # as a worker: the connection is the only casualty
                log.error("worker_failed", peer_uid=conn.peer.uid, error=repr(exc)[:200])
                self._close(conn)
            if self._release(thread, conn, lane):  # a new thread has the loop
                break
            if following is not None:  # behind the requests that came before it
                self._dispatch(conn, following)
        return sent

    def _event(self, conn: _Connection) -> None:
        """A connection the I/O thread watches is ready. Nothing one connection does may end the loop."""
        try:
            if conn.outbox:
                self._flush(conn)
            else:
                self._read(conn)
        except Exception as exc:  # a bug on one connection's path: that connection is the only casualty
            log.error("connection_failed", peer_uid=conn.peer.uid, peer_pid=conn.peer.pid, error=repr(exc)[:200])
            self._refuse(conn, HttpError(400, "bad_request", "the agent could not handle this request",
                                         "see the agent's log; the connection was closed"))

    def _drain(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(self.listener.fileno())
        self._close_idle()
        deadline = time.monotonic() + self.limits.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        for lane in self._lanes:
            for _ in range(lane.started):  # one each; a stuck worker's never gets taken, and does no harm
                lane.queue.put(None)
        self._close_idle()

    def _close_idle(self) -> None:
        with self._lock:
            idle = [c for c in self._connections.values() if not c.busy]
        for conn in idle:
            self._close(conn)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- I/O thread ----------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock = self._take()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                log.warning("accept_failed", error=exc.strerror)
                return
            try:
                self._admit(sock)
            except OSError as exc:  # the peer left before we looked at it
                log.info("accept_failed", error=exc.strerror)
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if len(self._connections) >= self.limits.max_connections:
            self._send_refusal(sock, HttpError(
                503, "too_many_connections", f"the agent already serves {self.limits.max_connections} connections",
                "retry after a second, or reuse keep-alive connections", (("Retry-After", "1"),)))
            return
        peer = Peer.of(sock)
        known = self._known is None or self._known(peer)
        share = self.limits.connections_per_uid if known else self.limits.stranger_connections
        with self._lock:
            crowded = self._uid_connections[peer.uid] >= share
            if not crowded:
                self._uid_connections[peer.uid] += 1
        if crowded:
            hint = ("close idle connections, or reuse keep-alive ones" if known else
                    "a caller with no [policy] rule may only ask /v1/health and /v1/ready; ask the operator for one")
            self._send_refusal(sock, HttpError(503, "too_many_connections",
                                               f"uid {peer.uid} already has {share} connections to the agent",
                                               hint, (("Retry-After", "1"),)))
            return
        conn = _Connection(sock, peer, known, time.monotonic(), self.limits)
        with self._lock:
            self._connections[sock.fileno()] = conn
        self._epoll.register(sock.fileno(), _ARMED)

    def _send_refusal(self, sock: socket.socket, error: HttpError) -> None:
        refuse_connection(sock, error)

    def _read(self, conn: _Connection) -> None:
        self._receive(conn)
        self._go_on(conn)

    def _receive(self, conn: _Connection) -> None:
        """Give what the socket has to the connection's reader (end of file included)."""
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.reader.receive(data)

    def _go_on(self, conn: _Connection) -> None:
        """After a read or a finished answer: dispatch the next whole request, or watch the connection again."""
        request = self._complete(conn)
        if request is not None:
            conn.busy = True
            self._dispatch(conn, request)

    def _complete(self, conn: _Connection) -> Request | None:
        """The next whole request the reader holds; else the connection is watched again, or closed."""
        try:
            while True:
                event = conn.reader.next_event()
                if event is not EXPECT_CONTINUE:
                    break
                with contextlib.suppress(OSError):
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except HttpError as error:
            self._refuse(conn, error)
            return None
        if event is CLOSED:
            self._close(conn)
            return None
        if event is NEED_DATA:
            if conn.reader.in_progress and not conn.started:  # its deadline runs from its first byte
                conn.request_started(time.monotonic(), self.limits.request_timeout)
            conn.busy = False
            self._arm(conn)
            return None
        assert isinstance(event, Message)
        if not conn.started:
            conn.started = time.monotonic()
        try:
            interaction, refusal = interaction_id(event.head.headers), None
        except HttpError as error:  # framed well: answered 400 by a worker, the connection goes on
            interaction, refusal = new_interaction_id(), error
        return Request(event.head, event.body, conn.peer, interaction, refusal=refusal)

    def _flush(self, conn: _Connection) -> None:
        """Send more of an answer the client was slow to take; when it is all out, the connection goes on."""
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if conn.outbox:
            self._watch(conn, select.EPOLLOUT | select.EPOLLONESHOT)
        elif conn.close_after_write:
            self._close(conn)
        else:
            conn.reset(time.monotonic(), self.limits.idle_timeout)
            self._go_on(conn)  # a pipelined request may be whole already

    def _dispatch(self, conn: _Connection, request: Request) -> None:
        lane = self._lane(request)
        key = (conn.peer.uid, lane.name)
        share = (self.limits.in_flight_per_uid or lane.workers) if conn.known else self.limits.stranger_in_flight
        with self._lock:
            self._in_flight += 1
            parked = self._load[key] >= share  # the caller's share is taken: it waits for its own requests only
            if parked:
                self._parked.setdefault(key, collections.deque()).append((conn, request))
                lane.parked += 1
            else:
                self._load[key] += 1
        if parked:
            lane.nudge()  # a worker lingering on this caller's other connection holds a share it does not use
        else:
            self._hand(lane, (conn, request))

    def _release(self, thread: int, conn: _Connection, lane: _Lane) -> bool:
        """After ``thread`` served ``conn``: the caller's share back, unless the thread was stuck in a hung call
        and replaced (the watch thread gave the share back when it answered for it); whether it was."""
        with self._lock:
            replaced = thread in self._replaced
            self._replaced.discard(thread)
        if not replaced:
            self._done(conn, lane)
        return replaced

    def _done(self, conn: _Connection, lane: _Lane) -> None:
        """A worker has finished with a connection: the caller's share frees up for its next waiting request."""
        key = (conn.peer.uid, lane.name)
        with self._lock:  # in flight last: the drain closes idle connections once nothing is in flight
            self._in_flight -= 1
            queued = self._parked.get(key)  # not "waiting": that is the module the workers defer answers with
            if queued:
                item = queued.popleft()
                lane.parked -= 1
                if not queued:
                    del self._parked[key]
            else:
                item = None
                self._load[key] -= 1
                if not self._load[key]:
                    del self._load[key]
        if item is not None:
            self._hand(lane, item)

    def _hand(self, lane: _Lane, item: tuple[_Connection, Request]) -> None:
        """A request to be answered: by the I/O thread itself (it is the one handing it) or by the lane's workers."""
        if self._answers_itself(lane, item[1]):
            self._ready.append(item)
        else:
            lane.put(item)

    def _answers_itself(self, lane: _Lane, request: Request) -> bool:
        """Whether the calling thread is the I/O thread and answers ``request`` itself: a routine request of the
        local lane at one worker, which it has while requests compute. An operator's step (a CSR, a rotation
        step generating a key) goes to the worker: the loop goes on reading and signing meanwhile."""
        return (threading.get_ident() == self._loop_thread and self._one_worker(lane)
                and (self._routine is None or self._routine(request)))

    def _one_worker(self, lane: _Lane) -> bool:
        """``lane`` is the local one, at one worker, and the server is not stopping."""
        return lane is self._local and lane.workers == 1 and not self._stopping.is_set()

    def _lane(self, request: Request) -> _Lane:
        return self._lanes[-1] if self._remote is not None and self._remote(request) else self._local

    def _arm(self, conn: _Connection) -> None:
        self._watch(conn, _ARMED)

    def _watch(self, conn: _Connection, events: int) -> None:
        try:
            self._epoll.modify(conn.sock.fileno(), events)
        except (OSError, ValueError):  # closed meanwhile (drain): nothing left to watch
            self._close(conn)

    def _refuse(self, conn: _Connection, error: HttpError) -> None:
        """Answer a protocol-level error and close (the stream can no longer be trusted)."""
        interaction = reply_interaction_id(conn.reader.head_headers)
        with contextlib.suppress(OSError):
            conn.sock.send(Response.error(error, interaction).render(interaction, keep_alive=False))
        log.info("request", peer_uid=conn.peer.uid, peer_pid=conn.peer.pid, status=error.status, code=error.code,
                 interaction_id=interaction)
        if self._observe is not None:
            self._observe(None, error.status, time.monotonic() - conn.started if conn.started else 0.0)
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        with self._lock:
            if self._connections.get(conn.sock.fileno()) is conn:
                del self._connections[conn.sock.fileno()]
                self._uid_connections[conn.peer.uid] -= 1
                if not self._uid_connections[conn.peer.uid]:
                    del self._uid_connections[conn.peer.uid]
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(conn.sock.fileno())
        conn.sock.close()

    # -- workers -------------------------------------------------------------
    def _start_worker(self, lane: _Lane) -> None:
        with lane.resizing:
            self._spawn(lane)

    def _spawn(self, lane: _Lane) -> None:
        """One more worker (``lane.resizing`` held)."""
        lane.started += 1
        lane.workers += 1
        # Daemon threads: a worker stuck in a hung token call must not keep the process from exiting.
        worker = threading.Thread(target=self._work, args=(lane,), name=f"{lane.name}_{lane.started}", daemon=True)
        worker.start()

    def _work(self, lane: _Lane) -> None:
        thread = threading.get_ident()
        self._lane_of[thread] = lane
        if lane is self._local:  # its signatures leave only in its answers: those can wait, not the worker
            waiting.defer_here()
        linger = _Linger()
        meter = lane.sizing.meter() if lane.sizing is not None else None
        while (item := self._next_item(lane)) is not None:
            conn, request = item
            try:
                next_request: Request | None = request
                while next_request is not None:
                    next_request, _ = self._serve(thread, lane, linger, conn, next_request, meter=meter)
            except Exception as exc:  # never lose a worker: the connection is the only casualty
                log.error("worker_failed", peer_uid=conn.peer.uid, error=repr(exc)[:200])
                self._close(conn)
            finally:
                replaced = self._release(thread, conn, lane)
            if replaced:  # another worker took this one's place while it hung
                break
        del self._lane_of[thread]
        linger.close()
        if meter is not None:
            meter.close()

    def _next_item(self, lane: _Lane) -> tuple[_Connection, Request] | None:
        """The next request for this worker; None when it is to end: the server stops, the lane shrinks, or the
        lane has grown past its start and none of its workers has had anything to do for ``IDLE_WORKER_SECONDS``
        (a lane grown for a burst gives its threads back when the burst is over, as no request is left to
        measure). The lane's, not this worker's: under a steady load from fewer clients than workers, some wait
        all along, and retiring them would start them again at the next window."""
        if lane.sizing is None:
            return lane.queue.get()
        while True:
            try:
                return lane.queue.get(timeout=IDLE_WORKER_SECONDS)
            except queue.Empty:
                with lane.resizing:
                    if lane.workers > lane.size and time.monotonic() - lane.served >= IDLE_WORKER_SECONDS:
                        lane.workers -= 1
                        return None

    def _resize(self, lane: _Lane, wanted: int) -> None:
        """Start or retire workers so that ``wanted`` take requests (retired ones end once idle)."""
        with lane.resizing:
            if self._stopping.is_set() or wanted == lane.workers:
                return
            was = lane.workers
            while lane.workers < wanted:
                self._spawn(lane)
            while lane.workers > wanted:
                lane.workers -= 1
                lane.queue.put(None)
        log.info("workers_resized", lane=lane.name, workers=wanted, was=was)

    def _serve(self, thread: int, lane: _Lane, linger: _Linger | None, conn: _Connection, request: Request, *,
               meter: Meter | None) -> tuple[Request | None, bool]:
        """Answer one request: the same client's next one if it came at once (else None: the connection is handed
        back), and whether the answer is out (False: it leaves once its audit records are durable)."""
        self._serving[thread] = (conn, request)
        wanted = None
        try:
            if meter is not None:
                lane.served = time.monotonic()
                meter.begin()
            response = self._respond(request)
            if meter is not None:
                wanted = meter.end()
        finally:
            del self._serving[thread]
        if wanted is not None:
            self._resize(lane, wanted)
        records = waiting.take_deferred()
        if records:  # the answer leaves once its audit records are durable, and this worker moves on
            trail, seq = max(records, key=lambda record: record[1])
            with self._lock:
                self._in_flight += 1  # until the answer is sent: the drain waits for it
            trail.when_durable(seq, lambda error: self._answer_durable(lane, conn, request, response, error))
            return None, False
        following = self._answer(lane, linger, conn, request, response)
        if following is None or (self._lane(following) is lane and lane.idle):
            return following, True
        # Another caller waits for a worker (or the request is for the other workers): to the back of the queue.
        self._dispatch(conn, following)
        return None, True

    def _answer_durable(self, lane: _Lane, conn: _Connection, request: Request, response: Response,
                        error: Exception | None) -> None:
        """On the audit trail's committer thread: send an answer whose records are now durable (or say why
        they are not); the client's next request, if it came already, goes to the workers."""
        try:
            if error is not None:
                response = Response.error(HttpError(500, "audit_unavailable", str(error),
                                                    getattr(error, "hint", "") or ""), request.interaction_id)
            following = self._answer(lane, None, conn, request, response)
            if following is not None:
                self._dispatch(conn, following)
        except Exception as exc:
            log.error("worker_failed", peer_uid=conn.peer.uid, error=repr(exc)[:200])
            self._close(conn)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, lane: _Lane, linger: _Linger | None, conn: _Connection, request: Request,
                response: Response) -> Request | None:
        """Send ``response`` and log it; the same client's next request if it came at once (lingering for it
        with ``linger``), else None and the connection is handed back (or closed)."""
        keep_alive = request.head.keep_alive and not self._stopping.is_set()
        with conn.writing:
            late = conn.answered
            sent = _Sent.FAILED if late else self._send(conn, response.render(request.interaction_id, keep_alive),
                                                        keep_alive)
        elapsed = time.monotonic() - conn.started
        if self._observe is not None and not late:  # a late answer was counted when the client got its 503
            self._observe(request.log.get("operation"), response.status, elapsed)
        if self.limits.log_successes or response.status >= 400 or late:
            log.info("request", peer_uid=request.peer.uid, peer_pid=request.peer.pid, method=request.method,
                     path=request.path, status=response.status,
                     duration_ms=round(elapsed * 1000, 2),
                     interaction_id=request.interaction_id, **request.log,
                     **({"dropped": "answered already: a token call passed [pkcs11] call_timeout"} if late else {}))
        if sent is _Sent.QUEUED:  # the I/O thread sends the rest, then goes on with the connection
            return None
        if not (keep_alive and sent is _Sent.ALL):
            self._close(conn)
            return None
        return self._next(lane, linger, conn)

    def _respond(self, request: Request) -> Response:
        try:
            if request.refusal is not None:
                raise request.refusal
            return self.handler(request)
        except HttpError as error:
            return Response.error(error, request.interaction_id)
        except Exception:
            log.exception("handler_failed", interaction_id=request.interaction_id)
            return Response.error(HttpError(500, "internal_error", "the agent failed to handle the request",
                                            "see the agent's log for this interaction id"), request.interaction_id)

    def _send(self, conn: _Connection, data: bytes, keep_alive: bool) -> _Sent:
        try:
            sent = conn.sock.send(data)  # an answer fits the socket's buffer unless the client stopped reading
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return _Sent.FAILED
        if sent == len(data):
            return _Sent.ALL
        conn.outbox, conn.close_after_write = data[sent:], not keep_alive
        conn.deadline = time.monotonic() + self.limits.write_timeout
        conn.busy = False
        self._watch(conn, select.EPOLLOUT | select.EPOLLONESHOT)
        return _Sent.QUEUED

    def _next(self, lane: _Lane, linger: _Linger | None, conn: _Connection) -> Request | None:
        """The same client's next request if it is whole at once; else the connection goes back to the I/O thread."""
        conn.reset(time.monotonic(), self.limits.idle_timeout)
        if linger is not None and not conn.reader.in_progress and lane.idle:  # nobody waits for a worker: linger
            lane.lingering.add(linger)
            try:  # a request queued before we were in the set woke nobody: look again
                readable = lane.idle and linger.wait(conn.sock, self.limits.linger, self.limits.busy_poll)
            finally:
                lane.lingering.discard(linger)
            if readable:
                self._receive(conn)
        return self._complete(conn)

    # -- hung token calls ----------------------------------------------------
    def serving(self, thread: int) -> bool:
        """Whether ``thread`` is a worker handling a request (its token calls may run inline)."""
        return thread in self._serving

    def answer_for(self, thread: int, error: HttpError) -> None:
        """Answer the request that ``thread`` is stuck on, now; its own answer will be dropped."""
        entry = self._serving.get(thread)
        if entry is None:
            return
        conn, request = entry
        with conn.writing:
            if conn.answered:
                return
            conn.answered = True
            with contextlib.suppress(OSError):
                conn.sock.send(Response.error(error, request.interaction_id).render(request.interaction_id, False))
                conn.sock.shutdown(socket.SHUT_WR)
        log.warning("request", peer_uid=request.peer.uid, peer_pid=request.peer.pid, method=request.method,
                    path=request.path, status=error.status, code=error.code,
                    interaction_id=request.interaction_id)
        if self._observe is not None:
            self._observe(request.log.get("operation"), error.status, time.monotonic() - conn.started)
        lane = self._lane_of.get(thread)
        with self._lock:
            replacing = lane is not None and thread not in self._replaced
            if replacing:
                self._replaced.add(thread)
        if replacing and lane is not None:
            if thread == self._loop_thread:
                self._start_loop()  # the loop goes on on a new thread; the stuck one ends when its call returns
            else:
                with lane.resizing:
                    lane.workers -= 1  # until its call returns; then it ends
                self._start_worker(lane)
            self._done(conn, lane)  # the caller's next requests must not wait behind the hung one
