"""systemd integration with real sockets: sd_notify, watchdog, SIGTERM drain, SIGHUP reload,
socket activation, exit status on a wrong PIN, and `systemd-analyze verify` on the shipped units."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from agent.client import AgentClient, AgentRequestError, AgentUnavailableError
from agent.daemon.systemd import Notifier, listen_sockets
from tests.conftest import REPO, Token
from tests.daemon.conftest import TPP_AGENT, Daemon, daemon_config, read_all, start_daemon


def test_ready_carries_status_and_watchdog_pings(keyed_token: Token, public_dir: Path) -> None:
    daemon = start_daemon(keyed_token, public_dir, env={"WATCHDOG_USEC": "400000"})
    try:
        ready = next(m for m in daemon.messages if "READY=1" in m)
        assert "2 key(s) checked" in ready and f"MAINPID={daemon.proc.pid}" in ready
        daemon.wait_for("WATCHDOG=1", timeout=10)
        canaries = [line for line in daemon.audit_file.read_text().splitlines() if '"operation":"canary"' in line]
        assert len(canaries) == 2
    finally:
        daemon.stop()


def test_sigterm_sends_stopping_and_drains_in_flight_requests(daemon: Daemon) -> None:
    results: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        client = daemon.client()
        while not stop.is_set():
            try:
                client.sign("signing", b"drain", "PS256")
                results.append("ok")
            except AgentUnavailableError:
                results.append("closed")  # connection refused or closed before a request was read
                return
            except AgentRequestError as exc:
                results.append(exc.code)
                return

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    while results.count("ok") < 50:
        threading.Event().wait(0.01)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_for("STOPPING=1", timeout=10)
    assert daemon.proc.wait(30) == 0
    stop.set()
    for thread in threads:
        thread.join(10)
    assert set(results) <= {"ok", "closed"}, set(results)
    assert not daemon.socket_path.exists()


def test_sighup_reloads_policy_and_keys_without_logging_in_again(daemon: Daemon, tmp_path: Path) -> None:
    client = daemon.client()
    assert client.sign("signing", b"before", "RS256")
    wrong_pin = tmp_path / "wrong.pin"
    wrong_pin.write_text("999999\n")
    wrong_pin.chmod(0o600)
    text = daemon.config_path.read_text()
    pin_line = next(line for line in text.splitlines() if line.startswith("pin_file"))
    daemon.config_path.write_text(text.replace('algorithms = ["PS256", "RS256"]', 'algorithms = ["PS256"]')
                                  .replace(pin_line, f'pin_file = "{wrong_pin}"'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("RELOADING=1", timeout=10)
    daemon.wait_for("READY=1", timeout=30)
    with pytest.raises(AgentRequestError) as caught:
        client.sign("signing", b"after", "RS256")
    assert caught.value.code == "algorithm_not_allowed"
    # The session from the first login is still there: the wrong PIN was never tried.
    assert client.sign("signing", b"after", "PS256")
    assert daemon.proc.poll() is None and "wrong user PIN" not in daemon.stderr()


def test_wrong_pin_exits_78_without_retrying(keyed_token: Token, public_dir: Path, tmp_path: Path) -> None:
    wrong_pin = tmp_path / "wrong.pin"
    wrong_pin.write_text("000000\n")
    wrong_pin.chmod(0o600)
    config = keyed_token.write_config(daemon_config(keyed_token, public_dir))
    text = config.read_text()
    pin_line = next(line for line in text.splitlines() if line.startswith("pin_file"))
    config.write_text(text.replace(pin_line, f'pin_file = "{wrong_pin}"'))
    result = subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 78 and "wrong user PIN" in result.stderr and "000000" not in result.stderr


def test_socket_activation_hands_over_the_listening_socket(keyed_token: Token, public_dir: Path) -> None:
    path = public_dir / "activated.sock"
    config = keyed_token.write_config(daemon_config(keyed_token, public_dir))
    env = {"TPP_AGENT_CONFIG": str(config), "NOTIFY_SOCKET": "", "PATH": os.environ["PATH"],
           "SOFTHSM2_CONF": str(keyed_token.softhsm_conf)}
    activator = shutil.which("systemd-socket-activate")
    if activator:
        argv = [activator, "-l", str(path), *(f"-E{k}={v}" for k, v in env.items()), TPP_AGENT, "serve"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen()
        proc = _hand_over(listener, env)
    try:
        # The client connects before the agent even runs: it queues in the listening socket.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            for _ in range(100):
                try:
                    sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    threading.Event().wait(0.05)
            sock.sendall(b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.1 200 ")
        assert AgentClient(path).sign("signing", b"activated", "PS256")
        assert not (public_dir / "run").exists()  # it never bound a socket of its own
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _hand_over(listener: socket.socket, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """What systemd does: the listening socket as fd 3, LISTEN_PID naming the exec'd process."""
    fd = listener.fileno()
    script = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{TPP_AGENT}" serve 3<&{fd} {fd}<&-'
    return subprocess.Popen(["/bin/sh", "-c", script], env=env, pass_fds=(fd,), stderr=subprocess.PIPE)


def test_notifier_speaks_to_abstract_and_path_sockets(tmp_path: Path) -> None:
    for address in (f"@tpp-agent-test-{os.getpid()}", str(tmp_path / "n.sock")):
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind("\0" + address[1:] if address.startswith("@") else address)
        notifier = Notifier(address)
        assert notifier.ready("all good") and notifier.watchdog()
        assert receiver.recv(4096).decode().splitlines()[:2] == ["READY=1", "STATUS=all good"]
        assert receiver.recv(4096) == b"WATCHDOG=1"
        notifier.close()
        receiver.close()
    assert not Notifier("").enabled


def test_listen_fds_for_another_pid_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_sockets() == [] and "LISTEN_FDS" not in os.environ


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_shipped_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = REPO / "packaging" / "systemd"
    for name in ("tpp-agent.service", "tpp-agent.socket"):
        # verify insists that ExecStart= exists: point it at this checkout's console script.
        text = (units / name).read_text().replace("/usr/bin/tpp-agent", TPP_AGENT)
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "tpp-agent.service"),
                             str(tmp_path / "tpp-agent.socket")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    for name in ("tpp-agent.sysusers", "tpp-agent.tmpfiles"):
        assert (units / name).read_text().strip()
