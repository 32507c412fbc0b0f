"""The audit trail is anchored: signed checkpoints on the token, checked by ``tpp-agent audit verify``; the
running agent notices its own trail cut or replaced and stops using keys (docs/audit.md has the threat model).

Every attack here was answered "chain intact" before checkpoints existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent.audit import record_hash
from agent.client import AgentRequestError as ClientError
from agent.errors import ExitStatus
from tests.conftest import Token
from tests.daemon.conftest import TPP_AGENT, Daemon, daemon_config, launch, start_daemon, with_daemon_lines


def _verify(token: Token, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TPP_AGENT, "--config", str(token.config_path), "audit", "verify", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _start(token: Token, public_dir: Path, daemon_lines: str = "", wait_ready: bool = True) -> Daemon:
    """The test daemon, with ``daemon_lines`` added to its [daemon] section."""
    config = with_daemon_lines(daemon_config(token, public_dir), daemon_lines)
    return launch(token.write_config(config), public_dir, wait_ready=wait_ready)


def _signed_and_stopped(token: Token, public_dir: Path, signatures: int = 5, daemon_lines: str = "") -> Daemon:
    daemon = _start(token, public_dir, daemon_lines)
    try:
        client = daemon.client()
        for n in range(signatures):
            client.sign("ecsign", f"payload {n}".encode(), "ES256")
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.stderr()
        daemon.notify.close()
    return daemon


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))


def test_a_stopped_agents_trail_verifies_with_its_start_and_stop_checkpoints(keyed_token: Token,
                                                                            public_dir: Path) -> None:
    daemon = _signed_and_stopped(keyed_token, public_dir)
    records = _records(daemon.audit_file)
    checkpoints = [r for r in records if r["operation"] == "checkpoint"]
    assert [c["event"] for c in checkpoints] == ["start", "stop"] and records[-1] == checkpoints[-1]
    assert checkpoints[0]["files"] == {"audit.jsonl": checkpoints[0]["files"]["audit.jsonl"]}
    assert all(c["algorithm"] == "ES256" and "object=audit" in c["key"] for c in checkpoints)
    verified = _verify(keyed_token)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{len(records)} record(s), chain intact, checkpoints verified" in verified.stdout
    assert "checkpoint_" not in daemon.stderr() and '"audit_checkpoint"' in daemon.stderr()


def test_an_emptied_trail_is_not_intact(keyed_token: Token, public_dir: Path) -> None:
    daemon = _signed_and_stopped(keyed_token, public_dir)
    daemon.audit_file.write_bytes(b"")
    refused = _verify(keyed_token)
    assert refused.returncode == ExitStatus.DATAERR
    assert f"{daemon.audit_file}:0: no signed checkpoint: nothing anchors this trail" in refused.stdout


def test_removing_the_last_records_of_a_stopped_agents_trail_shows(keyed_token: Token, public_dir: Path) -> None:
    daemon = _signed_and_stopped(keyed_token, public_dir)
    lines = daemon.audit_file.read_text().splitlines()
    daemon.audit_file.write_text("\n".join(lines[:-3]) + "\n")  # the closing checkpoint and two signatures
    refused = _verify(keyed_token)
    assert refused.returncode == ExitStatus.DATAERR
    assert "without a closing checkpoint, and no agent writing it runs: records after it may have been removed" \
        in refused.stdout


def test_a_chain_rewritten_consistently_to_another_uid_fails_the_checkpoint_signature(keyed_token: Token,
                                                                                       public_dir: Path) -> None:
    daemon = _signed_and_stopped(keyed_token, public_dir)
    records, prev = _records(daemon.audit_file), "0" * 64
    for record in records:  # what an attacker who can write the file but not use the token can do
        if record["operation"] == "sign":
            record["uid"] = 1000
        record["prev"] = prev
        record["hash"] = prev = record_hash(record)
    _write(daemon.audit_file, records)
    refused = _verify(keyed_token)
    assert refused.returncode == ExitStatus.DATAERR
    stop = len(records)
    assert f"{daemon.audit_file}:{stop}: checkpoint {stop}: its signature does not verify" in refused.stdout
    assert "removed" not in refused.stdout and "edited" not in refused.stdout  # the chain itself is consistent


def test_verify_offline_with_the_saved_public_key_and_refuse_another_key(keyed_token: Token, public_dir: Path,
                                                                         tmp_path: Path) -> None:
    daemon = _signed_and_stopped(keyed_token, public_dir)
    saved = tmp_path / "audit-key.pem"
    saved.write_text(keyed_token.cli("keys", "public", "pkcs11:object=audit", check=True).stdout)
    # No config and no token: the PEM alone.
    offline = subprocess.run([TPP_AGENT, "audit", "verify", "--file", str(daemon.audit_file), "--public-key",
                              str(saved)], capture_output=True, text=True, timeout=60, check=False,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert offline.returncode == 0, offline.stderr
    assert "chain intact, checkpoints verified" in offline.stdout

    other = tmp_path / "other.pem"
    other.write_text(keyed_token.cli("keys", "public", "ecsign", check=True).stdout)
    refused = subprocess.run([TPP_AGENT, "audit", "verify", "--file", str(daemon.audit_file), "--public-key",
                              str(other)], capture_output=True, text=True, timeout=60, check=False,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert refused.returncode == ExitStatus.DATAERR and "was signed by another key" in refused.stdout


def test_deleting_a_serving_process_trail_shows_in_the_others_checkpoints(keyed_token: Token,
                                                                          public_dir: Path) -> None:
    daemon = _signed_and_stopped(keyed_token, public_dir, 20, "processes = 2\n")
    own = [daemon.audit_file.with_name(f"audit.{n}.jsonl") for n in (1, 2)]
    assert _verify(keyed_token).returncode == 0
    own[1].unlink()
    refused = _verify(keyed_token)
    assert refused.returncode == ExitStatus.DATAERR
    assert f"{own[1]} is gone: checkpoint" in refused.stdout


def test_the_running_agent_refuses_to_sign_once_its_trail_is_truncated(keyed_token: Token,
                                                                       public_dir: Path) -> None:
    daemon = start_daemon(keyed_token, public_dir)
    try:
        client = daemon.client()
        client.sign("ecsign", b"before", "ES256")
        daemon.audit_file.write_bytes(b"")  # the trail cut to nothing under the agent
        with pytest.raises(ClientError) as refused:
            for _ in range(3):  # the first append after the cut may land before the sync that notices it
                client.sign("ecsign", b"after", "ES256")
        assert refused.value.status == 500 and refused.value.code == "audit_unavailable"
        assert "was cut or replaced under the agent" in str(refused.value)
        with pytest.raises(ClientError, match="cut or replaced"):
            client.sign("ecsign", b"still refused", "ES256")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # readiness follows at the next health check
            try:
                client.ready()
            except ClientError as exc:
                assert exc.status == 503 and "cut or replaced" in str(exc)
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the agent stayed ready with its trail cut")
        client.close()
    finally:
        daemon.stop()
        daemon.notify.close()
    log = daemon.stderr()
    assert '"audit_trail_cut"' in log and "shrank" in log


def test_the_running_agent_notices_its_trail_replaced_at_its_next_checkpoint(keyed_token: Token,
                                                                             public_dir: Path) -> None:
    daemon = _start(keyed_token, public_dir, "audit_checkpoint_seconds = 1\n")
    try:
        client = daemon.client()
        client.sign("ecsign", b"before", "ES256")
        moved = daemon.audit_file.with_name("moved.jsonl")
        daemon.audit_file.rename(moved)  # and an empty file in its place
        daemon.audit_file.write_bytes(b"")
        deadline = time.monotonic() + 30
        while '"audit_trail_cut"' not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)  # no request needed: the checkpoint thread checks the file
        assert "another file took its name" in daemon.stderr()
        with pytest.raises(ClientError, match="cut or replaced"):
            client.sign("ecsign", b"after", "ES256")
        client.close()
    finally:
        daemon.stop()
        daemon.notify.close()
    assert daemon.audit_file.read_bytes() == b""  # nothing written to the impostor, no closing checkpoint
    assert not any(b"after" in line for line in moved.read_bytes().splitlines())


def test_interval_checkpoints_anchor_a_running_agents_records(keyed_token: Token, public_dir: Path) -> None:
    daemon = _start(keyed_token, public_dir, "audit_checkpoint_seconds = 1\n")
    try:
        client = daemon.client()
        client.sign("ecsign", b"one", "ES256")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                r["operation"] == "checkpoint" and r["event"] == "interval" for r in _records(daemon.audit_file)):
            time.sleep(0.1)
        records = _records(daemon.audit_file)
        interval = [r for r in records if r["operation"] == "checkpoint" and r["event"] == "interval"]
        assert interval and interval[0]["seq"] > next(r["seq"] for r in records if r["operation"] == "sign")
        verified = _verify(keyed_token)
        assert verified.returncode == 0, verified.stdout
        assert "note: being written by the running agent" in verified.stdout
        client.close()
    finally:
        daemon.stop()
        daemon.notify.close()


def test_a_checkpoint_key_named_in_the_config_must_be_on_the_token(keyed_token: Token, public_dir: Path) -> None:
    daemon = _start(keyed_token, public_dir, 'audit_checkpoint_key = "no-such-key"\n', wait_ready=False)
    assert daemon.proc.wait(60) == 78
    daemon.notify.close()
    assert "audit_checkpoint_key" in daemon.stderr() and "no-such-key" in daemon.stderr()


def test_a_trail_without_checkpoint_key_is_reported_not_anchored(token: Token, tmp_path: Path) -> None:
    token.write_config(f'[daemon]\naudit_file = "{tmp_path / "audit.jsonl"}"\n')
    (tmp_path / "audit.jsonl").write_bytes(b"")
    refused = _verify(token)
    assert refused.returncode == ExitStatus.NOINPUT
    assert "NOT anchored" in refused.stderr and "no checkpoint key 'audit' on the token" in refused.stderr
    assert hashlib.sha256(b"").hexdigest() not in refused.stdout
