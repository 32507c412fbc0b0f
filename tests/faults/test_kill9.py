"""kill -9 in the middle of registration and signing bursts: after a restart the registration log
and the audit chain are intact and agree with what the bank saw."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.audit import Finding, trail_files, verify
from agent.client import AgentClient
from modelbank import ModelBank
from tests.daemon.conftest import launch, public_dir  # noqa: F401 -- fixture
from tests.faults.bank_daemon import BANK, daemon_on, isolated_tpp


def _verify_all(audit_file: Path) -> tuple[int, list[Finding]]:
    """Records and findings of every serving process's trail (the default runs one process per CPU)."""
    results = [verify(path) for path in trail_files(audit_file)]
    return sum(count for count, _ in results), [finding for _, found in results for finding in found]


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[ModelBank]:
    with ModelBank(tmp_path / "bank") as running:
        yield running


def burst(socket_path: Path, stop: threading.Event, register: bool) -> None:
    client = AgentClient(socket_path, timeout=10)
    while not stop.is_set():
        try:
            if register:
                client.register(BANK, force=True)
            else:
                client.sign("signing", b"burst", "ES256")
        except Exception:  # the daemon dies under us: that is the point
            time.sleep(0.01)


def test_kill_9_mid_burst_loses_nothing(tmp_path: Path, public_dir: Path, bank: ModelBank) -> None:  # noqa: F811
    tpp = isolated_tpp(tmp_path / "tpp", bank)
    daemon = daemon_on(tpp, bank, public_dir)
    stop = threading.Event()
    threads = [threading.Thread(target=burst, args=(daemon.socket_path, stop, n < 2)) for n in range(6)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(bank.registrations) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        daemon.notify.close()
    assert daemon.proc.returncode == -signal.SIGKILL

    records, findings = _verify_all(daemon.audit_file)
    assert findings == [] and records > 2
    db = sqlite3.connect(tpp.state / "registrations.sqlite3")
    rows = {iid: outcome for iid, outcome in db.execute("SELECT interaction_id, outcome FROM registrations")}
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    seen_by_bank = {r.interaction_id for r in bank.registrations}
    # Every registration the bank recorded is on our disk, as registered or as pending (killed before its
    # answer was written), never missing; and nothing we call registered is unknown to the bank.
    assert seen_by_bank <= set(rows), seen_by_bank - set(rows)
    assert {iid for iid, outcome in rows.items() if outcome == "registered"} <= seen_by_bank
    assert set(rows.values()) <= {"registered", "pending"}

    restarted = launch(tpp.config, public_dir)  # the same config; the socket is bound again
    try:
        client = restarted.client()
        assert len(client.sign("signing", b"after restart", "ES256")) == 64
        # A success is on record, so a plain register sends nothing (a pending one would not be resent either).
        assert client.register(BANK)["already_registered"]["outcome"] == "registered"
    finally:
        restarted.stop()
        restarted.notify.close()
    records_after, findings_after = _verify_all(daemon.audit_file)
    assert findings_after == [] and records_after > records
    for path in trail_files(daemon.audit_file):  # each chain goes on where it stopped: no record lost, none twice
        lines = path.read_text().splitlines()
        assert json.loads(lines[-1])["seq"] == len(lines), path
