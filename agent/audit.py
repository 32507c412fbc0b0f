"""An append-only, hash-chained audit trail of every key use (JSON lines).

Each record carries ``seq`` (its line number when the trail was written), ``prev``
(the previous record's hash) and ``hash`` (SHA-256 of the record's canonical JSON
without ``hash``). So :func:`verify` can say which line was edited (its hash does
not match, or the next record no longer chains to it) and which records were
removed (a gap in ``seq``). Records hold the SHA-256 of the signed input, never
the input itself. Every record is fsync'ed before the signature is returned.

Removing records at the *end* of the trail is not visible in the trail itself;
the daemon reports the last ``seq`` in its journal status for that reason.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.errors import AgentError

GENESIS = "0" * 64
_FIELDS = ("seq", "time", "uid", "pid", "key", "operation", "algorithm", "input_sha256", "result",
           "interaction_id", "prev")


class AuditError(AgentError):
    hint = "check that the audit file's directory exists and is writable by the agent only"


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@dataclasses.dataclass(frozen=True)
class KeyUse:
    """One use of a key, as the caller knows it."""

    uid: int
    pid: int
    key: str
    operation: str
    algorithm: str
    signed_input: bytes
    result: str
    interaction_id: str


class AuditTrail:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open the audit trail {path}: {exc.strerror}") from None
        self._seq, self._prev, torn = _tail(path)
        if torn:
            # A crash cut the last line short: end it, so the next record starts on a line of its own.
            os.write(self._fd, b"\n")
            self._seq += 1

    @property
    def last_seq(self) -> int:
        return self._seq

    def record(self, use: KeyUse) -> None:
        """Append and fsync one record; raises :class:`AuditError` if it is not on disk."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
            "uid": use.uid, "pid": use.pid, "key": use.key, "operation": use.operation,
            "algorithm": use.algorithm, "input_sha256": hashlib.sha256(use.signed_input).hexdigest(),
            "result": use.result, "interaction_id": use.interaction_id,
        }
        with self._lock:
            entry["seq"] = self._seq + 1
            entry["prev"] = self._prev
            entry["hash"] = record_hash(entry)
            line = _canonical(entry) + b"\n"
            try:
                os.write(self._fd, line)
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(f"cannot write the audit trail {self.path}: {exc.strerror}") from None
            self._seq, self._prev = entry["seq"], entry["hash"]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _tail(path: Path) -> tuple[int, str, bool]:
    """(seq, hash, torn) of the trail's last record; a torn last line still counts as a line."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return 0, GENESIS, False
        handle.seek(max(0, size - 65536))
        chunk = handle.read()
    torn = not chunk.endswith(b"\n")
    lines = chunk.rstrip(b"\n").split(b"\n")
    for raw in reversed(lines):
        try:
            last = json.loads(raw)
            return int(last["seq"]), str(last["hash"]), torn
        except (ValueError, KeyError, TypeError):
            continue
    raise AuditError(f"the audit trail {path} ends with no readable record",
                     hint="run `tpp-agent audit verify`, then move the damaged file aside")


@dataclasses.dataclass(frozen=True)
class Finding:
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.line}: {self.problem}"


def verify(path: Path) -> tuple[int, list[Finding]]:
    """Check the chain; returns (records read, findings). No findings means intact."""
    findings: list[Finding] = []
    expected_seq, prev_hash, count = 1, GENESIS, 0
    for lineno, raw in _lines(path):
        count += 1
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or any(f not in record for f in (*_FIELDS, "hash")):
                raise ValueError("missing fields")
            seq = int(record["seq"])
        except (ValueError, TypeError):
            findings.append(Finding(lineno, "not an audit record (edited or damaged)"))
            expected_seq += 1
            prev_hash = ""
            continue
        self_ok = record_hash(record) == record["hash"]
        if not self_ok:
            findings.append(Finding(lineno, f"edited: record {seq} does not match its hash"))
        if seq > expected_seq:
            missing = f"record {expected_seq}" if seq == expected_seq + 1 else f"records {expected_seq}-{seq - 1}"
            findings.append(Finding(lineno, f"removed: {missing} missing before this line "
                                            f"(record {seq} follows record {expected_seq - 1})"))
        elif seq < expected_seq:
            findings.append(Finding(lineno, f"out of order: record {seq} after record {expected_seq - 1}"))
        elif prev_hash and record["prev"] != prev_hash and self_ok:
            findings.append(Finding(lineno - 1, f"edited: the record on line {lineno} no longer chains to it"))
        expected_seq, prev_hash = seq + 1, str(record["hash"])
    return count, findings


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                yield lineno, raw.rstrip(b"\n")
    except FileNotFoundError:
        raise AuditError(f"no audit trail at {path}", hint="pass --file PATH or check [daemon] audit_file") from None
