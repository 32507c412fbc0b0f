"""Group commit in the audit trail: concurrent records share a disk sync, and none returns before its own is durable.

The real ``os.fdatasync`` runs; the test wraps it to learn how far the file was durable when each sync returned.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.audit import AuditError, AuditTrail, KeyUse, verify
from agent.daemon.http import Request, Response
from agent.daemon.limits import Limits
from tests.daemon.conftest import http_server, read_response


def _together(target: Callable[[int], None], count: int) -> None:
    """``target(0)`` … ``target(count - 1)`` on threads of their own, all at once; returns when all are done."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _use(n: int) -> KeyUse:
    return KeyUse(0, 1, "pkcs11:object=k", "sign", "PS256", f"input {n}".encode(), "ok", f"id-{n}")


def test_each_record_returns_only_once_synced_and_concurrent_records_share_syncs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    durable = [0]  # file size covered by the last sync that returned
    syncs = [0]
    real = os.fdatasync

    def observed_sync(fd: int) -> None:
        size = os.fstat(fd).st_size  # what this sync is about to cover
        time.sleep(0.005)  # a slow disk, so that records pile up behind a running sync
        real(fd)
        syncs[0] += 1
        durable[0] = max(durable[0], size)

    monkeypatch.setattr(os, "fdatasync", observed_sync)
    late: list[str] = []

    def writer(n: int) -> None:
        for i in range(20):
            use = _use(n * 100 + i)
            trail.record(use)
            # On return, this record's line must lie within what a finished sync covered.
            content = path.read_bytes()
            end = content.index(use.interaction_id.encode()) + content[content.index(
                use.interaction_id.encode()):].index(b"\n") + 1
            if end > durable[0]:
                late.append(use.interaction_id)

    _together(writer, 8)
    trail.close()
    assert late == []
    assert verify(path) == (160, [])
    assert syncs[0] < 160  # the writers shared syncs


def test_a_failed_sync_fails_every_record_it_covered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl")
    trail.record(_use(1))

    def refuse(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", refuse)
    with pytest.raises(AuditError, match="refused to sync"):
        trail.record(_use(2))
    monkeypatch.undo()
    trail.record(_use(3))  # a disk that recovers serves the next records
    trail.close()


def test_one_sync_covers_more_records_than_there_are_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's HTTP server with one worker and eight clients signing at once: answers wait for their
    records' sync on the trail's committer thread, not the worker, so the next requests are appended meanwhile
    and share the next sync; and no answer leaves before its record is durable."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    syncs, durable = [0], [0]
    real = os.fdatasync

    def slow_sync(fd: int) -> None:
        size = os.fstat(fd).st_size  # what this sync is about to cover
        time.sleep(0.01)  # a disk whose flush takes 10 ms
        real(fd)
        syncs[0] += 1
        durable[0] = max(durable[0], size)

    monkeypatch.setattr(os, "fdatasync", slow_sync)

    def sign(request: Request) -> Response:
        trail.record(_use(int(request.body)))
        return Response.json(200, {"recorded": True})

    clients, each = 8, 10
    early: list[int] = []
    with http_server(tmp_path / "s.sock", sign, Limits(workers=1, drain_timeout=1.0)) as socket_path:
        def client(n: int) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(str(socket_path))
                for i in range(each):
                    body = str(n * 100 + i).encode()
                    sock.sendall(b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    assert read_response(sock)[0] == 200
                    content = path.read_bytes()
                    start = content.index(f'"id-{n * 100 + i}"'.encode())
                    if content.index(b"\n", start) + 1 > durable[0]:
                        early.append(n * 100 + i)

        _together(client, clients)
    trail.close()
    assert early == []
    assert verify(path) == (clients * each, [])
    # One worker waiting out each sync alone would take 80 syncs; the eight clients' records share them.
    assert syncs[0] <= clients * each / 3, syncs[0]


def test_a_sync_that_breaks_unexpectedly_fails_its_answers_and_the_next_ones_still_come(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an OSError from the disk but anything else raised in the committer's sync: the answers it covered get
    an error instead of waiting for ever on a committer thread that died, and the requests after it are served."""
    trail = AuditTrail(tmp_path / "audit.jsonl")
    real, broken = os.fdatasync, [True]

    def breaks_once(fd: int) -> None:
        if broken[0]:
            broken[0] = False
            raise RuntimeError("a bug in the sync path")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", breaks_once)

    def sign(request: Request) -> Response:
        trail.record(_use(int(request.body)))
        return Response.json(200, {"recorded": True})

    statuses = []
    with http_server(tmp_path / "s.sock", sign, Limits(workers=1, drain_timeout=1.0)) as socket_path, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)  # without an answer, read_response times out and the test fails
        sock.connect(str(socket_path))
        for n in range(3):
            sock.sendall(b"POST /sign HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % n)
            statuses.append(read_response(sock)[0])
    trail.close()
    assert statuses[0] >= 500 and statuses[1:] == [200, 200], statuses
