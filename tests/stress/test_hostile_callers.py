"""Stress: a well-behaved caller's signatures while hostile local callers flood the socket (issue 16, items 4 and 6).

    make stress                         # or: pytest -m slow -s tests/stress/test_hostile_callers.py
    TPP_HOSTILE_SECONDS=30 ...          # longer phases (default 10 s each)

One daemon with default settings (those of tests/stress/test_hostile_banks.py: the model bank, ``nobody`` may
forward to it and ask it for tokens). The well-behaved caller (root, an admin) signs (PS256) one request after
another: alone; while a socket-group member that no rule names (uid 4242) opens 70 idle connections and pipelines
20,000 signing requests on another without reading an answer; while ``nobody``, who holds a rule, does the same
with 20,000 ``GET /v1/keys``; and while ``nobody`` asks for tokens with 2,000 distinct 1,024-character scopes
(the longest allowed), on 4 connections. The daemon's RSS (all its processes) is sampled every 0.1 s. Prints
p50/p99 of each phase, its ratio to the first, the RSS peak and what the hostile callers got; asserts that the
RSS stays within 100 MB and that the daemon lives (a failed signature fails the run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from modelbank import ModelBank
from tests.daemon.conftest import public_dir  # noqa: F401 -- fixture
from tests.daemon.test_hostile_banks import MB, Banks, start
from tests.daemon.test_policy import SIGN
from tests.openfinance.conftest import Tpp, bank, tpp  # noqa: F401 -- fixtures
from tests.stress.test_hostile_banks import PHASE, percentile, signing_latencies
from tests.transport.hostile import rss_kb

pytestmark = pytest.mark.slow
STRANGER = 4242  # in no passwd entry and no rule; reaches the socket through its group only
NOGROUP = 65534

# The hostile caller: stdlib only (it runs as a user that owns nothing of the checkout). Modes:
#   pipeline N METHOD TARGET BODY IDLE: IDLE idle connections, then N requests on one, no answer read
#   scopes N CONNS BANK: N token requests with distinct 1,024-character scopes over CONNS connections, read
_HOSTILE = r"""
import json, socket, sys, threading, time
path, mode = sys.argv[1:3]
def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s
def request(method, target, body):
    data = body.encode()
    return (f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data
def status(s):
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        if not chunk: return "closed"
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(rest) < length: rest += s.recv(65536)
    if not head.startswith(b"HTTP/1.1 200 "): counts.setdefault("first refusal", rest.decode()[:300])
    return head.split()[1].decode()
counts = {}
if mode == "pipeline":
    n, method, target, body, idle = int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7])
    s = connect(); s.settimeout(float(sys.argv[8]))  # first: a caller's later connections may be refused
    held = []
    for _ in range(idle):
        try: held.append(connect())
        except OSError as exc:
            name = "connect " + exc.__class__.__name__; counts[name] = counts.get(name, 0) + 1
    try: s.sendall(request(method, target, body) * n); counts["sent"] = n
    except OSError as exc: counts["send " + exc.__class__.__name__] = 1
    time.sleep(float(sys.argv[8]))
    for h in held:
        h.setblocking(False)
        try: answer = h.recv(100)
        except BlockingIOError: answer = b"open"
        name = "idle " + (answer.split(b"\r\n")[0].decode() or "closed")
        counts[name] = counts.get(name, 0) + 1
else:
    n, conns, bank = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    lock = threading.Lock()
    def run(k):
        s = connect()
        for i in range(k, n, conns):
            scope = (f"accounts-{i}-" + "x" * 1024)[:1024]
            s.sendall(request("POST", f"/v1/banks/{bank}/token", json.dumps({"scope": scope})))
            got = status(s)
            with lock: counts[got] = counts.get(got, 0) + 1
    threads = [threading.Thread(target=run, args=(k,)) for k in range(conns)]
    for t in threads: t.start()
    for t in threads: t.join()
print(json.dumps(counts))
"""


def daemon_rss_kb(pid: int) -> int:
    """The resident sets of the daemon and its serving processes, added up."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += rss_kb(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@pytest.fixture
def banks(tpp: Tpp, bank: ModelBank, public_dir: Path, tmp_path: Path) -> Iterator[Banks]:  # noqa: F811
    # nobody may also list keys and ask the model bank for tokens (any scope): what a buggy service holds.
    yield from start(tpp, bank, public_dir, tmp_path, nobody_may=("forward", "token", "keys"))


def hostile(banks: Banks, uid: int, *args: str) -> subprocess.Popen[str]:
    command = [os.path.realpath(sys.executable), "-c", _HOSTILE, str(banks.daemon.socket_path), *args]
    return subprocess.Popen(command, user=uid, group=NOGROUP, extra_groups=[], cwd="/", text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_signing_latency_and_memory_under_hostile_callers(banks: Banks, tpp: Tpp) -> None:  # noqa: F811
    client = banks.daemon.client()
    client.register(MB)  # the bank gives tokens to registered certificates only
    client_id = x509.Name.from_rfc4514_string(tpp.subject).get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    banks.model.tokens.register_client(str(client_id), client.jwks())
    signing_latencies(client, 1)  # warm-up: sessions, connections
    pid = banks.daemon.proc.pid
    rss_before = daemon_rss_kb(pid)
    peak = [rss_before]
    seconds = f"{PHASE + 4:g}"

    def sample(stop: threading.Event) -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], daemon_rss_kb(pid))
            time.sleep(0.1)

    def under(*callers: tuple[int, list[str]]) -> tuple[list[float], list[str]]:
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(stop,), daemon=True)
        sampler.start()
        procs = [hostile(banks, uid, *args) for uid, args in callers]
        time.sleep(2)  # the floods are in
        latencies = signing_latencies(client, PHASE)
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            outcomes.append(out.strip() or err.strip().splitlines()[-1])
        stop.set()
        sampler.join()
        return latencies, outcomes

    nobody = 65534
    phases = {"alone": (signing_latencies(client, PHASE), []),
              "a caller no rule names: 70 idle connections, 20,000 pipelined signing requests never read":
                  under((STRANGER, ["pipeline", "20000", "POST", "/v1/keys/signing/sign", SIGN, "70", seconds])),
              "a caller with a rule: 70 idle connections, 20,000 pipelined GET /v1/keys never read":
                  under((nobody, ["pipeline", "20000", "GET", "/v1/keys", "", "70", seconds])),
              "a caller with a rule: tokens for 2,000 distinct 1,024-character scopes on 4 connections":
                  under((nobody, ["scopes", "2000", "4", MB]))}
    base = percentile(phases["alone"][0], 0.99)
    print()
    for name, (latencies, outcomes) in phases.items():
        p99 = percentile(latencies, 0.99)
        print(f"hostile: {name}: {len(latencies)} PS256 signatures in {PHASE:g} s, p50 "
              f"{percentile(latencies, 0.5):.2f} ms, p99 {p99:.2f} ms (x{p99 / base:.1f})"
              + (f"; hostile caller got {'; '.join(outcomes)}" if outcomes else ""))
    print(f"hostile: daemon RSS (all processes) {rss_before / 1024:.1f} MB before, peak {peak[0] / 1024:.1f} MB")
    assert peak[0] < 100 * 1024, f"RSS peaked at {peak[0] / 1024:.0f} MB"
    assert banks.daemon.proc.poll() is None
    scopes = json.loads(phases[list(phases)[-1]][1][0])
    assert scopes.get("200", 0) > 0, scopes  # the bank did hand out tokens for them: the cache was exercised
