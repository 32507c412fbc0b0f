"""Stress: 32 clients, 100k requests (signing, every 10th a forward to the model bank) against one daemon.

    make stress                         # or: pytest -m slow tests/stress
    TPP_STRESS_REQUESTS=200000 make stress

Prints the daemon's RSS, open fds and threads before and after; asserts no failure, every
signature verified, no more fds than before, RSS growth under 16 MiB.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbank import ModelBank
from tests.daemon.conftest import public_dir  # noqa: F401 -- fixture
from tests.faults.bank_daemon import daemon_on, isolated_tpp
from tests.faults.load import ProcessSample, run_load, settled, warm_up

pytestmark = pytest.mark.slow
CLIENTS = 32


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[ModelBank]:
    with ModelBank(tmp_path / "bank") as running:
        yield running


def test_100k_requests_from_32_clients(tmp_path: Path, public_dir: Path, bank: ModelBank) -> None:  # noqa: F811
    total = int(os.environ.get("TPP_STRESS_REQUESTS", "100000"))
    daemon = daemon_on(isolated_tpp(tmp_path / "tpp", bank), bank, public_dir)
    try:
        path = bank.discovery_url[len(bank.issuer):]
        warm_up(daemon.socket_path, CLIENTS, path)
        before = ProcessSample.of(daemon.proc.pid)
        started = time.monotonic()
        report = run_load(daemon.socket_path, CLIENTS, total // CLIENTS, 10, path)
        seconds = time.monotonic() - started
        after = settled(daemon.proc.pid, before)
        print(f"\nstress: {report.requests} requests from {CLIENTS} clients in {seconds:.0f}s "
              f"({report.requests / seconds:.0f}/s); outcomes {dict(report.outcomes)}")
        print(f"stress: signatures verified {report.signatures_verified}, forwards ok {report.forwards_ok}")
        print(f"stress: before {before}\nstress: after  {after}")
        assert set(report.outcomes) <= {"sign ok", "forward 200"}, report.outcomes
        assert after.fds <= before.fds  # no growth (the bank may close a pooled connection meanwhile)
        assert after.rss_kb - before.rss_kb < 16 * 1024
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
        daemon.notify.close()
