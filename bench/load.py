"""Load generator, run as its own process so that its GIL and CPU time are not the agent's.

    python -m bench.load < spec.json      # prints "go" when measuring starts, then one JSON result line

Spec: ``{"mode": "unix" | "https", "threads": N, "seconds": S, "warmup": W, "rate": null | R, ...}``.
``unix`` sends one pre-rendered HTTP/1.1 request (``request_b64``) over N keep-alive connections to ``socket``,
all driven by one thread with epoll: the client does as little as a client can (no threads handing its own
interpreter lock around on the CPUs the agent needs), so what is measured is the agent. ``https`` is the
baseline of the forward benchmark: N threads, each a urllib3 pool with the client key in memory (``cert``,
``key``, ``ca``, ``url``), keep-alive.
Closed loop without ``rate``; with ``rate`` an open loop: requests are due on a fixed schedule and latency counts
from when a request was due, so a slow answer cannot hide the queue behind it.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Send = Callable[[], None]


class _Window:
    """When load starts, when measuring starts and ends, and the schedule of an open loop."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.connections = int(spec["threads"])
        seconds, warmup = float(spec["seconds"]), float(spec.get("warmup", 0.3))
        self.rate = float(spec["rate"]) if spec.get("rate") else 0.0
        self.begin = time.monotonic() + 0.05
        self.start, self.end = self.begin + warmup, self.begin + warmup + seconds

    def first_due(self, n: int) -> float:
        """When connection ``n``'s first request is due (open loop: the connections take turns)."""
        return self.begin + n / self.rate if self.rate else self.begin

    def next_due(self, due: float, now: float) -> float:
        return due + self.connections / self.rate if self.rate else now


def run_unix(spec: dict[str, Any], window: _Window, latencies: list[float], errors: list[str]) -> None:
    request = base64.b64decode(spec["request_b64"])
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    due: dict[int, float] = {}  # when the request under way (or the next one) was due
    waiting: set[int] = set()  # connections with a request under way
    buffers: dict[int, bytearray] = {}
    for n in range(window.connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(spec["socket"])
        socks[sock.fileno()], due[sock.fileno()], buffers[sock.fileno()] = sock, window.first_due(n), bytearray()
        poller.register(sock.fileno(), select.EPOLLIN)
    time.sleep(max(0.0, window.begin - time.monotonic()))
    try:
        while True:
            now = time.monotonic()
            for fd, sock in socks.items():  # send what is due on idle connections
                if fd not in waiting and due[fd] <= now and due[fd] < window.end:
                    sock.sendall(request)
                    waiting.add(fd)
            if not waiting:
                if now >= window.end:
                    return
                time.sleep(max(0.0, min(due.values()) - now))
                continue
            timeout = max(0.0, min((d for fd, d in due.items() if fd not in waiting), default=now + 0.1) - now)
            for fd, _ in poller.poll(timeout):
                buffer = buffers[fd]
                chunk = socks[fd].recv(65536)
                if not chunk:
                    raise RuntimeError("the agent closed the connection")
                buffer += chunk
                if not answered(buffer):
                    continue
                done = time.monotonic()
                if due[fd] >= window.start:
                    latencies.append(done - due[fd])
                waiting.discard(fd)
                due[fd] = window.next_due(due[fd], done)
    except Exception as exc:  # reported, and the benchmark fails loudly
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        poller.close()
        for sock in socks.values():
            sock.close()


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


def https_sender(spec: dict[str, Any]) -> Send:
    import urllib3  # only this mode needs it

    pool = urllib3.HTTPSConnectionPool(spec["host"], spec["port"], maxsize=1, cert_file=spec["cert"],
                                       key_file=spec["key"], ca_certs=spec["ca"], cert_reqs="CERT_REQUIRED",
                                       retries=False)

    def send() -> None:
        answer = pool.request("GET", spec["path"])
        if answer.status != 200:
            raise RuntimeError(f"bank answered {answer.status}")

    return send


def run_threads(spec: dict[str, Any], window: _Window, latencies: list[float], errors: list[str]) -> None:
    senders = [https_sender(spec) for _ in range(window.connections)]

    def loop(n: int) -> None:
        send, own = senders[n], latencies
        due = window.first_due(n)
        try:
            while due < window.end:
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                elif not window.rate:
                    due = now
                send()
                done = time.monotonic()
                if due >= window.start:
                    own.append(done - due)  # list.append is atomic: one list for all threads
                due = window.next_due(due, done)
        except Exception as exc:  # reported, and the benchmark fails loudly
            errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(window.connections)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    window = _Window(spec)
    latencies: list[float] = []
    errors: list[str] = []
    drive = run_unix if spec["mode"] == "unix" else run_threads
    result: dict[str, Any] = {}

    def measure() -> None:
        time.sleep(max(0.0, window.start - time.monotonic()))
        print("go", flush=True)
        result["cpu0"] = sum(os.times()[:2])

    announcer = threading.Thread(target=measure)
    announcer.start()
    drive(spec, window, latencies, errors)
    announcer.join()
    cpu = sum(os.times()[:2]) - result["cpu0"]
    latencies.sort()
    seconds = window.end - window.start
    return {"count": len(latencies), "seconds": seconds, "rate": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "client_cpu_seconds": cpu, "errors": errors[:3]}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))), flush=True)
