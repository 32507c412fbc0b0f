"""Load generator, run as its own process so that its GIL and CPU time are not the agent's.

    python -m bench.load < spec.json      # prints "go" when measuring starts, then one JSON result line

Spec: ``{"mode": "unix" | "https", "threads": N, "seconds": S, "warmup": W, "rate": null | R, ...}``.
``unix`` sends one pre-rendered HTTP/1.1 request (``request_b64``) over keep-alive connections to ``socket``:
the client does as little as a client can, so what is measured is the agent. ``https`` is the baseline of the
forward benchmark: urllib3 with the client key in memory (``cert``, ``key``, ``ca``, ``url``), keep-alive.
Closed loop without ``rate``; with ``rate`` an open loop: requests are due on a fixed schedule and latency counts
from when a request was due, so a slow answer cannot hide the queue behind it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Send = Callable[[], None]


def unix_sender(spec: dict[str, Any]) -> Callable[[], Send]:
    request = base64.b64decode(spec["request_b64"])

    def connect() -> Send:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(spec["socket"])

        def send() -> None:
            sock.sendall(request)
            data = sock.recv(65536)
            while b"\r\n\r\n" not in data:
                data += _more(sock)
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"agent answered {head[:200]!r} {body[:300]!r}")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += _more(sock)

        return send

    return connect


def _more(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise RuntimeError("the agent closed the connection")
    return chunk


def https_sender(spec: dict[str, Any]) -> Callable[[], Send]:
    import urllib3  # only this mode needs it

    host, port, path = spec["host"], spec["port"], spec["path"]

    def connect() -> Send:
        pool = urllib3.HTTPSConnectionPool(host, port, maxsize=1, cert_file=spec["cert"], key_file=spec["key"],
                                           ca_certs=spec["ca"], cert_reqs="CERT_REQUIRED", retries=False)

        def send() -> None:
            answer = pool.request("GET", path)
            if answer.status != 200:
                raise RuntimeError(f"bank answered {answer.status}")

        return send

    return connect


def run(spec: dict[str, Any]) -> dict[str, Any]:
    connect = unix_sender(spec) if spec["mode"] == "unix" else https_sender(spec)
    threads, seconds, warmup = int(spec["threads"]), float(spec["seconds"]), float(spec.get("warmup", 0.3))
    rate = float(spec["rate"]) if spec.get("rate") else 0.0
    senders = [connect() for _ in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    begin = time.monotonic() + 0.05
    start, end = begin + warmup, begin + warmup + seconds

    def closed(n: int) -> None:
        send, own = senders[n], latencies[n]
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            send()
            if t0 >= start:
                own.append(time.monotonic() - t0)

    def opened(n: int) -> None:
        send, own, interval = senders[n], latencies[n], threads / rate
        due = begin + n / rate
        while due < end:
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            send()
            if due >= start:
                own.append(time.monotonic() - due)
            due += interval

    def guarded(n: int) -> None:
        try:
            (opened if rate else closed)(n)
        except Exception as exc:  # reported, and the benchmark fails loudly
            errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=guarded, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, start - time.monotonic()))
    print("go", flush=True)
    cpu0 = sum(os.times()[:2])
    for worker in workers:
        worker.join()
    cpu = sum(os.times()[:2]) - cpu0
    merged = sorted(x for own in latencies for x in own)
    return {"count": len(merged), "seconds": seconds, "rate": len(merged) / seconds,
            "p50_ms": percentile(merged, 50) * 1000, "p99_ms": percentile(merged, 99) * 1000, "client_cpu_seconds": cpu,
            "errors": errors[:3]}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))), flush=True)
