"""A fleet: two agents of one application, each with its own state dir (discovery cache, audit trail), sharing
one PostgreSQL database. They race to register with the bank: the bank gets one POST."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from agent.errors import ExitStatus
from agent.state.postgres import PostgresStore
from modelbank import ModelBank
from modelbank.server import REGISTRATION_PATH, Registration
from tests.openfinance.conftest import BANK, Tpp
from tests.pg import PostgresServer


def _start(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TPP_AGENT_CONFIG": str(config)}
    env.pop("SOFTHSM2_CONF", None)
    return subprocess.Popen([str(Path(sys.executable).parent / "tpp-agent"), "--direct", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _hosts(tpp: Tpp, bank: ModelBank, tmp_path: Path, database: str) -> tuple[Tpp, Tpp, Path, Path]:
    """Host A is the test's TPP; host B has its own state dir and its own HSM holding the same key (a copy of
    the token, as HSMs of a fleet hold one key through the vendor's cloning), and one database for both."""
    hsm = tmp_path / "host-b-hsm"
    shutil.copytree(tpp.softhsm_state / "softhsm", hsm / "softhsm")
    conf = hsm / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(tpp.softhsm_state / "softhsm"), str(hsm / "softhsm")))
    host_b = dataclasses.replace(tpp, state_dir=tmp_path / "host-b", softhsm_state=hsm)
    host_b.state_dir.mkdir()
    return tpp, host_b, tpp.write_config(bank, database=database), host_b.write_config(bank, database=database)


def _posts(bank: ModelBank) -> int:
    return sum(1 for method, path, _ in bank.requests if method == "POST" and path.endswith(REGISTRATION_PATH))


def _waiting_on(db: psycopg.Connection[tuple[int]], table: str) -> int:
    """How many other sessions wait for a lock on ``table``."""
    row = db.execute("SELECT count(DISTINCT pid) FROM pg_locks WHERE relation = to_regclass(%s) AND NOT granted",
                     (table,)).fetchone()
    return int(row[0]) if row else 0


def _race(database: str, *racers: tuple[Path, tuple[str, ...]]) -> list[tuple[int, str, str]]:
    """Start each racer, hold the claims table until every one waits to claim, then let them all go at once.

    Without the hold the two processes may not overlap at all (one done before the other gets its token
    session): this makes every run the race the test is about, whatever the machine's load."""
    PostgresStore(database)  # the schema, so that there is a table to hold
    with psycopg.connect(database) as holder, psycopg.connect(database, autocommit=True) as watcher:
        holder.execute("LOCK TABLE registration_claims IN SHARE ROW EXCLUSIVE MODE")  # no INSERT gets past it
        procs = [_start(config, *args) for config, args in racers]
        try:
            deadline = time.monotonic() + 120
            while _waiting_on(watcher, "registration_claims") < len(procs):
                exited = [proc for proc in procs if proc.poll() is not None]
                assert not exited and time.monotonic() < deadline, [p.communicate() for p in exited]
                time.sleep(0.02)
        except BaseException:
            for proc in procs:
                proc.kill()
            raise
        holder.commit()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out, err))
    return results


def test_two_hosts_racing_send_one_registration(tpp: Tpp, bank: ModelBank, tmp_path: Path,
                                                postgres_server: PostgresServer) -> None:
    database = postgres_server.create_database()
    host_a, host_b, config_a, config_b = _hosts(tpp, bank, tmp_path, database)
    results = _race(database, (config_a, ("register", BANK, "--json")), (config_b, ("register", BANK, "--json")))
    assert _posts(bank) == 1 and len(bank.registrations) == 1, results
    [sent] = [json.loads(out) for code, out, _ in results if code == 0 and not json.loads(out)["already_registered"]]
    assert sent["interaction_id"] == bank.registrations[0].interaction_id
    for code, out, err in results:
        if code == 0 and json.loads(out)["already_registered"]:  # the answer's own id is this request's
            assert json.loads(out)["already_registered"]["interaction_id"] == sent["interaction_id"]
        elif code != 0:  # it came while the winner's POST was on its way: it sent nothing and says so
            assert sent["interaction_id"] in err and "may have reached the bank" in err, err
    # Each host kept its own trail and cache; neither has a registrations file of its own.
    for host in (host_a, host_b):
        assert (host.state_dir / "discovery" / f"{BANK}.json").exists()
        assert not (host.state_dir / "registrations.sqlite3").exists()


def test_the_second_host_waits_on_the_first_hosts_pending_post(tpp: Tpp, bank: ModelBank, tmp_path: Path,
                                                                 postgres_server: PostgresServer) -> None:
    _, host_b, config_a, config_b = _hosts(tpp, bank, tmp_path, postgres_server.create_database())
    holding, release = threading.Event(), threading.Event()

    def hold(_: Registration) -> None:
        holding.set()
        release.wait(timeout=120)

    bank.on_registration = hold
    first = _start(config_a, "register", BANK)
    try:
        assert holding.wait(timeout=120), first.communicate()
        second = _start(config_b, "register", BANK)
        _, err = second.communicate(timeout=120)
        assert second.returncode == ExitStatus.TEMPFAIL and "may have reached the bank, its outcome is unknown" in err
        assert "hint: ask the bank whether it registered" in err
    finally:
        release.set()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "registered with mb: HTTP 204" in out, err
    assert _posts(bank) == 1

    again = _start(config_b, "register", BANK)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "already registered" in out, err
    assert f"x-fapi-interaction-id {bank.registrations[0].interaction_id}" in out  # the registration's, not ours
    view = _start(config_b, "registrations", "--json")
    [status] = json.loads(view.communicate(timeout=120)[0])
    assert status["state"] == "registered" and status["attempt"]["interaction_id"] == \
        bank.registrations[0].interaction_id
    assert _posts(bank) == 1 and host_b.state_dir.exists()


@pytest.fixture(autouse=True)
def _no_leftover_answers(bank: ModelBank) -> None:
    bank.on_registration = None
