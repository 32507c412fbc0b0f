"""``[daemon] audit_sync = "interval"``: records are written before ``record`` returns and synced in the background.

What a crash of the agent must not lose (the written records) is checked by killing a writer with SIGKILL; what
an OS crash may lose (the last interval) cannot be tested here, so the tests watch ``synced_seq`` catch up instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.audit import AuditError, AuditTrail, KeyUse, verify
from agent.config import parse
from agent.daemon.settings import DaemonSettings
from agent.errors import ConfigError
from tests.conftest import Token
from tests.daemon.conftest import daemon_config, launch

INTERVAL = 0.005  # seconds


def _use(n: int) -> KeyUse:
    return KeyUse(0, 1, "pkcs11:object=k", "sign", "ES256", f"input {n}".encode(), "ok", f"id-{n}")


def _eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(INTERVAL)


def test_each_record_is_in_the_file_when_record_returns_and_is_synced_soon_after(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, sync_interval=INTERVAL)
    for n in range(1, 21):
        trail.record(_use(n))
        last = json.loads(path.read_bytes().splitlines()[-1])
        assert (last["seq"], last["interaction_id"]) == (n, f"id-{n}")
    _eventually(lambda: trail.synced_seq == 20, "the background sync covers record 20")
    trail.close()
    assert verify(path) == (20, [])


def test_a_burst_from_eight_threads_keeps_one_chain_and_gets_synced(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, sync_interval=INTERVAL)

    def writer(t: int) -> None:
        for i in range(200):
            trail.record(_use(t * 1000 + i))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _eventually(lambda: trail.synced_seq == 1600, "the background sync covers all 1600 records")
    trail.close()
    assert verify(path) == (1600, [])
    assert [json.loads(line)["seq"] for line in path.read_bytes().splitlines()] == list(range(1, 1601))


def test_close_syncs_the_last_records_and_stops_the_flusher(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, sync_interval=1.0)  # the longest interval: close, not the timer, makes the sync
    for n in range(3):
        trail.record(_use(n))
    trail.close()
    assert trail.synced_seq == 3
    assert not any(thread.name == "audit-sync" for thread in threading.enumerate())
    assert verify(path) == (3, [])
    again = AuditTrail(path, sync_interval=1.0)  # a restart continues the chain
    again.record(_use(3))
    again.close()
    assert again.synced_seq == 4 and verify(path) == (4, [])


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from agent.audit import AuditTrail, KeyUse
trail = AuditTrail(Path(sys.argv[1]), sync_interval=1.0)
for n in range(50):
    trail.record(KeyUse(0, 1, "pkcs11:object=k", "sign", "ES256", b"x", "ok", f"id-{n}"))
sys.stdout.write("written\\n"); sys.stdout.flush()
time.sleep(60)
"""


def test_records_returned_survive_the_agent_being_killed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    writer.stdout.close()
    assert verify(path) == (50, [])


def test_a_refused_background_sync_fails_later_records_until_a_sync_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path, sync_interval=INTERVAL)
    trail.record(_use(0))
    _eventually(lambda: trail.synced_seq == 1, "record 1 synced")

    def refuse(fd: int) -> None:  # a disk failing is simulated: the real one cannot be made to refuse
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", refuse)
    refusals: list[str] = []

    def refused() -> bool:
        try:
            trail.record(_use(1))
        except AuditError as exc:
            refusals.append(str(exc))
            return True
        return False

    _eventually(refused, "a record refused after the background sync failed")
    with pytest.raises(AuditError, match="the disk refused to sync the audit trail"):
        trail.record(_use(2))  # and the next one too: the failure is not forgotten
    assert "the disk refused to sync the audit trail" in refusals[0]
    assert trail.synced_seq == 1

    monkeypatch.undo()
    _eventually(lambda: not refused(), "records accepted again once a sync succeeded")
    written = trail.last_seq
    _eventually(lambda: trail.synced_seq == written, "everything written is synced")
    trail.close()
    assert verify(path) == (written, [])  # refused records were written too: the key was used


def test_a_final_sync_the_disk_refuses_makes_close_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl", sync_interval=1.0)
    trail.record(_use(0))

    def refuse(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", refuse)
    with pytest.raises(AuditError, match=r"refused to sync .*records after 0 may not be on disk"):
        trail.close()


def _settings(tmp_path: Path, daemon: dict[str, object]) -> DaemonSettings:
    return DaemonSettings.parse(parse({"state": {"dir": str(tmp_path)}, "daemon": daemon}))


def test_settings_default_to_always_and_take_an_interval_in_milliseconds(tmp_path: Path) -> None:
    assert _settings(tmp_path, {}).audit_sync_interval is None
    assert _settings(tmp_path, {"audit_sync": "always"}).audit_sync_interval is None
    assert _settings(tmp_path, {"audit_sync": "interval"}).audit_sync_interval == 0.02
    assert _settings(tmp_path, {"audit_sync": "interval", "audit_sync_interval_ms": 250}).audit_sync_interval == 0.25


@pytest.mark.parametrize("daemon,message", [
    ({"audit_sync": "never"}, "audit_sync must be one of 'always', 'interval', got 'never'"),
    ({"audit_sync": 1}, "audit_sync must be a non-empty string"),
    ({"audit_sync": "interval", "audit_sync_interval_ms": 0}, "audit_sync_interval_ms must be from 1 to 1000, got 0"),
    ({"audit_sync": "interval", "audit_sync_interval_ms": 5000}, "must be from 1 to 1000, got 5000"),
    ({"audit_sync": "interval", "audit_sync_interval_ms": "20"}, "audit_sync_interval_ms must be a number"),
    ({"audit_sync_interval_ms": 50}, 'applies only with audit_sync = "interval"'),
])
def test_bad_audit_sync_settings_say_what_is_allowed(tmp_path: Path, daemon: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, daemon)


def test_daemon_and_direct_cli_with_interval_sync_leave_a_verified_trail(keyed_token: Token, public_dir: Path) -> None:
    config = daemon_config(keyed_token, public_dir).replace(
        "[daemon]\n", '[daemon]\naudit_sync = "interval"\naudit_sync_interval_ms = 50\n')
    daemon = launch(keyed_token.write_config(config), public_dir)
    try:
        client = daemon.client()
        for n in range(20):
            client.sign("ecsign", f"payload {n}".encode(), "ES256")
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.stderr()
        daemon.notify.close()
    assert "audit_sync_failed" not in daemon.stderr()
    keyed_token.cli("--direct", "sign-jws", "--key", "ecsign", "--alg", "ES256", "--payload", "-", input="{}",
                    check=True)

    records = [json.loads(line) for line in daemon.audit_file.read_text().splitlines()]
    uses = [r for r in records if r["operation"] != "checkpoint"]
    assert sum(r["operation"] == "sign" for r in uses) == 20 and uses[-1]["operation"] == "jws"
    # The agent's checkpoints when it started and stopped, the CLI's around its signature.
    assert [r["event"] for r in records if r["operation"] == "checkpoint"] == ["start", "stop", "start", "stop"]
    verified = keyed_token.cli("audit", "verify", "--file", str(daemon.audit_file))
    assert verified.returncode == 0, verified.stderr
    assert f"{len(records)} record(s), chain intact, checkpoints verified" in verified.stdout
