"""A real daemon (``tpp-agent serve`` in a subprocess) on a SoftHSM2 token, and ways to talk to it.

The socket lives under a directory ``nobody`` can traverse, so tests can connect
from processes running as other users (the suite runs as root and ``setuid``\\s
children). READY is awaited on a real datagram socket passed as ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.client import AgentClient
from agent.daemon.limits import Limits
from agent.daemon.server import Handler, Known, Routine, Server
from agent.runtime import Runtime
from pkcs11_backends.errors import DuplicateKeyError
from pkcs11_backends.keys import KeySpec
from tests.conftest import Token

NOBODY = 65534
TPP_AGENT = str(Path(sys.executable).parent / "tpp-agent")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    config_path: Path
    audit_file: Path
    notify: socket.socket
    messages: list[str] = field(default_factory=list)

    def client(self) -> AgentClient:
        return AgentClient(self.socket_path, timeout=10)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.socket_path))
        return sock

    def raw(self, data: bytes) -> bytes:
        """Send bytes on a new connection and read until the agent closes it."""
        with self.connect() as sock:
            sock.sendall(data)
            return read_all(sock)

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        """The next notify datagram with a line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            self.notify.settimeout(0.2)
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if any(line.startswith(prefix) for line in message.splitlines()):
                return message
        raise AssertionError(f"no {prefix} within {timeout}s; got {self.messages}")

    def stderr(self) -> str:
        return (self.config_path.parent / "daemon.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def http_server(path: Path, handler: Handler, limits: Limits, known: Known | None = None,
                routine: Routine | None = None) -> Iterator[Path]:
    """The daemon's HTTP server alone on a Unix socket at ``path``, answering with ``handler``."""
    with running_server(path, handler, limits, known, routine):
        yield path


@contextlib.contextmanager
def running_server(path: Path, handler: Handler, limits: Limits, known: Known | None = None,
                   routine: Routine | None = None) -> Iterator[Server]:
    """:func:`http_server`, giving the server itself (what the session pool's watch thread calls)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    server = Server(listener, handler, limits, known=known, routine=routine)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        listener.close()
    assert not thread.is_alive(), "the server did not stop within 10 s"


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from a keep-alive connection, leaving the next (pipelined) one unread."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: a larger read could swallow the next response
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"connection closed mid-response: {head!r}")
        head += byte
    lines = head[:-4].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise AssertionError(f"connection closed mid-body: {body!r}")
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp that other users can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tpp-agent-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keyed_token(token: Token, runtime: Runtime) -> Token:
    runtime.keys.generate("signing", KeySpec.parse("rsa:2048"))
    runtime.keys.generate("ecsign", KeySpec.parse("ec:p256"))
    with contextlib.suppress(DuplicateKeyError):  # softhsm/make_token.py's token has it already
        runtime.keys.generate("audit", KeySpec.parse("ec:p256"))  # signs the audit trail's checkpoints
    return token


ONE_PROCESS = "processes = 1\n"  # the tests' default: see daemon_config


def with_daemon_lines(config: str, lines: str) -> str:
    """``config`` with ``lines`` at the top of its [daemon] table; a ``processes`` line among them replaces the
    tests' default one."""
    if re.search(r"^processes\s*=", lines, re.MULTILINE):
        config = config.replace(ONE_PROCESS, "", 1)
    return config.replace("[daemon]\n", f"[daemon]\n{lines}", 1)


def daemon_config(token: Token, public_dir: Path, extra: str = "") -> str:
    """One serving process (the default is one per CPU): these tests read the one audit trail, audit_file itself;
    tests/daemon/test_processes.py and the demo run the default."""
    return textwrap.dedent(f"""\
        [keys.signing]
        uri = "pkcs11:token={token.label};object=signing;type=private"
        algorithms = ["PS256", "RS256"]
        kid = "sig-1"
        raw_sign = true

        [keys.ecsign]
        uri = "pkcs11:token={token.label};object=ecsign;type=private"
        algorithms = ["ES256"]
        raw_sign = true

        [daemon]
        socket = "{public_dir}/run/agent.sock"
        socket_group = "nogroup"
        processes = 1
        max_connections = 64
        workers = 4
        max_request_bytes = 65536
        request_timeout = 1.0
        audit_file = "{token.config_path.parent}/audit.jsonl"
        health_interval = 0.5

        [policy]
        admin_users = ["root"]

        [policy.rules.nobody-signs]
        users = ["nobody"]
        operations = ["keys", "public", "sign"]
        keys = ["signing"]
        """) + extra


def nobody_rule(public_dir: Path, audit_file: Path, rule: str, operations: list[str], keys: list[str] | None = None,
                banks: list[str] | None = None) -> str:
    """[daemon] on a socket other users can reach, root as admin, and one rule for ``nobody``."""
    scope = "".join(f"{name} = {json.dumps(values)}\n" for name, values in (("keys", keys), ("banks", banks))
                    if values is not None)
    return (f'[daemon]\nsocket = "{public_dir}/run/agent.sock"\nsocket_group = "nogroup"\n{ONE_PROCESS}'
            f'audit_file = "{audit_file}"\n\n[policy]\nadmin_users = ["root"]\n\n'
            f'[policy.rules.{rule}]\nusers = ["nobody"]\noperations = {json.dumps(operations)}\n{scope}')


def start_daemon(token: Token, public_dir: Path, extra: str = "", env: dict[str, str] | None = None,
                 wait_ready: bool = True) -> Daemon:
    return launch(token.write_config(daemon_config(token, public_dir, extra)), public_dir, env, wait_ready)


def launch(config: Path, public_dir: Path, env: dict[str, str] | None = None, wait_ready: bool = True) -> Daemon:
    """``tpp-agent serve`` on ``config`` (its socket in ``public_dir/run``), READY awaited on a notify socket."""
    notify_path = public_dir / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log = (config.parent / "daemon.log").open("ab")
    full_env = {**os.environ, "TPP_AGENT_CONFIG": str(config), "NOTIFY_SOCKET": str(notify_path), **(env or {})}
    proc = subprocess.Popen([TPP_AGENT, "serve"], env=full_env, stdout=log, stderr=log)
    daemon = Daemon(proc, public_dir / "run" / "agent.sock", config, config.parent / "audit.jsonl", notify)
    if wait_ready:
        daemon.wait_for("READY=1")
    return daemon


@pytest.fixture
def daemon(keyed_token: Token, public_dir: Path) -> Iterator[Daemon]:
    running = start_daemon(keyed_token, public_dir)
    yield running
    running.stop()
    running.notify.close()
