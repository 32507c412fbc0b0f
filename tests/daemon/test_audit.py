"""The audit trail: every signature recorded; removed and edited lines are found by line number."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.audit import AuditTrail, KeyUse, TrailBusyError, own_trail, record_hash, trail_files, verify
from agent.errors import ExitStatus
from tests.daemon.conftest import TPP_AGENT, Daemon


def _use(n: int) -> KeyUse:
    return KeyUse(0, 1, "pkcs11:object=k", "sign", "PS256", f"input {n}".encode(), "ok", f"id-{n}")


def test_chain_survives_reopen_and_flags_edits_rehashed_edits_and_removals(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    for n in range(5):
        trail.record(_use(n))
    trail.close()
    trail = AuditTrail(path)  # a restart continues the chain
    for n in range(5, 10):
        trail.record(_use(n))
    trail.close()
    assert verify(path) == (10, [])

    lines = path.read_text().splitlines()
    record = json.loads(lines[3])
    record["uid"] = 1234  # edited and re-hashed: only the chain from line 5 gives it away
    record["hash"] = record_hash(record)
    lines[3] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    del lines[7]
    path.write_text("\n".join(lines) + "\n")
    _, findings = verify(path)
    assert [(f.line, f.problem.split(":")[0]) for f in findings] == [(4, "edited"), (8, "removed")]


def test_own_trails_are_held_while_open_and_go_on_where_their_last_writer_stopped(tmp_path: Path) -> None:
    base = tmp_path / "audit.jsonl"
    first, second = own_trail(base), own_trail(base)  # as two serving processes starting side by side
    assert (first.path.name, second.path.name) == ("audit.1.jsonl", "audit.2.jsonl")
    with pytest.raises(TrailBusyError, match=r"audit\.1\.jsonl is another running process's own") as held:
        AuditTrail(first.path, exclusive=True)
    assert "audit.N.jsonl" in held.value.hint
    for n in range(3):
        first.record(_use(n))
        second.record(_use(n))
    first.close()
    again = own_trail(base)  # a restarted process takes the free trail and continues its chain
    assert again.path == first.path
    again.record(_use(3))
    again.close()
    second.close()
    (tmp_path / "audit.x.jsonl").write_text("not ours\n")
    (tmp_path / "audit.10.jsonl").write_text("")
    base.write_text("")
    assert trail_files(base) == [base, first.path, second.path, tmp_path / "audit.10.jsonl"]
    assert verify(first.path) == (4, []) and verify(second.path) == (3, [])
    assert [json.loads(line)["seq"] for line in first.path.read_text().splitlines()] == [1, 2, 3, 4]


def test_records_of_any_text_verify_and_read_back_as_written(tmp_path: Path) -> None:
    """Quotes, backslashes, control characters and non-ASCII in what a record carries keep the chain valid."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    odd = 'pkcs11:object=cl\u00e9 "1"\\\n\t\u2603'
    trail.record(KeyUse(7, 8, odd, "jws\x00", "ES256", b"\xff", 'error: "x"', "\u00e9"))
    trail.record(_use(1))
    trail.close()
    assert verify(path) == (2, [])
    first = json.loads(path.read_text().splitlines()[0])
    assert (first["key"], first["operation"], first["result"], first["interaction_id"], first["uid"]) == (
        odd, "jws\x00", 'error: "x"', "\u00e9", 7)
    assert path.read_bytes().isascii()


def test_thousand_signatures_then_delete_one_line_and_edit_another(daemon: Daemon) -> None:
    client = daemon.client()
    for n in range(1000):
        client.sign("signing", f"payload {n}".encode(), "PS256")
    lines = daemon.audit_file.read_text().splitlines()
    signs = [json.loads(line) for line in lines if '"operation":"sign"' in line]
    assert len(signs) == 1000 and all(s["result"] == "ok" and len(s["input_sha256"]) == 64 for s in signs)
    assert "payload" not in daemon.audit_file.read_text()
    ok = subprocess.run([TPP_AGENT, "--config", str(daemon.config_path), "audit", "verify", "--file",
                         str(daemon.audit_file)], capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and f"{len(lines)} record(s), chain intact, checkpoints verified" in ok.stdout

    lines[699] = lines[699].replace('"uid":0', '"uid":1000')  # edit line 700
    del lines[499]                                             # remove line 500
    daemon.audit_file.write_text("\n".join(lines) + "\n")
    bad = subprocess.run([TPP_AGENT, "--config", str(daemon.config_path), "audit", "verify", "--file",
                          str(daemon.audit_file)], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == ExitStatus.DATAERR
    assert f"{daemon.audit_file}:500: removed: record 500 missing" in bad.stdout
    assert f"{daemon.audit_file}:699: edited: record 700 does not match its hash" in bad.stdout
    assert len([line for line in bad.stdout.splitlines() if ": note: " not in line and "key SHA-256" not in line]) == 2
