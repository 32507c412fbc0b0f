"""The benchmarks' load machinery against a real server on a Unix socket: windows, turns, and failures."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.daemon.http import HttpError, Request, Response
from agent.daemon.limits import Limits
from bench import windows
from bench.common import Contender, InProcess, Load, LoadProcess, compare_cells, http_request
from tests.daemon.conftest import http_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    """Answers 200 on /ok, 500 anywhere else."""
    def answer(request: Request) -> Response:
        if request.path != "/ok":
            raise HttpError(500, "broken", "this endpoint always fails")
        return Response.json(200, {"ok": True})

    with http_server(tmp_path / "s.sock", answer, Limits(workers=2, drain_timeout=1.0, log_successes=False)) as path:
        yield path


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[Path]:
    """Answers 200, and closes a keep-alive connection idle for 0.2 s."""
    with http_server(tmp_path / "i.sock", lambda _: Response.json(200, {"ok": True}),
                     Limits(workers=1, drain_timeout=1.0, idle_timeout=0.2, log_successes=False)) as path:
        yield path


def _spec(path: Path, target: str, clients: int) -> dict[str, object]:
    return {"mode": "unix", "socket": str(path), "threads": clients,
            "request_b64": base64.b64encode(http_request("GET", target)).decode()}


def test_loads_take_turns_and_count_only_inside_their_windows(server: Path) -> None:
    calls: list[int] = []
    measured = compare_cells({"": {"socket": LoadProcess(_spec(server, "/ok", 2)),
                                   "in-process": InProcess(2, lambda: lambda: calls.append(1))}}, 0.5, 2)[""]
    for name in ("socket", "in-process"):
        load = measured[name]
        assert len(load.runs) == 2 and all(run.count > 0 for run in load.runs)
        assert load.total.seconds == pytest.approx(1.0)  # 2 runs of 2 windows of 0.25 s: no ramp-up or drain
        assert load.total.count == sum(run.count for run in load.runs)
        assert load.total.p50_ms <= load.total.p99_ms
    assert len(calls) > measured["in-process"].total.count  # warm-ups and the ends of windows are left out
    assert len(measured["socket"].ratios(measured["in-process"])) == 2


def test_a_failing_answer_stops_the_benchmark_with_what_the_server_said(server: Path) -> None:
    with pytest.raises(RuntimeError, match="500 Internal Server Error"):
        compare_cells({"": {"socket": LoadProcess(_spec(server, "/broken", 1))}}, 0.25, 1)


def test_an_in_process_load_that_fails_says_why() -> None:
    def setup() -> Callable[[], object]:
        raise OSError("no session left")

    with pytest.raises(RuntimeError, match="no session left"):
        compare_cells({"": {"in-process": InProcess(1, setup)}}, 0.25, 1)


class _Logged:
    """A contender that notes when it is driven (which cell, which contender) and closed."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def window(self, warmup: float, seconds: float) -> Load:
        self.log.append(self.name)
        return Load(1, seconds, 0.0)

    def finish(self) -> tuple[float, float]:
        return 0.0, 0.0

    def close(self) -> None:
        self.log.append(f"close {self.name}")


def test_the_runs_go_round_every_cell_before_the_next_run() -> None:
    log: list[str] = []
    cells: dict[str, dict[str, Contender]] = {cell: {side: _Logged(log, f"{cell}{side}") for side in ("x", "y")}
                                              for cell in ("a", "b")}
    measured = compare_cells(cells, 0.5, 2)  # 2 turns per run, the order rotating
    assert log[:8] == ["ax", "ay", "ay", "ax", "bx", "by", "by", "bx"] and log[8:16] == log[:8]
    assert sorted(log[16:]) == ["close ax", "close ay", "close bx", "close by"]
    assert [run.count for run in measured["b"]["y"].runs] == [2, 2]


def test_connections_the_server_closed_between_windows_are_opened_again(impatient: Path) -> None:
    # While the other cell runs (1.2 s), the server closes the idle connections of the first.
    cells: dict[str, dict[str, Contender]] = {"socket": {"load": LoadProcess(_spec(impatient, "/ok", 2))},
                                              "slow": {"load": InProcess(1, lambda: lambda: time.sleep(0.3))}}
    measured = compare_cells(cells, 1.0, 2)
    assert all(run.count > 0 for run in measured["socket"]["load"].runs)


@pytest.mark.parametrize("rate", [0, 50], ids=["closed-loop", "open-loop"])
def test_a_request_the_agent_never_answers_fails_the_window_instead_of_hanging(tmp_path: Path, rate: int) -> None:
    """A server that takes the connections and the requests and never answers (a lost request): the load
    generator says so once its deadline passes, and the benchmark stops (a run once hung for two hours)."""
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(8)
        load = LoadProcess({"mode": "unix", "socket": str(path), "threads": 2, "rate": rate, "answer_seconds": 1,
                            "request_b64": base64.b64encode(http_request("GET", "/v1/ready")).decode()})
        try:
            with pytest.raises(RuntimeError, match=r"no answer from the agent in 1 s to \d request\(s\) under way"):
                load.window(0.05, 0.2)
        finally:
            load.close()


def test_an_in_process_load_stuck_in_a_call_fails_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token call that never returns (a hung module): the window fails past its deadline, and closing the
    load does not wait for the stuck thread."""
    monkeypatch.setattr(windows, "STUCK_SECONDS", 0.5)
    hung = threading.Event()
    load = InProcess(2, lambda: hung.wait)
    try:
        with pytest.raises(RuntimeError, match=r"a load thread is still in a call after \d+ s: the token stopped"):
            load.window(0.05, 0.2)
    finally:
        load.close()
        hung.set()
