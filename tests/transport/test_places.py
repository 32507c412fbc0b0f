"""The banks' places (``max_in_flight``) shared by processes forked after the table was made, as serving
processes are: real processes, each taking places and reporting over a pipe; one killed with SIGKILL while
holding them."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.transport.errors import BankBusyError
from agent.transport.places import BUSY_PATIENCE, BankPlaces


@pytest.fixture
def places() -> Iterator[BankPlaces]:
    table = BankPlaces()
    yield table
    table.close()


def in_child(work: Callable[[], str]) -> tuple[int, int]:
    """``work`` in a forked process that then waits to be killed; its pid and a pipe with its one-line report."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child's report is the test's evidence
        try:
            os.close(read_end)
            os.write(write_end, (work() + "\n").encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def report(read_end: int) -> str:
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.readline().decode().strip()


def holding(places: BankPlaces, bank: str, limit: int, count: int) -> Callable[[], str]:
    """Take ``count`` places on threads that keep them until the process ends; say how many were taken."""
    def work() -> str:
        taken: list[str] = []
        done = threading.Semaphore(0)

        def take() -> None:
            try:
                with places.hold(bank, limit):
                    taken.append("held")
                    done.release()
                    time.sleep(60)
            except BankBusyError as error:
                taken.append(f"busy: {error.detail}")
                done.release()

        for _ in range(count):
            threading.Thread(target=take, daemon=True).start()
        for _ in range(count):
            done.acquire()
        return f"{taken.count('held')} held; " + "; ".join(t for t in taken if t != "held")
    return work


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_processes_forked_after_the_table_share_a_banks_places(places: BankPlaces) -> None:
    first, first_report = in_child(holding(places, "bank1", 3, 2))
    try:
        assert report(first_report) == "2 held;"
        second, second_report = in_child(holding(places, "bank1", 3, 3))
        try:
            # One place was left for the second process; its other two requests were refused.
            said = report(second_report)
            assert said.startswith("1 held; busy: 3 requests are already under way at this bank"), said
            assert places.held("bank1") == 3 and places.held("bank2") == 0
            started = time.monotonic()
            with pytest.raises(BankBusyError, match=r"max_in_flight"), places.hold("bank1", 3, "https://x/", "iid"):
                pass
            assert time.monotonic() - started <= BUSY_PATIENCE + 0.5
            with places.hold("bank2", 3):  # another bank's places are its own
                assert places.held("bank2") == 1
        finally:
            stop(second)
        assert places.held("bank1") == 2  # the second process's place came back when it ended
    finally:
        stop(first)
    assert places.held("bank1") == 0


def test_a_process_killed_while_holding_places_leaves_the_bank_open(places: BankPlaces) -> None:
    pid, pipe = in_child(holding(places, "bank1", 2, 2))
    assert report(pipe) == "2 held;"
    with pytest.raises(BankBusyError), places.hold("bank1", 2):
        pass
    os.kill(pid, signal.SIGKILL)  # no finally runs: the entries stay in the table, the lock goes with it
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    # A zombie (not reaped yet) holds nothing either.
    with places.hold("bank1", 2), places.hold("bank1", 2):  # the same thread: one place, used again
        assert places.held("bank1") == 1
    os.waitpid(pid, 0)
    assert places.held("bank1") == 0


def test_a_busy_bank_waits_a_moment_for_a_place_freed_in_another_process(places: BankPlaces) -> None:
    def brief() -> str:
        with places.hold("bank1", 1):
            time.sleep(0.2)
        return "done"

    pid, pipe = in_child(brief)
    try:
        deadline = time.monotonic() + 5
        while places.held("bank1") == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        started = time.monotonic()
        with places.hold("bank1", 1):  # quick requests hold the place: a wait, not a refusal
            waited = time.monotonic() - started
        assert report(pipe) == "done" and waited < BUSY_PATIENCE
    finally:
        stop(pid)


def test_rows_serve_the_banks_under_way_and_a_full_table_says_so() -> None:
    table = BankPlaces(rows=2)
    try:
        for bank in ("a", "b", "c", "d"):  # a row with no place held serves the next bank
            with table.hold(bank, 1):
                assert table.held(bank) == 1
        full = pytest.raises(BankBusyError, match="2 banks already have requests under way")
        with table.hold("a", 1), table.hold("b", 1), full, table.hold("c", 1):
            pass
    finally:
        table.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False
