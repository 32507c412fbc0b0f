"""Hostile banks through the daemon's socket: smuggled header fields, a 300 MB answer, a bank that drips its answers.

Two banks are configured: the model bank (``mb``, well behaved) and a hostile one (``evil``, a
:class:`~tests.transport.hostile.HostileBank` with a certificate from the model bank's CA).
"""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.audit import trail_files
from agent.client import AgentRequestError
from modelbank import ModelBank
from tests.daemon.conftest import Daemon, launch, nobody_rule, read_response, with_daemon_lines
from tests.openfinance.conftest import Tpp, bank, issue_identity, tpp  # noqa: F401 -- fixtures
from tests.transport.hostile import HostileBank, Peer, Seen, by_path, drip, echo, held, huge, rss_kb

MB = "mb"
EVIL = "evil"


@dataclass
class Banks:
    daemon: Daemon
    model: ModelBank
    evil: HostileBank
    key_uri: str  # the transport key's
    audit: Path


def start(tpp: Tpp, bank: ModelBank, public_dir: Path, tmp_path: Path, daemon: str = "",  # noqa: F811
          evil: str = "", nobody_may: tuple[str, ...] = ("forward",)) -> Iterator[Banks]:
    credentials = bank.ca.server_credentials(tmp_path / "evil")
    hostile = HostileBank(credentials.cert_file, credentials.key_file, bank.ca_bundle).start()
    signing_key, _, _ = issue_identity(tpp.runtime, bank)  # for client assertions
    config = tpp.write_config(bank)
    rules = nobody_rule(public_dir, tpp.state_dir / "audit.jsonl", "nobody-forwards", list(nobody_may), banks=[MB])
    config.write_text(config.read_text() + textwrap.dedent(f"""
        [keys.transport]
        uri = "{tpp.key_uri}"
        [keys.signing]
        uri = "{signing_key}"
        algorithms = ["PS256"]
        raw_sign = true

        [banks.{EVIL}]
        discovery_url = "{hostile.url('/.well-known/openid-configuration')}"
        issuer = "https://localhost:{hostile.port}"
        ca_bundle = "{bank.ca_bundle}"
        client_key = "{tpp.key_uri}"
        """) + evil + "\n" + with_daemon_lines(rules, daemon))
    running = launch(config, public_dir)
    try:
        yield Banks(running, bank, hostile, tpp.key_uri, tpp.state_dir / "audit.jsonl")
    finally:
        running.stop()
        running.notify.close()
        hostile.stop()


@pytest.fixture
def banks(tpp: Tpp, bank: ModelBank, public_dir: Path, tmp_path: Path) -> Iterator[Banks]:  # noqa: F811
    yield from start(tpp, bank, public_dir, tmp_path)


def forward_error(banks: Banks, headers: dict[str, str]) -> AgentRequestError:
    with pytest.raises(AgentRequestError) as caught:
        banks.daemon.client().forward(EVIL, "GET", "/echo", headers=headers)
    return caught.value


def test_forward_refuses_smuggled_header_fields_and_keeps_our_user_agent(banks: Banks) -> None:
    for name in ("Host ", "Transfer-Encoding ", "Content-Length\t", "x-fapi-interaction-id "):
        refused = forward_error(banks, {name: "1"})
        assert refused.status == 400 and "not an HTTP token" in str(refused), name
    refused = forward_error(banks, {"X-Trace": "a\x00b"})
    assert refused.status == 400 and "'\\x00'" in str(refused)
    assert banks.evil.requests == []  # none of them reached the bank
    status, _, body = banks.daemon.client().forward(EVIL, "GET", "/echo", headers={"Accept": "application/json",
                                                                                  "User-Agent": "svc/1"})
    seen = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
    assert status == 200 and seen["accept"] == "application/json" and seen["user-agent"] == "tpp-agent svc/1"


def test_a_300_mb_answer_is_a_502_and_the_daemon_stays_small(banks: Banks) -> None:
    banks.evil.answer = huge(300 << 20)
    pid = banks.daemon.proc.pid
    before = rss_kb(pid)
    refused = forward_error(banks, {})
    grown_mb = (rss_kb(pid) - before) / 1024
    assert refused.status == 502 and refused.code == "bank_answer_too_large"
    assert "bank 'evil'" in str(refused) and "max_response_bytes = 4194304" in str(refused)
    assert grown_mb < 32, f"daemon RSS grew by {grown_mb:.0f} MB"  # before: by more than 600 MB
    banks.evil.answer = echo
    assert banks.daemon.client().forward(EVIL, "GET", "/echo")[0] == 200


def timed_forward(banks: Banks, name: str) -> tuple[int, str, float]:
    """A forward on a connection of this thread's: (status, error code or "", seconds)."""
    started = time.monotonic()
    try:
        return banks.daemon.client().forward(name, "GET", "/drip")[0], "", time.monotonic() - started
    except AgentRequestError as error:
        return error.status, error.code, time.monotonic() - started


@pytest.fixture
def slow_banks(tpp: Tpp, bank: ModelBank, public_dir: Path, tmp_path: Path) -> Iterator[Banks]:  # noqa: F811
    yield from start(tpp, bank, public_dir, tmp_path, daemon="workers = 1\nbank_workers = 4\n",
                     evil="request_timeout = 3\nmax_in_flight = 2\nread_timeout = 5\n")


def test_a_dripping_bank_holds_at_most_its_share_of_bank_workers(slow_banks: Banks) -> None:
    banks = slow_banks
    banks.evil.answer = drip(seconds=30, every=0.1)  # a byte every 0.1 s: read_timeout never fires
    discovery_path = banks.model.discovery_url[len(banks.model.issuer):]

    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(timed_forward, banks, EVIL) for _ in range(4)]
        deadline = time.monotonic() + 10
        while len(banks.evil.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Two drips hold two bank workers; the well-behaved bank is served meanwhile, at once.
        started = time.monotonic()
        assert banks.daemon.client().forward(MB, "GET", discovery_path)[0] == 200
        other_bank = time.monotonic() - started
        with banks.daemon.connect() as sock:
            request = json.dumps({"method": "GET", "path": "/x"}).encode()
            sock.sendall(b"POST /v1/banks/evil/forward HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%b" % (len(request), request))
            status, headers, body = read_response(sock)
        results = sorted(f.result(timeout=30) for f in slow)
    assert other_bank < 2, f"the model bank took {other_bank:.1f} s"  # before: as long as the drips
    assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["code"] == "bank_busy"
    assert "max_in_flight" in json.loads(body)["message"]
    busy = [r for r in results if r[1] == "bank_busy"]
    timed_out = [r for r in results if r[1] == "bank_timeout"]
    assert len(busy) == 2 and all(took < 2 for _, _, took in busy), results
    assert len(timed_out) == 2 and all(status == 504 and took < 8 for status, _, took in timed_out), results
    assert len(banks.evil.requests) == 2  # the refused ones never reached the bank


def test_client_assertion_fetching_a_slow_discovery_holds_no_signing_worker(slow_banks: Banks) -> None:
    banks = slow_banks
    banks.evil.answer = drip(seconds=30, every=0.1)
    outcome: list[object] = []

    def assertion() -> None:
        try:
            outcome.append(banks.daemon.client().client_assertion(EVIL))
        except AgentRequestError as error:
            outcome.append(error)

    asking = threading.Thread(target=assertion)
    asking.start()
    deadline = time.monotonic() + 10
    while not banks.evil.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert banks.evil.requests[0].path == "/.well-known/openid-configuration"
    started = time.monotonic()
    assert len(banks.daemon.client().sign("signing", b"meanwhile", "PS256")) == 256  # the one signing worker is free
    took = time.monotonic() - started
    asking.join(30)
    assert took < 2, f"sign took {took:.1f} s while the discovery dripped"
    error = outcome[0]
    assert isinstance(error, AgentRequestError) and error.status == 504 and "request_timeout = 3 s" in str(error)


def test_callers_waiting_for_a_slow_token_request_count_against_the_bank(slow_banks: Banks) -> None:
    banks = slow_banks
    issuer = f"https://localhost:{banks.evil.port}"
    document = json.dumps({"issuer": issuer, "registration_endpoint": f"{issuer}/tpp-registration",
                           "token_endpoint": f"{issuer}/token"}).encode()

    def discovery(peer: Peer, seen: Seen) -> bool:
        peer.read_body(seen)
        peer.send(200, document)
        return True

    release = threading.Event()
    banks.evil.answer = by_path({"/.well-known/openid-configuration": discovery, "/token": held(release)})

    def token() -> tuple[int, str, float]:
        started = time.monotonic()
        try:
            banks.daemon.client().token(EVIL, "accounts")
            return 200, "", time.monotonic() - started
        except AgentRequestError as error:
            return error.status, error.code, time.monotonic() - started

    try:
        with ThreadPoolExecutor(5) as pool:
            asking = [pool.submit(token) for _ in range(5)]
            deadline = time.monotonic() + 10
            while not any(s.path == "/token" for s in banks.evil.requests) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(1.5)  # the others' patience (0.5 s) is over: one waits in the bank's second place, three left
            discovery_path = banks.model.discovery_url[len(banks.model.issuer):]
            started = time.monotonic()
            assert banks.daemon.client().forward(MB, "GET", discovery_path)[0] == 200
            other_bank = time.monotonic() - started
            release.set()
            results = [f.result(timeout=30) for f in asking]
    finally:
        release.set()
    assert other_bank < 2, f"the model bank took {other_bank:.1f} s"
    busy = [r for r in results if r[1] == "bank_busy"]
    assert len(busy) == 3 and all(took < 2 for _, _, took in busy), results  # before: they queued on the lock
    assert sum(s.path == "/token" for s in banks.evil.requests) == 2  # the first, then the one that waited


@pytest.fixture
def slow_banks_two_processes(tpp: Tpp, bank: ModelBank, public_dir: Path, tmp_path: Path) -> Iterator[Banks]:  # noqa: F811
    yield from start(tpp, bank, public_dir, tmp_path, daemon="processes = 2\nworkers = 1\nbank_workers = 4\n",
                     evil="request_timeout = 3\nmax_in_flight = 2\nread_timeout = 5\n")


def forwards_at_once(banks: Banks, name: str, count: int) -> list[tuple[int, str, float]]:
    """``count`` forwards, each on a connection of its own (the supervisor hands them round robin)."""
    with ThreadPoolExecutor(count) as pool:
        return sorted(pool.map(lambda _: timed_forward(banks, name), range(count)))


def test_max_in_flight_holds_for_all_serving_processes_and_for_a_bank_a_reload_added(
        slow_banks_two_processes: Banks) -> None:
    banks = slow_banks_two_processes
    banks.evil.answer = drip(seconds=30, every=0.1)  # request_timeout (3 s) cuts each
    results = forwards_at_once(banks, EVIL, 6)  # three to each serving process
    # Before: each process counted its own two places, and four drips held four bank workers.
    assert len(banks.evil.requests) == 2, results
    busy = [r for r in results if r[1] == "bank_busy"]
    assert len(busy) == 4 and all(status == 503 and took < 2 for status, _, took in busy), results
    assert [r[1] for r in results if r not in busy] == ["bank_timeout"] * 2, results
    trails = [path.read_text() for path in trail_files(banks.audit) if path != banks.audit]
    assert len(trails) == 2 and all("BankBusyError" in trail or "/drip" in trail for trail in trails)

    # A bank that a reload adds gets places counted the same way.
    config = banks.daemon.config_path
    config.write_text(config.read_text() + textwrap.dedent(f"""
        [banks.late]
        discovery_url = "{banks.evil.url('/.well-known/openid-configuration')}"
        issuer = "https://localhost:{banks.evil.port}"
        ca_bundle = "{banks.model.ca_bundle}"
        client_key = "{banks.key_uri}"
        request_timeout = 3
        max_in_flight = 1
        """))
    banks.daemon.proc.send_signal(signal.SIGHUP)
    assert "reloaded" in banks.daemon.wait_for("READY=1")
    banks.evil.requests.clear()
    results = forwards_at_once(banks, "late", 4)
    assert len(banks.evil.requests) == 1, results
    assert [r[1] for r in results].count("bank_busy") == 3, results
