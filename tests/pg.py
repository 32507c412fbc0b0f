"""A real PostgreSQL server for the tests: Debian's binaries, a cluster made with initdb in a temp dir,
one server per test session on 127.0.0.1, a new database per test.

PostgreSQL refuses to run as root (CI runs as root): then the cluster belongs to the ``postgres`` system user
that Debian's package creates, and the server runs as it (``setpriv``, which execs: the test stops the
server itself, not a wrapper). Durability is off (``fsync=off``): these clusters die with the session.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

USER = "tpp"
_START_TIMEOUT = 60.0
_databases = itertools.count()


@dataclasses.dataclass
class PostgresServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t{next(_databases)}_{os.getpid()}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_owner(owner: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    if owner is None:
        return argv
    return ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups", "--", *argv]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        message = "PostgreSQL server binaries not installed (scripts/bootstrap installs Debian's postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI ran bootstrap: a missing server there is a broken set-up, not a skip
        pytest.skip(message)
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: that is root's 0700 directory, which the postgres user cannot enter.
    top = Path(tempfile.mkdtemp(prefix="tpp-agent-pg-"))
    data, sockets, log = top / "data", top / "sockets", top / "server.log"
    sockets.mkdir()
    if owner is not None:
        for path in (top, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    subprocess.run(_as_owner(owner, [str(bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
                                     "-E", "UTF8", "--locale=C", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            _as_owner(owner, [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                              "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
                              "-c", "synchronous_commit=off", "-c", "max_connections=50"]),
            stdout=out, stderr=subprocess.STDOUT)
    server = PostgresServer(process, port, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.send_signal(2)  # SIGINT: PostgreSQL's fast shutdown
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(top, ignore_errors=True)


def _wait_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.process.returncode}: {server.log.read_text()[-2000:]}")
        try:
            psycopg.connect(server.url("postgres"), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
