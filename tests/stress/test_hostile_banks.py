"""Stress: a well-behaved caller's signatures while hostile banks flood and drip (issue 16, items 2 and 3).

    make stress                         # or: pytest -m slow -s tests/stress/test_hostile_banks.py
    TPP_HOSTILE_SECONDS=30 ...          # longer phases (default 10 s each)

One daemon with default settings and two banks: the model bank, and a hostile bank that answers
300 MB to ``/huge`` and drips every other answer (its discovery document included) a byte per
0.5 s, so that no drip ends before ``request_timeout`` (30 s). The caller signs (PS256) one
request after another, alone first, then for as long again while 4 threads forward to ``/huge`` in a loop,
4 forward to a dripping path and 2 ask for client assertions (whose discovery fetch drips). The
daemon's RSS is sampled every 0.1 s. Prints p50/p99 of both phases, the ratio, the RSS peak and
the hostile calls' outcomes; asserts that the RSS stays within 100 MB (a failed signature fails the run).
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
    alone = signing_latencies(client, PHASE)

    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    peak = [rss_kb(pid)]

    def hostile(call: str) -> None:
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

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.1)

    threads = [threading.Thread(target=hostile, args=(call,), daemon=True)
               for call in ["huge"] * 4 + ["drip"] * 4 + ["assertion"] * 2]
    threads.append(threading.Thread(target=sample, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(2)  # the drips are under way, the floods keep coming
    loaded = signing_latencies(client, PHASE)
    stop.set()
    for thread in threads:
        thread.join(HOSTILE_FOR)
    p50a, p99a, p50l, p99l = (percentile(alone, 0.5), percentile(alone, 0.99), percentile(loaded, 0.5),
                              percentile(loaded, 0.99))
    print(f"\nhostile: {len(alone)} PS256 signatures alone in {PHASE:g} s: p50 {p50a:.2f} ms, p99 {p99a:.2f} ms")
    print(f"hostile: {len(loaded)} under hostile banks in {PHASE:g} s: p50 {p50l:.2f} ms, p99 {p99l:.2f} ms "
          f"(p99 x{p99l / p99a:.1f})")
    print(f"hostile: daemon RSS {rss_before / 1024:.1f} MB before, peak {peak[0] / 1024:.1f} MB")
    print(f"hostile: hostile calls {dict(sorted(outcomes.items()))}; bytes the flood sent "
          f"{banks.evil.bytes_sent / 2**20:.0f} MB")
    assert peak[0] < 100 * 1024, f"RSS peaked at {peak[0] / 1024:.0f} MB"
    assert banks.daemon.proc.poll() is None
