"""Load generator, run as its own process so that its GIL and CPU time are not the agent's.

    python -m bench.load      # stdin: the spec, then one line per window; stdout: what each window measured

The first line on stdin is the spec: ``{"mode": "unix" | "https" | "pkcs11", "threads": N, ...}``. Once its connections
are open the generator prints ``ready``; then each line ``{"warmup": W, "seconds": S}`` drives one window: it
prints ``go`` when the window opens, ``end`` when it closes (the bench reads the daemon's CPU time at both)
and, once the requests still under way are answered, the window's ``{"count", "client_cpu_seconds",
"errors"}``. At the end of stdin it prints ``{"p50_ms", "p99_ms", "errors"}`` over all windows and exits.

``unix`` sends one pre-rendered HTTP/1.1 request (``request_b64``) over N keep-alive connections to ``socket``,
all driven by one thread with epoll: the client does as little as a client can (no threads handing its own
interpreter lock around on the CPUs the agent needs), so what is measured is the agent. ``https`` is the
baseline of the forward benchmark: N threads, each a urllib3 pool with the client key in memory (``cert``,
``key``, ``ca``, ``url``), keep-alive. ``pkcs11`` signs with python-pkcs11 on the module ``module`` (loaded
after ``environment`` is set: p11-kit's client finds its server there), one session per thread, logged in
with the PIN in ``pin_file``, key ``key`` of token ``token``, ``alg`` ES256 or PS256 over a local SHA-256:
p11-kit 0.24's RPC cannot carry the parameters of CKM_SHA256_RSA_PKCS_PSS, so PS256 is CKM_RSA_PKCS_PSS on
the digest (the same token work).
Closed loop without ``rate``; with ``rate`` (``unix`` only) an open loop: requests are due on a fixed schedule
and latency counts from when a request was due, so a slow answer cannot hide the queue behind it.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import sys
import time
from typing import Any, Protocol

from bench.windows import ClosedLoopThreads, Window, Work, measure, p50_p99_ms

# A request the agent has not answered in this long is lost, not slow: the window fails with that (inside the
# bench's own deadline for a silent generator, so that this message is the one reported). ``answer_seconds`` in
# the spec sets another.
ANSWER_SECONDS = 60.0


class Driver(Protocol):
    latencies: list[float]
    errors: list[str]

    def run(self, window: Window) -> None: ...


class UnixDriver:
    """N keep-alive connections to the agent, one epoll thread."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._request = base64.b64decode(spec["request_b64"])
        self._rate = float(spec.get("rate") or 0.0)
        self._path = spec["socket"]
        self._answer_seconds = float(spec.get("answer_seconds", ANSWER_SECONDS))
        self._socks: dict[int, socket.socket] = {}
        for _ in range(int(spec["threads"])):
            self._connect()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self._socks[sock.fileno()] = sock

    def run(self, window: Window) -> None:
        try:
            self._reconnect_dropped()
            (self._open_loop if self._rate else self._closed_loop)(window)
        except Exception as exc:  # reported, and the benchmark fails loudly
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _reconnect_dropped(self) -> None:
        """Replace the connections the agent closed while they were idle ([daemon] idle_timeout: between two
        windows of a cell, every other cell of the table runs), as an HTTP client does before reusing one."""
        readable, _, _ = select.select(list(self._socks), [], [], 0)
        for fd in readable:  # an idle connection with something to read has been closed (or is broken)
            self._socks.pop(fd).close()
            self._connect()

    def _answered(self, fd: int, buffers: dict[int, bytearray]) -> bool:
        """Read what ``fd`` has; whether that completes an answer."""
        chunk = self._socks[fd].recv(65536)
        if not chunk:
            raise RuntimeError("the agent closed the connection")
        buffer = buffers[fd]
        buffer += chunk
        return answered(buffer)

    def _closed_loop(self, window: Window) -> None:
        """Each connection sends its next request as soon as its answer is in, until the window closes: per
        answer no more than a client must do (3 to 4 µs of client CPU less than scanning every connection)."""
        sent = dict.fromkeys(self._socks, time.monotonic())
        buffers = {fd: bytearray() for fd in self._socks}
        for sock in self._socks.values():
            sock.sendall(self._request)
        with select.epoll() as poller:
            for fd in self._socks:
                poller.register(fd, select.EPOLLIN)
            while sent:
                events = poller.poll(self._answer_seconds)
                if not events:
                    raise RuntimeError(f"no answer from the agent in {self._answer_seconds:g} s to {len(sent)} "
                                       "request(s) under way")
                for fd, _ in events:
                    if not self._answered(fd, buffers):
                        continue
                    done = time.monotonic()
                    if window.holds(done):
                        self.latencies.append(done - sent[fd])
                    if done < window.end:
                        self._socks[fd].sendall(self._request)
                        sent[fd] = done
                    else:
                        del sent[fd]

    def _open_loop(self, window: Window) -> None:
        """Requests due on a fixed schedule, the connections taking turns; latency from when each was due.
        ``select`` waits to the microsecond: epoll's timeout is rounded up to a whole millisecond, which made
        requests leave 0.4 ms late at the median and up to 1 ms late, latency the agent never caused."""
        socks, step = self._socks, len(self._socks) / self._rate
        begin = time.monotonic()
        due = {fd: begin + n / self._rate for n, fd in enumerate(socks)}  # of the request under way, or the next
        waiting: set[int] = set()
        buffers = {fd: bytearray() for fd in socks}
        while True:
            now = time.monotonic()
            for fd, sock in socks.items():  # send what is due on idle connections
                if fd not in waiting and due[fd] <= now and due[fd] < window.end:
                    sock.sendall(self._request)
                    waiting.add(fd)
            if not waiting:
                if now >= window.end:
                    return
                time.sleep(max(0.0, min(due.values()) - now))
                continue
            timeout = max(0.0, min((d for fd, d in due.items() if fd not in waiting), default=now + 0.1) - now)
            readable, _, _ = select.select(list(socks), [], [], timeout)
            if not readable and now - min(due[fd] for fd in waiting) > self._answer_seconds:
                raise RuntimeError(f"no answer from the agent in {self._answer_seconds:g} s to {len(waiting)} "
                                   "request(s) under way")
            for fd in readable:
                if not self._answered(fd, buffers):
                    continue
                done = time.monotonic()
                if window.holds(done):
                    self.latencies.append(done - due[fd])
                waiting.discard(fd)
                due[fd] += step


def answered(buffer: bytearray) -> bool:
    """Whether ``buffer`` holds a whole answer (then consumed); RuntimeError if it is not a 200."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(buffer[:end])
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"agent answered {head[:200]!r} {bytes(buffer[end + 4:end + 300])!r}")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    if len(buffer) < end + 4 + length:
        return False
    del buffer[:end + 4 + length]
    return True


def https_sender(spec: dict[str, Any]) -> Work:
    import urllib3  # only this mode needs it

    pool = urllib3.HTTPSConnectionPool(spec["host"], spec["port"], maxsize=1, cert_file=spec["cert"],
                                       key_file=spec["key"], ca_certs=spec["ca"], cert_reqs="CERT_REQUIRED",
                                       retries=False)

    def send() -> None:
        answer = pool.request("GET", spec["path"])
        if answer.status != 200:
            raise RuntimeError(f"bank answered {answer.status}")

    return send


def pkcs11_signer(spec: dict[str, Any]) -> Work:
    """One session's signing loop body (see the module docstring); on the thread that calls it."""
    import hashlib
    import os

    import pkcs11  # only this mode needs it
    from pkcs11 import MGF, Mechanism, ObjectClass
    from pkcs11.exceptions import UserAlreadyLoggedIn

    os.environ.update(spec.get("environment", {}))
    token = pkcs11.lib(spec["module"]).get_token(token_label=spec["token"])
    with open(spec["pin_file"]) as pin_file:
        pin = pin_file.read().strip()
    try:
        session = token.open(user_pin=pin)
    except UserAlreadyLoggedIn:  # a server that shares one module instance among its clients
        session = token.open()
    key: Any = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=spec["key"])
    data = base64.b64decode(spec["data_b64"])
    if spec["alg"] == "PS256":
        def sign() -> None:
            key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.RSA_PKCS_PSS,
                     mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
    else:
        def sign() -> None:
            key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
    return sign


def say(line: str) -> None:
    print(line, flush=True)


def serve(driver: Driver) -> None:
    say("ready")
    reported = 0  # errors told so far: those of the set-up (a thread's session) come with the first window
    for line in sys.stdin:
        command = json.loads(line)
        window = Window.after(float(command["warmup"]), float(command["seconds"]))
        before = len(driver.latencies)
        cpu = measure(window, driver.run, lambda: say("go"), lambda: say("end"))
        say(json.dumps({"count": len(driver.latencies) - before, "client_cpu_seconds": cpu,
                        "errors": driver.errors[reported:reported + 3]}))
        reported = len(driver.errors)
    p50, p99 = p50_p99_ms(driver.latencies)
    say(json.dumps({"p50_ms": p50, "p99_ms": p99, "errors": driver.errors[:3]}))


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    if spec["mode"] == "unix":
        serve(UnixDriver(spec))
        return
    setup = (lambda: pkcs11_signer(spec)) if spec["mode"] == "pkcs11" else (lambda: https_sender(spec))
    threads = ClosedLoopThreads(int(spec["threads"]), setup)
    try:
        serve(threads)
    finally:
        threads.close()


if __name__ == "__main__":
    main()
