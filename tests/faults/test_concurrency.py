"""32 socket clients signing and forwarding at once (short run; ``make stress`` runs 100k requests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbank import ModelBank
from tests.daemon.conftest import public_dir  # noqa: F401 -- fixture
from tests.faults.bank_daemon import daemon_on, isolated_tpp
from tests.faults.load import ProcessSample, run_load, settled, warm_up


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[ModelBank]:
    with ModelBank(tmp_path / "bank") as running:
        yield running


def test_32_clients_sign_and_forward_every_signature_verifies_and_no_fd_leaks(
        tmp_path: Path, public_dir: Path, bank: ModelBank) -> None:  # noqa: F811
    daemon = daemon_on(isolated_tpp(tmp_path / "tpp", bank), bank, public_dir)
    try:
        path = bank.discovery_url[len(bank.issuer):]
        warm_up(daemon.socket_path, 32, path)
        before = ProcessSample.of(daemon.proc.pid)
        report = run_load(daemon.socket_path, 32, 40, 10, path)
        after = settled(daemon.proc.pid, before)
        assert set(report.outcomes) == {"sign ok", "forward 200"}, report.outcomes
        assert report.signatures_verified == 32 * 36 and report.forwards_ok == 32 * 4
        # Every client connection closed again: no growth. (Fewer is fine: the bank may have closed one of
        # the agent's pooled keep-alive connections meanwhile.)
        assert after.fds <= before.fds, (before, after)
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
        daemon.notify.close()
