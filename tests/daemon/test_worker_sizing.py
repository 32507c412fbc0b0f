"""Workers sized by how long requests block (agent.daemon.sizing): the rule, the clock, the server's lane."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import parse
from agent.daemon import server as server_module
from agent.daemon.http import Request, Response
from agent.daemon.limits import Limits
from agent.daemon.settings import DaemonSettings
from agent.daemon.sizing import Sizing
from agent.errors import ConfigError
from tests.daemon.conftest import http_server, read_response

MS = 1_000_000  # ns


def test_workers_follow_littles_law_between_the_cpus_and_the_sessions() -> None:
    sizing = Sizing(2, 8)
    assert sizing.wanted(100, 0) == 2  # requests that only compute: one worker per CPU
    assert sizing.wanted(100, 100) == 4  # half of each request blocked: twice as many
    assert sizing.wanted(100, 2000) == 8  # a network HSM's round trip: as many as the sessions, no more
    assert sizing.wanted(100, 20) == 2  # a little blocking is no reason for another thread
    assert sizing.wanted(0, 10) == 8


def test_a_lane_grows_at_once_and_shrinks_only_when_two_windows_agree() -> None:
    sizing = Sizing(1, 8, window=4)
    assert [sizing.add(MS // 10, 2 * MS) for _ in range(4)] == [None, None, None, 8]
    assert [sizing.add(MS // 10, 0) for _ in range(4)] == [None, None, None, 8]  # one window wanting fewer
    assert [sizing.add(MS // 10, 0) for _ in range(4)] == [None, None, None, 1]


def test_blocked_time_that_only_some_requests_have_does_not_widen_the_lane() -> None:
    sizing = Sizing(1, 8, window=8)
    wanted = [sizing.add(MS // 10, 5 * MS if n % 4 == 0 else 0) for n in range(8)]  # a quarter wait on the lock
    assert wanted[-1] == 1


def _measured(request: Callable[[], None]) -> int | None:
    meter = Sizing(1, 8, every=1, window=1).meter()
    try:
        meter.begin()
        request()
        return meter.end()
    finally:
        meter.close()


def _compute() -> None:
    ends = time.thread_time() + 0.02
    while time.thread_time() < ends:
        pass


def test_the_meter_tells_a_sleeping_request_from_a_computing_one() -> None:
    assert _measured(lambda: time.sleep(0.02)) == 8  # a network HSM's round trip: no CPU
    assert _measured(_compute) == 1  # a local token's signature: CPU all the way


def _load(path: Path, clients: int, requests: int) -> None:
    def client() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            for _ in range(requests):
                sock.sendall(b"GET /sign HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class BlockingHandler:
    """Waits 5 ms per request, as on a network HSM, and records the most requests it had at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.005)
        with self._lock:
            self.now -= 1
        return Response.json(200, {})


@pytest.mark.parametrize("max_workers,most_at_once", [(4, 4), (None, 1)], ids=["auto", "fixed"])
def test_requests_that_block_get_workers_up_to_the_ceiling(tmp_path: Path, max_workers: int | None,
                                                           most_at_once: int) -> None:
    handler = BlockingHandler()
    limits = Limits(workers=1, max_workers=max_workers, drain_timeout=1.0, log_successes=False)
    with http_server(tmp_path / "s.sock", handler, limits) as path:
        _load(path, clients=6, requests=120)  # 720 requests: the first 256 (one window) on one worker
        assert handler.most == most_at_once
        # Once the load is over, the workers the lane grew for it end: back to the one it started with.
        deadline = time.monotonic() + 30
        while _workers() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _workers() == 1


def _workers() -> int:
    return sum(thread.name.startswith("worker_") for thread in threading.enumerate())


def _limits(tmp_path: Path, daemon: dict[str, object], pkcs11: dict[str, object] | None = None) -> Limits:
    raw = {"state": {"dir": str(tmp_path)}, "daemon": daemon, "pkcs11": pkcs11 or {}}
    return DaemonSettings.parse(parse(raw)).limits


def test_workers_default_to_the_cpus_growing_past_the_sessions(tmp_path: Path) -> None:
    # A worker holds a session only inside its token call: the lane grows to the sessions plus the CPUs' share,
    # so that workers parse, audit and answer while every session is busy on the token.
    cpus = len(os.sched_getaffinity(0))
    limits = _limits(tmp_path, {})  # processes = "auto": one per CPU, so one worker each to start with
    assert (limits.workers, limits.max_workers) == (1, 8 + 1)
    limits = _limits(tmp_path, {"processes": 1})
    assert (limits.workers, limits.max_workers) == (cpus, 8 + cpus)
    limits = _limits(tmp_path, {"workers": "auto", "processes": 1}, {"max_sessions": 32})
    assert (limits.workers, limits.max_workers) == (cpus, 32 + cpus)
    limits = _limits(tmp_path, {"processes": 2}, {"max_sessions": 4})
    base = max(1, cpus // 2)
    assert (limits.workers, limits.max_workers) == (base, 4 + base)
    limits = _limits(tmp_path, {"workers": 3})
    assert (limits.workers, limits.max_workers) == (3, None)


@pytest.mark.parametrize("value", ["many", 0, 300, 2.5, True])
def test_bad_workers_say_what_is_allowed(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match=r'workers must be "auto" or a whole number from 1 to 256, got'):
        _limits(tmp_path, {"workers": value})


def test_a_steady_load_keeps_its_workers_while_some_of_them_wait(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Two clients, a ceiling of four: two workers wait for requests all along. Retired for waiting, they would be
    # started again at the next window (a thread and a log line every few seconds on a steady network HSM).
    monkeypatch.setattr(server_module, "IDLE_WORKER_SECONDS", 0.05)
    monkeypatch.setattr(server_module, "Sizing", functools.partial(Sizing, every=1, window=8))
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            seen.update(thread.name for thread in threading.enumerate() if thread.name.startswith("worker_"))

    watcher = threading.Thread(target=watch)
    limits = Limits(workers=1, max_workers=4, drain_timeout=1.0, log_successes=False)
    with http_server(tmp_path / "s.sock", BlockingHandler(), limits) as path:
        watcher.start()
        try:
            _load(path, clients=2, requests=100)
        finally:
            done.set()
            watcher.join()
    assert seen == {"worker_1", "worker_2", "worker_3", "worker_4"}
