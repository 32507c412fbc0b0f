"""Many socket clients signing and forwarding against one daemon, and what its process looks like
before and after: shared by the short test in ``make test`` and the stress run (``make stress``)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from agent.client import AgentClient
from tests.faults.bank_daemon import BANK


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    rss_kb: int
    fds: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> ProcessSample:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return cls(int(status["VmRSS"].split()[0]), len(os.listdir(f"/proc/{pid}/fd")), int(status["Threads"]))


@dataclasses.dataclass
class LoadReport:
    outcomes: Counter[str]
    signatures_verified: int
    forwards_ok: int

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())


def settled(pid: int, baseline: ProcessSample, timeout: float = 10) -> ProcessSample:
    """A sample once the daemon has closed what the clients closed (the I/O thread sees EOFs a little later)."""
    deadline = time.monotonic() + timeout
    sample = ProcessSample.of(pid)
    while sample.fds > baseline.fds and time.monotonic() < deadline:
        time.sleep(0.1)
        sample = ProcessSample.of(pid)
    return sample


def warm_up(socket_path: Path, clients: int, path: str) -> None:
    """Fill the daemon's worker threads and its pool of TLS connections to the bank (up to max_connections)."""
    run_load(socket_path, clients, 4, 1, path)
    run_load(socket_path, clients, 4, 4, path)


def run_load(socket_path: Path, clients: int, requests_per_client: int, forward_every: int, path: str) -> LoadReport:
    """``clients`` threads, each with its own keep-alive connection; every ``forward_every``-th request forwards."""
    pem = AgentClient(socket_path).public_key_pem("signing").encode()
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    outcomes: Counter[str] = Counter()
    verified = forwards = 0
    lock = threading.Lock()

    def client(number: int) -> None:
        nonlocal verified, forwards
        agent = AgentClient(socket_path, timeout=60)
        local: Counter[str] = Counter()
        ok_signatures = ok_forwards = 0
        for i in range(requests_per_client):
            try:
                if i % forward_every == forward_every - 1:
                    status, _, _ = agent.forward(BANK, "GET", path)
                    outcome = f"forward {status}"
                    ok_forwards += status == 200
                else:
                    data = f"client {number} request {i}".encode()
                    signature = agent.sign("signing", data, "ES256")
                    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                                     int.from_bytes(signature[32:], "big"))
                    public.verify(der, data, ec.ECDSA(hashes.SHA256()))
                    ok_signatures += 1
                    outcome = "sign ok"
            except InvalidSignature:
                outcome = "BAD SIGNATURE"
            except Exception as exc:  # every failure is counted, by kind, for the report
                outcome = f"error {type(exc).__name__}: {str(exc)[:100]}"
            local[outcome] += 1
        agent.close()
        with lock:
            outcomes.update(local)
            verified += ok_signatures
            forwards += ok_forwards

    threads = [threading.Thread(target=client, args=(n,), name=f"load-{n}") for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadReport(outcomes, verified, forwards)
