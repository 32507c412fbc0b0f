"""HTTP/1.1 over a Unix socket: one I/O thread, a bounded pool of workers.

The I/O thread accepts, reads and parses; a connection reaches a worker only once
its whole request is buffered, so a slow or half-sent request costs no worker and
is answered 408 when its deadline passes. Beyond ``max_connections`` a new
connection gets 503 with ``Retry-After`` and is closed. Keep-alive connections
go back to the I/O thread after each response.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from agent.daemon.http import Head, HttpError, Request, Response, interaction_id, parse_head
from agent.daemon.policy import Peer
from agent.log import get_logger

log = get_logger("tpp-agent.daemon")

Handler = Callable[[Request], Response]


@dataclasses.dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    workers: int = 8
    max_request_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10
    request_timeout: float = 10.0   # from a request's first byte to its last
    idle_timeout: float = 60.0      # keep-alive connection with no request under way
    write_timeout: float = 10.0
    drain_timeout: float = 30.0


class _Connection:
    def __init__(self, sock: socket.socket, peer: Peer, now: float, idle_timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.buffer = bytearray()
        self.head: Head | None = None
        self.head_end = 0
        self.length = 0
        self.started = 0.0
        self.deadline = now + idle_timeout

    def reset(self, now: float, idle_timeout: float) -> None:
        self.head, self.head_end, self.length, self.started = None, 0, 0, 0.0
        self.deadline = now + idle_timeout


class Server:
    def __init__(self, listener: socket.socket, handler: Handler, limits: Limits) -> None:
        self.listener = listener
        self.handler = handler
        self.limits = limits
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._returned: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="worker")
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()
        self.heartbeat = time.monotonic()  # the watchdog checks that the I/O loop turns

    # -- lifecycle -----------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to stop accepting, finish in-flight requests and return (thread-safe)."""
        self._stopping.set()
        self._wake()

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, "listener")
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                self._turn()
            self._drain()
        finally:
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _turn(self) -> None:
        for key, _ in self._selector.select(timeout=0.5):
            if key.data == "listener":
                self._accept()
            elif key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
                self._take_back()
            else:
                self._read(key.data)
        now = time.monotonic()
        self.heartbeat = now
        for conn in [c for c in self._connections if c.deadline < now]:
            if conn.buffer or conn.head is not None:
                self._refuse(conn, HttpError(408, "request_timeout",
                                             f"request not complete within {self.limits.request_timeout:g}s",
                                             "send the whole request at once"))
            else:
                self._close(conn)

    def _drain(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.listener)
        for conn in list(self._connections):
            self._close(conn)
        deadline = time.monotonic() + self.limits.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)
        while not self._returned.empty():
            self._returned.get().sock.close()

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
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                log.warning("accept_failed", error=exc.strerror)
                return
            sock.setblocking(False)
            if len(self._connections) + self._in_flight >= self.limits.max_connections:
                self._send_refusal(sock)
                continue
            conn = _Connection(sock, Peer.of(sock), time.monotonic(), self.limits.idle_timeout)
            self._connections.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _send_refusal(self, sock: socket.socket) -> None:
        error = HttpError(503, "too_many_connections",
                          f"the agent already serves {self.limits.max_connections} connections",
                          "retry after a second, or reuse keep-alive connections", (("Retry-After", "1"),))
        interaction = interaction_id({})
        with contextlib.suppress(OSError):
            sock.send(Response.error(error, interaction).render(interaction, keep_alive=False))
            sock.shutdown(socket.SHUT_WR)
        log.info("request", status=503, code=error.code, interaction_id=interaction)
        sock.close()

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if not conn.buffer and conn.head is None:
            conn.started = time.monotonic()
            conn.deadline = conn.started + self.limits.request_timeout
        conn.buffer += data
        self._progress(conn)

    def _progress(self, conn: _Connection) -> None:
        try:
            if conn.head is None:
                end = conn.buffer.find(b"\r\n\r\n")
                limit = self.limits.max_header_bytes
                if end > limit or (end < 0 and len(conn.buffer) > limit):
                    raise HttpError(431, "header_too_large", f"request head exceeds {limit} bytes")
                if end < 0:
                    return
                conn.head = parse_head(bytes(conn.buffer[:end]))
                conn.head_end = end + 4
                conn.length = conn.head.content_length(self.limits.max_request_bytes)
                if (conn.head.headers.get("expect", "").lower() == "100-continue"
                        and len(conn.buffer) < conn.head_end + conn.length):
                    with contextlib.suppress(OSError):
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        except HttpError as error:
            self._refuse(conn, error)
            return
        total = conn.head_end + conn.length
        if len(conn.buffer) < total:
            return
        body = bytes(conn.buffer[conn.head_end:total])
        del conn.buffer[:total]
        request = Request(conn.head, body, conn.peer, interaction_id(conn.head.headers))
        self._selector.unregister(conn.sock)
        self._connections.discard(conn)
        with self._lock:
            self._in_flight += 1
        self._pool.submit(self._work, conn, request)

    def _refuse(self, conn: _Connection, error: HttpError) -> None:
        """Answer a protocol-level error and close (the stream can no longer be trusted)."""
        interaction = interaction_id(conn.head.headers if conn.head else {})
        with contextlib.suppress(OSError):
            conn.sock.send(Response.error(error, interaction).render(interaction, keep_alive=False))
        log.info("request", peer_uid=conn.peer.uid, peer_pid=conn.peer.pid, status=error.status, code=error.code,
                 interaction_id=interaction)
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        self._connections.discard(conn)
        conn.sock.close()

    def _take_back(self) -> None:
        while not self._returned.empty():
            conn = self._returned.get()
            if self._stopping.is_set():
                conn.sock.close()
                continue
            conn.sock.setblocking(False)
            conn.reset(time.monotonic(), self.limits.idle_timeout)
            self._connections.add(conn)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            if conn.buffer:  # a pipelined request is already here
                conn.started = time.monotonic()
                conn.deadline = conn.started + self.limits.request_timeout
                self._progress(conn)

    # -- workers -------------------------------------------------------------
    def _work(self, conn: _Connection, request: Request) -> None:
        keep_alive = False
        try:
            try:
                response = self.handler(request)
            except HttpError as error:
                response = Response.error(error, request.interaction_id)
            except Exception:
                log.exception("handler_failed", interaction_id=request.interaction_id)
                response = Response.error(HttpError(500, "internal_error", "the agent failed to handle the request",
                                                    "see the agent's log for this interaction id"),
                                          request.interaction_id)
            keep_alive = request.head.keep_alive and not self._stopping.is_set()
            conn.sock.setblocking(True)
            conn.sock.settimeout(self.limits.write_timeout)
            try:
                conn.sock.sendall(response.render(request.interaction_id, keep_alive))
            except OSError:
                keep_alive = False
            log.info("request", peer_uid=request.peer.uid, peer_pid=request.peer.pid, method=request.method,
                     path=request.path, status=response.status,
                     duration_ms=round((time.monotonic() - conn.started) * 1000, 2),
                     interaction_id=request.interaction_id, **request.log)
        finally:
            with self._lock:
                self._in_flight -= 1
            if keep_alive:
                self._returned.put(conn)
                self._wake()
            else:
                conn.sock.close()
