"""What the module launchers share: free loopback ports, started processes, waiting for a socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ModuleUnavailable(Exception):
    """The module or a tool it needs is not installed: the reason, for a skip or an error line."""


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None and not os.path.exists(tool)]
    if missing:
        raise ModuleUnavailable(f"not installed: {', '.join(missing)} (run scripts/bootstrap as root)")


def first_existing(candidates: Sequence[str], missing: str) -> str:
    """The first of ``candidates`` that exists; ModuleUnavailable(``missing``) if none does."""
    for path in candidates:
        if os.path.exists(path):
            return path
    raise ModuleUnavailable(missing)


def serve_until_interrupted(launch: AbstractContextManager[T], describe: Callable[[T], Mapping[str, str]]) -> int:
    """What ``python -m tests.modules.X`` does: start the module, print how to reach it, stop it on ^C."""
    try:
        with launch as launched:
            for name, value in describe(launched).items():
                print(f"{name}={value}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:  # while starting: what had started is stopped already
        return 130
    except ModuleUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_port_pair(tries: int = 50) -> int:
    """A loopback port free together with the next one (swtpm's server and control channels).

    Both are held at once while probing: a free port alone may have its neighbour taken by a connection
    (Linux tends to give bind and connect ephemeral ports of opposite parity); swtpm failed so in CI, we think.
    """
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise ModuleUnavailable(f"no two adjacent free loopback ports after {tries} tries")


def wait_until(ready: Callable[[], bool], what: str, service: Service | None = None, timeout: float = 20.0) -> None:
    """Poll ``ready`` until it holds; ModuleUnavailable (with the service's last words) if it exits or times out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if service is not None and service.process is not None and service.process.poll() is not None:
            process = service.process
            raise ModuleUnavailable(f"{what} exited with status {process.returncode}: {service.last_line()}")
        if time.monotonic() > deadline:
            words = f": {service.last_line()}" if service is not None else ""
            raise ModuleUnavailable(f"{what} not ready after {timeout:.0f}s{words}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Service:
    """A child process we started in a process group of its own, stopped by that group's id (never by name).

    The group takes the processes it forked with it (``p11-kit server`` serves each client from a child).
    """

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        return self.process

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def last_line(self) -> str:
        with contextlib.suppress(OSError):
            lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
            return lines[-1] if lines else f"nothing in {self.log}"
        return f"no log at {self.log}"
