"""Stress: a well-behaved caller's signatures while hostile banks flood and drip (issue 16, items 2 and 3).

    make stress                         # or: pytest -m slow -s tests/stress/test_hostile_banks.py
    TPP_HOSTILE_SECONDS=30 ...          # longer phases (default 10 s each)

One daemon with default settings and two banks: the model bank, and a hostile bank that answers
300 MB to ``/huge`` and drips every other answer (its discovery document included) a byte per
0.5 s, so that no drip ends before ``request_timeout`` (30 s). The caller signs (PS256) one
request after another: alone, then for as long again while 4 threads forward to ``/huge`` in a
loop, then while those 4, 4 forwarding to a dripping path and 2 asking for client assertions (whose
discovery fetch drips) run. The daemon's RSS is sampled every 0.1 s. Prints p50/p99 of each
phase, the ratio to the first, the RSS peak and the hostile calls' outcomes; asserts that the
RSS stays within 100 MB (a failed signature fails the run).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient, AgentRequestError
from modelbank import ModelBank
from tests.daemon.conftest import public_dir  # noqa: F401 -- fixture
from tests.daemon.test_hostile_banks import EVIL, Banks, start
from tests.openfinance.conftest import Tpp, bank, tpp  # noqa: F401 -- fixtures
from tests.transport.hostile import by_path, drip, huge, rss_kb

pytestmark = pytest.mark.slow
PHASE = float(os.environ.get("TPP_HOSTILE_SECONDS", "10"))
HOSTILE_FOR = 60.0  # seconds the hostile callers may take to finish after the phase


@pytest.fixture
def banks(tpp: Tpp, bank: ModelBank, public_dir: Path, tmp_path: Path) -> Iterator[Banks]:  # noqa: F811
    yield from start(tpp, bank, public_dir, tmp_path)


def signing_latencies(client: AgentClient, seconds: float) -> list[float]:
    times: list[float] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.perf_counter()
        client.sign("signing", b"payment %d" % len(times), "PS256")
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100)[int(share * 100) - 1]


def test_signing_latency_and_memory_under_hostile_banks(banks: Banks) -> None:
    banks.evil.answer = by_path({"/huge": huge(300 << 20)}, default=drip(seconds=60, every=0.5))
    client = banks.daemon.client()
    signing_latencies(client, 1)  # warm-up: sessions, connections
    pid = banks.daemon.proc.pid
    rss_before = rss_kb(pid)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    peak = [rss_kb(pid)]

    def hostile(call: str, stop: threading.Event) -> None:
        agent = AgentClient(banks.daemon.socket_path, timeout=90)
        while not stop.is_set():
            try:
                if call == "assertion":
                    agent.client_assertion(EVIL)
                    result = "assertion ok"
                else:
                    result = f"{call} {agent.forward(EVIL, 'GET', '/huge' if call == 'huge' else '/drip')[0]}"
            except AgentRequestError as error:
                result = f"{call} {error.status} {error.code}"
                if error.code == "bank_busy":
                    time.sleep(0.2)  # as Retry-After asks (a bit sooner)
            with lock:
                outcomes[result] += 1

    def sample(stop: threading.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.1)

    def under(calls: list[str]) -> list[float]:
        """Signing latencies while ``calls`` run, each in a loop on its own connection."""
        stop = threading.Event()
        threads = [threading.Thread(target=hostile, args=(call, stop), daemon=True) for call in calls]
        threads.append(threading.Thread(target=sample, args=(stop,), daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(2)  # the drips are under way, the floods keep coming
        latencies = signing_latencies(client, PHASE)
        stop.set()
        for thread in threads:
            thread.join(HOSTILE_FOR)
        return latencies

    phases = {"alone": signing_latencies(client, PHASE),
              "300 MB floods (4 callers)": under(["huge"] * 4),
              "floods, drips (4) and client assertions on a dripping discovery (2)":
                  under(["huge"] * 4 + ["drip"] * 4 + ["assertion"] * 2)}
    base = percentile(phases["alone"], 0.99)
    print()
    for name, latencies in phases.items():
        p99 = percentile(latencies, 0.99)
        print(f"hostile: {name}: {len(latencies)} PS256 signatures in {PHASE:g} s, p50 "
              f"{percentile(latencies, 0.5):.2f} ms, p99 {p99:.2f} ms (x{p99 / base:.1f})")
    print(f"hostile: daemon RSS {rss_before / 1024:.1f} MB before, peak {peak[0] / 1024:.1f} MB")
    print(f"hostile: hostile calls {dict(sorted(outcomes.items()))}; bytes the flood sent "
          f"{banks.evil.bytes_sent / 2**20:.0f} MB")
    assert peak[0] < 100 * 1024, f"RSS peaked at {peak[0] / 1024:.0f} MB"
    assert banks.daemon.proc.poll() is None
