"""A hostile bank: HTTPS/1.1 on 127.0.0.1 (Python ``ssl``, client certificate required) that answers as a test
scripts it: endlessly, a byte at a time, not at all, or by closing a keep-alive connection under a request.

    bank = HostileBank(cert, key, client_ca).start()
    bank.answer = huge(300 << 20)          # any ``Answer``; the next request gets it
    bank.requests, bank.connections       # what arrived
    bank.stop()

Every answer is bounded in time (a test on a transport without limits ends, and fails, instead of hanging).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Protocol

_CHUNK = 64 << 10


@dataclasses.dataclass
class Seen:
    """One request as the bank read it (raw header lines: a smuggled field shows as sent)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    connection: int   # which connection (1, 2, ...)
    on_connection: int  # its place on that connection (1 = first)
    idle: float       # seconds the connection sat idle before it
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class Peer:
    """The bank's side of one connection, for an :data:`Answer`."""

    def __init__(self, sock: ssl.SSLSocket, bank: HostileBank) -> None:
        self.sock = sock
        self.bank = bank
        self.buffer = bytearray()

    def read_body(self, seen: Seen) -> None:
        length = int(seen.header("content-length") or 0)
        while len(self.buffer) < length:
            data = self.sock.recv(_CHUNK)
            if not data:
                raise ConnectionError("client went away")
            self.buffer += data
        seen.body, self.buffer = bytes(self.buffer[:length]), self.buffer[length:]

    def send(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Content-Type: application/json",
                *(f"{k}: {v}" for k, v in headers)]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    def reset(self) -> None:
        """Close with a TCP RST, as a server does that drops a connection it has given up on."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Answer(Protocol):
    def __call__(self, peer: Peer, seen: Seen) -> bool:
        """Answer ``seen`` (its body is not read yet); True keeps the connection for another request."""


def echo(peer: Peer, seen: Seen) -> bool:
    """The request as read: method, path, header lines, body."""
    peer.read_body(seen)
    peer.send(200, json.dumps({"method": seen.method, "path": seen.path, "headers": seen.headers,
                               "connection": seen.connection, "body": seen.body.decode("latin-1")}).encode())
    return True


def huge(total: int, declare: bool = False) -> Answer:
    """``total`` bytes of body, chunked (or with its Content-Length), written as fast as the client reads."""
    def answer(peer: Peer, seen: Seen) -> bool:
        peer.read_body(seen)
        framing = f"Content-Length: {total}" if declare else "Transfer-Encoding: chunked"
        peer.sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
        piece = b"x" * _CHUNK
        sent = 0
        with contextlib.suppress(OSError):
            while sent < total and not peer.bank.stopping.is_set():
                part = piece[:total - sent]
                peer.sock.sendall(part if declare else b"%x\r\n%b\r\n" % (len(part), part))
                sent += len(part)
            if not declare:
                peer.sock.sendall(b"0\r\n\r\n")
        peer.bank.bytes_sent += sent
        return False
    return answer


def drip(seconds: float, every: float = 0.2) -> Answer:
    """A valid answer, sent a byte per ``every`` seconds for ``seconds``, then the rest at once."""
    def answer(peer: Peer, seen: Seen) -> bool:
        peer.read_body(seen)
        body = b'{"slow":true}'
        data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body),
                                                                                                       body)
        until = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            for i, byte in enumerate(data):
                if time.monotonic() >= until or peer.bank.stopping.is_set():
                    peer.sock.sendall(data[i:])
                    break
                peer.sock.sendall(bytes([byte]))
                time.sleep(every)
        return True
    return answer


def idle_closer(timeout: float, announce: bool = True) -> Answer:
    """A server with a keep-alive timeout (``Keep-Alive: timeout=N`` if ``announce``) whose close meets the next
    request: one that arrives on a connection idle for longer is cut without an answer. That is the moment a real
    server's idle timer fires just as the client writes; here it happens every time."""
    def answer(peer: Peer, seen: Seen) -> bool:
        if seen.on_connection > 1 and seen.idle > timeout:
            peer.reset()
            return False
        peer.read_body(seen)
        peer.send(200, json.dumps({"connection": seen.connection}).encode(),
                  (("Keep-Alive", f"timeout={timeout:g}"),) if announce else ())
        return True
    return answer


def closes_reused(read_body: bool) -> Answer:
    """Any request after the first on a connection is cut: after its whole body was read (the bank may have acted
    on it), or right after its head (it cannot have been acted on: the body is still being written)."""
    def answer(peer: Peer, seen: Seen) -> bool:
        if seen.on_connection > 1:
            if read_body:
                peer.read_body(seen)
            peer.reset()
            return False
        peer.read_body(seen)
        peer.send(200, json.dumps({"connection": seen.connection}).encode())
        return True
    return answer


def held(release: threading.Event, limit: float = 20) -> Answer:
    """Answers only once ``release`` is set (or after ``limit`` seconds)."""
    def answer(peer: Peer, seen: Seen) -> bool:
        peer.read_body(seen)
        release.wait(limit)
        peer.send(200, b'{"held":true}')
        return True
    return answer


class HostileBank:
    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(client_ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.answer: Answer = echo
        self.requests: list[Seen] = []
        self.connections = 0
        self.bytes_sent = 0
        self.stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def url(self, path: str = "/") -> str:
        return f"https://localhost:{self.port}{path}"

    def start(self) -> HostileBank:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, raw: socket.socket, number: int) -> None:
        raw.settimeout(30)
        try:
            sock = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        peer = Peer(sock, self)
        count, idle_since = 0, time.monotonic()
        try:
            while not self.stopping.is_set():
                while b"\r\n\r\n" not in peer.buffer:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    peer.buffer += data
                head, rest = bytes(peer.buffer).split(b"\r\n\r\n", 1)
                peer.buffer = bytearray(rest)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [(k, v.strip(" \t")) for k, _, v in (line.partition(":") for line in lines[1:])]
                count += 1
                seen = Seen(method, path, headers, number, count, time.monotonic() - idle_since)
                with self._lock:
                    self.requests.append(seen)
                if not self.answer(peer, seen):
                    return
                idle_since = time.monotonic()
        except (OSError, ValueError, ssl.SSLError):
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()


def rss_kb(pid: int | str = "self") -> int:
    """A process's resident set (``VmRSS``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def by_path(answers: dict[str, Answer], default: Answer = echo) -> Answer:
    """Each path its own answer (a bank with one slow endpoint and one that floods)."""
    def answer(peer: Peer, seen: Seen) -> bool:
        return answers.get(seen.path, default)(peer, seen)
    return answer
