"""``[daemon] processes = N``: one supervisor, N serving processes, one socket, one systemd unit.

Real daemons on a real token: the load is spread over the serving processes, each keeps
an audit trail of its own (one chain per file), a wrong PIN is tried once, systemd hears one READY=1,
RELOADING/STOPPING and WATCHDOG for the whole service, and no serving process outlives
its supervisor or a dead sibling.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.audit import trail_files
from agent.daemon.app import verify_in_software
from agent.daemon.processes import cpu_list, cpu_shares
from pkcs11_backends.keys import SignatureScheme
from tests.conftest import Token
from tests.daemon.conftest import (  # noqa: F401
    ONE_PROCESS,
    TPP_AGENT,
    Daemon,
    daemon_config,
    keyed_token,
    launch,
    public_dir,
    with_daemon_lines,
)
from tests.faults.conftest import Shim, shim, shim_library  # noqa: F401 -- fixtures
from tests.faults.test_daemon_faults import shim_daemon_config


def with_processes(config: str, processes: object) -> str:
    """The test config with ``processes`` in its [daemon] table."""
    return with_daemon_lines(config, f"processes = {json.dumps(processes)}\n")


def children(pid: int) -> list[int]:
    """The serving processes: the daemon's own children."""
    with contextlib.suppress(FileNotFoundError):
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def alive(pid: int) -> bool:
    """Running (a zombie has ended: it only waits for its parent to collect the status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sockets(pid: int) -> int:
    """How many sockets the process holds (each client connection it serves is one)."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(fd).startswith("socket:")
    return count


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{check.__name__} did not hold within {timeout}s")
        time.sleep(0.05)


def start(token: Token, public_dir: Path, processes: int | str | None = 2,  # noqa: F811
          env: dict[str, str] | None = None) -> Daemon:
    """A daemon with ``processes`` serving processes (None: the default); its notify socket reports each sender's
    pid."""
    text = daemon_config(token, public_dir)
    config = token.write_config(text.replace(ONE_PROCESS, "", 1) if processes is None
                                else with_processes(text, processes))
    daemon = launch(config, public_dir, env, wait_ready=False)
    # Set before the daemon's interpreter has even started: every datagram carries its sender.
    daemon.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    until(daemon, "READY=1")
    return daemon


def receive(daemon: Daemon, timeout: float) -> str | None:
    """The next notify datagram; each must come from the process systemd started (``NotifyAccess=main``)."""
    daemon.notify.settimeout(timeout)
    try:
        data, ancillary, _, _ = daemon.notify.recvmsg(4096, socket.CMSG_SPACE(12))
    except TimeoutError:
        return None
    message = data.decode()
    daemon.messages.append(message)
    senders = [struct.unpack("3i", cmsg[:12])[0] for level, kind, cmsg in ancillary
               if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
    assert senders == [daemon.proc.pid], (senders, message)
    return message


def until(daemon: Daemon, prefix: str, timeout: float = 30) -> list[str]:
    """The notify datagrams up to the first with a line starting with ``prefix``."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.stderr()}")
        notice = receive(daemon, 0.2)
        if notice is not None:
            received.append(notice)
            if any(line.startswith(prefix) for line in notice.splitlines()):
                return received
    raise AssertionError(f"no {prefix} within {timeout}s; got {daemon.messages}")


def pending(daemon: Daemon, seconds: float = 0.3) -> list[str]:
    """The notify datagrams that arrive within ``seconds``."""
    received = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and (notice := receive(daemon, left)) is not None:
        received.append(notice)
    return received


def finish(daemon: Daemon) -> None:
    daemon.stop()
    daemon.notify.close()


def test_two_processes_share_the_load_each_with_its_own_audit_chain(keyed_token: Token, public_dir: Path) -> None:  # noqa: F811
    daemon = start(keyed_token, public_dir)
    try:
        pending(daemon)
        # systemd (NotifyAccess=main) hears one READY=1, from the process it started, once both serve.
        assert sum(m.count("READY=1") for m in daemon.messages) == 1, daemon.messages
        ready = next(m for m in daemon.messages if "READY=1" in m)
        assert "2 serving processes ready" in ready and f"MAINPID={daemon.proc.pid}" in ready
        serving = children(daemon.proc.pid)
        assert len(serving) == 2
        idle = {pid: sockets(pid) for pid in serving}

        client = daemon.client()
        public = {alias: serialization.load_pem_public_key(client.public_key_pem(alias).encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            for alias in ("signing", "ecsign")}
        signed: list[tuple[str, str, bytes, bytes]] = []
        held = threading.Event()
        counted = threading.Event()

        def sign(worker: int) -> None:  # one keep-alive connection per thread (AgentClient keeps one per thread)
            for n in range(10):
                alias, alg = ("ecsign", "ES256") if n % 2 else ("signing", "PS256")
                data = f"worker {worker} request {n}".encode()
                signed.append((alias, alg, data, client.sign(alias, data, alg)))
            held.wait(30)  # keep the connection open until the serving processes' sockets are counted
            counted.wait(30)

        threads = [threading.Thread(target=sign, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        eventually(lambda: len(signed) == 80, timeout=30)
        held.set()
        busy = {pid: sockets(pid) for pid in serving}
        counted.set()
        for thread in threads:
            thread.join(30)

        for alias, alg, data, signature in signed:
            assert verify_in_software(public[alias], signature, data, SignatureScheme.from_jose(alg)), (alias, alg)
        # The 8 client connections (plus the one that read the public keys) went to both serving processes.
        served = {pid: busy[pid] - idle[pid] for pid in serving}
        assert all(count >= 1 for count in served.values()) and sum(served.values()) >= 8, served

        # Each serving process has its own trail beside audit_file, held while it runs: one chain per file.
        own = [daemon.audit_file.with_name(f"audit.{n}.jsonl") for n in (1, 2)]
        assert trail_files(daemon.audit_file) == own and not daemon.audit_file.exists()
        trails = {path: [json.loads(line) for line in path.read_text().splitlines()] for path in own}
        for records in trails.values():
            assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
            assert len([r for r in records if r["operation"] == "canary"]) == 2  # its process checked both keys
        signs = [r for records in trails.values() for r in records if r["operation"] == "sign"]
        assert len(signs) == 80 and all(r["result"] == "ok" for r in signs)
        assert all(any(r["operation"] == "sign" for r in records) for records in trails.values())
        verified = subprocess.run([TPP_AGENT, "--config", str(daemon.config_path), "audit", "verify"],
                                  capture_output=True, text=True, timeout=60, check=False)
        assert verified.returncode == 0, verified.stderr
        for path, records in trails.items():
            assert f"audit trail {path}: {len(records)} record(s), chain intact" in verified.stdout
    finally:
        finish(daemon)


def test_wrong_pin_is_tried_once_by_the_first_serving_process_and_exit_78_passes_through(
        keyed_token: Token, public_dir: Path, shim: Shim, tmp_path: Path) -> None:  # noqa: F811
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("999999\n")
    wrong.chmod(0o600)
    config = shim_daemon_config(keyed_token, public_dir, shim)
    text = with_processes(config.read_text(), 2)
    config.write_text(text.replace(next(x for x in text.splitlines() if x.startswith("pin_file")),
                                   f'pin_file = "{wrong}"'))
    result = subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 78, result.stderr
    assert "wrong user PIN" in result.stderr and "999999" not in result.stderr
    assert shim.counts()["logins"] == 1  # summed over every process that loaded the module
    failures = [json.loads(line) for line in result.stderr.splitlines() if '"startup_failed"' in line]
    assert len(failures) == 1  # the second serving process was never started
    assert not (public_dir / "run" / "agent.sock").exists()


def test_sighup_reloads_every_process_and_sigterm_stops_them_all(keyed_token: Token,  # noqa: F811
                                                                 public_dir: Path) -> None:  # noqa: F811
    daemon = start(keyed_token, public_dir)
    try:
        serving = children(daemon.proc.pid)
        client = daemon.client()
        assert client.sign("ecsign", b"before", "ES256")
        daemon.proc.send_signal(signal.SIGHUP)
        reload = until(daemon, "READY=1")
        assert any("RELOADING=1" in m for m in reload[:-1]), reload
        assert "2 serving processes reloaded" in reload[-1]
        assert children(daemon.proc.pid) == serving  # reloaded in place, not restarted
        for n in range(4):  # new connections, handed to each process in turn
            assert len(daemon.client().sign("ecsign", f"after {n}".encode(), "ES256")) == 64

        daemon.proc.send_signal(signal.SIGTERM)
        until(daemon, "STOPPING=1", timeout=10)
        assert daemon.proc.wait(30) == 0
        assert not any(alive(pid) for pid in serving)
        assert not daemon.socket_path.exists()
    finally:
        finish(daemon)


@pytest.mark.parametrize("round_", range(3))
def test_systemd_stop_signals_every_process_of_the_unit_and_all_exit(keyed_token: Token, public_dir: Path,  # noqa: F811
                                                                     round_: int) -> None:
    """``systemctl stop`` (KillMode=control-group): SIGTERM to the supervisor, then to each serving process.

    Each serving process then gets SIGTERM twice (from systemd, then from its supervisor); the second one
    used to arrive while it wrote its "stopped" log line, and the handler waited for that write's lock forever.
    """
    daemon = start(keyed_token, public_dir, processes=4)
    try:
        serving = children(daemon.proc.pid)
        assert len(daemon.client().sign("ecsign", b"x", "ES256")) == 64
        for pid in (daemon.proc.pid, *serving):
            os.kill(pid, signal.SIGTERM)
        assert daemon.proc.wait(20) == 0  # the supervisor kills a stuck process only after drain_timeout + 5 s
        assert not any(alive(pid) for pid in serving)
        stopped = [json.loads(line) for line in daemon.stderr().splitlines() if '"event": "stopped"' in line]
        assert len(stopped) == 4 and all(event["signal"] == "SIGTERM" for event in stopped)
    finally:
        finish(daemon)


def test_a_serving_process_killed_takes_the_service_down_with_no_orphan(keyed_token: Token,  # noqa: F811
                                                                         public_dir: Path) -> None:  # noqa: F811
    daemon = start(keyed_token, public_dir)
    try:
        killed, other = children(daemon.proc.pid)
        os.kill(killed, signal.SIGKILL)
        assert daemon.proc.wait(30) != 0  # systemd restarts the whole unit (Restart=on-failure)
        assert not alive(other)
        assert '"serving_process_ended"' in daemon.stderr()
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            daemon.connect()  # nothing listens on the socket any more
    finally:
        finish(daemon)


def test_serving_processes_die_with_their_supervisor(keyed_token: Token, public_dir: Path) -> None:  # noqa: F811
    daemon = start(keyed_token, public_dir)
    try:
        serving = children(daemon.proc.pid)
        assert len(serving) == 2
        daemon.proc.kill()
        daemon.proc.wait(10)

        def serving_processes_gone() -> bool:
            return not any(alive(pid) for pid in serving)

        eventually(serving_processes_gone, timeout=5)
        with pytest.raises(ConnectionRefusedError):
            daemon.connect()  # the socket file is left behind, but no process holds the listener
    finally:
        finish(daemon)


def test_watchdog_pings_come_from_the_supervisor_while_both_processes_are_healthy(
        keyed_token: Token, public_dir: Path) -> None:  # noqa: F811
    daemon = start(keyed_token, public_dir, env={"WATCHDOG_USEC": "600000"})
    try:
        for _ in range(2):  # receive() checks each one's sender
            until(daemon, "WATCHDOG=1", timeout=10)
        assert len(children(daemon.proc.pid)) == 2
    finally:
        finish(daemon)


@pytest.mark.parametrize("value", [0, "many", True, 65])
def test_processes_setting_must_be_auto_or_a_count(keyed_token: Token, public_dir: Path,  # noqa: F811
                                                   value: object) -> None:
    config = keyed_token.write_config(with_processes(daemon_config(keyed_token, public_dir), value))
    result = subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 78  # EX_CONFIG: the unit does not restart a daemon whose configuration is bad
    assert (f'error: [daemon] processes must be "auto" or a whole number from 1 to 64, got {value!r}'
            in result.stderr), result.stderr
    assert "hint:" in result.stderr


@pytest.mark.parametrize("processes", ["auto", None], ids=["auto", "default"])
def test_processes_auto_is_one_serving_process_per_cpu_and_the_default(keyed_token: Token, public_dir: Path,  # noqa: F811
                                                                        processes: str | None) -> None:
    daemon = start(keyed_token, public_dir, processes=processes)
    try:
        assert len(children(daemon.proc.pid)) == len(os.sched_getaffinity(0))
        assert len(daemon.client().sign("ecsign", b"auto", "ES256")) == 64
    finally:
        finish(daemon)


def threads_cpus(pid: int) -> set[frozenset[int]]:
    """The CPUs each thread of ``pid`` may run on (one set if all agree)."""
    return {frozenset(os.sched_getaffinity(int(task.name))) for task in Path(f"/proc/{pid}/task").iterdir()}


def ready_lines(daemon: Daemon) -> list[dict[str, object]]:
    return [line for line in map(json.loads, (text for text in daemon.stderr().splitlines() if text.startswith("{")))
            if line.get("event") == "ready"]


@pytest.mark.parametrize("setting", [None, "auto", "none"], ids=["default", "auto", "none"])
def test_each_serving_process_runs_on_its_own_share_of_the_cpus_unless_told_not_to(
        keyed_token: Token, public_dir: Path, setting: str | None) -> None:  # noqa: F811
    allowed = frozenset(os.sched_getaffinity(0))
    text = with_processes(daemon_config(keyed_token, public_dir), 2)
    if setting is not None:
        text = with_daemon_lines(text, f'cpu_affinity = "{setting}"\n')
    daemon = launch(keyed_token.write_config(text), public_dir)
    try:
        assert len(daemon.client().sign("ecsign", b"pinned", "ES256")) == 64
        serving = children(daemon.proc.pid)
        assert len(serving) == 2
        # Every thread of a serving process (the workers, the I/O thread, the audit committer) runs where it does.
        per_process = [threads_cpus(pid) for pid in serving]
        assert all(len(cpus) == 1 for cpus in per_process), per_process
        shares = [next(iter(cpus)) for cpus in per_process]
        if setting == "none" or len(allowed) < 2:
            assert shares == [allowed, allowed]
        else:
            assert not shares[0] & shares[1] and shares[0] | shares[1] == allowed, shares
        assert threads_cpus(daemon.proc.pid) == {allowed}  # the supervisor only hands connections over
        logged = sorted(str(line["cpus"]) for line in ready_lines(daemon))
        assert logged == sorted(cpu_list(share) for share in shares)
    finally:
        daemon.stop()


def test_cpu_affinity_must_be_auto_or_none(keyed_token: Token, public_dir: Path) -> None:  # noqa: F811
    config = keyed_token.write_config(with_daemon_lines(daemon_config(keyed_token, public_dir),
                                                        'cpu_affinity = "spread"\n'))
    result = subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 78
    assert "error: [daemon] cpu_affinity must be one of 'auto', 'none', got 'spread'" in result.stderr, result.stderr
    assert 'hint: "auto": each serving process runs on its own share of the CPUs' in result.stderr


def test_cpu_shares_cut_the_allowed_cpus_into_neighbouring_runs() -> None:
    def runs(*groups: set[int]) -> list[frozenset[int]]:
        return [frozenset(group) for group in groups]

    assert cpu_shares(2, {0, 1}) == runs({0}, {1})
    assert cpu_shares(2, range(8)) == runs({0, 1, 2, 3}, {4, 5, 6, 7})
    assert cpu_shares(3, range(8)) == runs({0, 1}, {2, 3, 4}, {5, 6, 7})
    assert cpu_shares(2, {7, 2, 5, 0}) == runs({0, 2}, {5, 7})  # a cpuset or CPUAffinity= with gaps
    assert cpu_shares(1, range(4)) is None
    assert cpu_shares(3, {0, 1}) is None  # shares would overlap: the kernel places them
    assert cpu_list({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert cpu_list({5}) == "5"


def test_a_manager_that_stops_reading_its_notify_socket_does_not_stop_the_service(
        keyed_token: Token, public_dir: Path) -> None:  # noqa: F811
    """Watchdog pings every 0.1 s into a notify socket nobody reads after READY=1: its queue fills within a
    second or two, and the supervisor must not wait on it (it did, and then handed no connection to its serving
    processes: requests went unanswered)."""
    daemon = start(keyed_token, public_dir, env={"WATCHDOG_USEC": "200000"})
    try:
        time.sleep(3)  # far more pings than the socket queues
        client = daemon.client()
        for n in range(6):  # new connections, handed to both serving processes in turn
            assert len(client.sign("ecsign", f"still served {n}".encode(), "ES256")) == 64
            client.close()
        assert daemon.proc.poll() is None
    finally:
        finish(daemon)
