"""What the benchmarks share: a throw-away token, a daemon started the way systemd starts it, load, results."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
# BENCH_AGENT: another build's ``tpp-agent`` to compare against (e.g. a wrapper setting PYTHONPATH to a checkout).
TPP_AGENT = Path(os.environ.get("BENCH_AGENT") or Path(sys.executable).parent / "tpp-agent")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


# -- results ---------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    """One target of issue 7: a measured value against its bound."""

    name: str
    value: str
    target: str
    ok: bool


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    tables: list[Table] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


# -- machine -----------------------------------------------------------------------
def machine() -> dict[str, str]:
    def first(pattern: str, text: str) -> str:
        found = re.search(pattern, text, re.M)
        return found.group(1).strip() if found else "unknown"

    import ssl

    cpuinfo = Path("/proc/cpuinfo").read_text()
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    def package(name: str) -> str:
        found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                               check=False)
        return found.stdout or "unknown"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": first(r"^model name\s*:\s*(.*)$", cpuinfo),
        "os": first(r'^PRETTY_NAME="?([^"\n]*)"?$', os_release),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "softhsm2": package("softhsm2"),
        "libp11": package("libengine-pkcs11-openssl"),
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


# -- a token and its configuration ---------------------------------------------------
@dataclasses.dataclass
class State:
    """A state dir with its own SoftHSM2 token (``label``)."""

    dir: Path
    label: str

    @classmethod
    def create(cls, directory: Path, label: str) -> State:
        subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(directory),
                        "--label", label], check=True, capture_output=True)
        return cls(directory, label)

    @property
    def softhsm_conf(self) -> Path:
        return self.dir / "softhsm" / "softhsm2.conf"

    def config_text(self, body: str, module: str | None = None) -> str:
        module_line = f'module = "{module}"\n' if module else ""
        return (f'[state]\ndir = "{self.dir}"\n'
                f'[pkcs11]\n{module_line}token = "{self.label}"\npin_file = "{self.dir}/softhsm/user.pin"\n'
                f'[pkcs11.environment]\nSOFTHSM2_CONF = "{self.softhsm_conf}"\n'
                f'[policy]\nadmin_users = [{os.getuid()}]\n' + body)

    def write_config(self, name: str, body: str, module: str | None = None) -> Path:
        path = self.dir / name
        path.write_text(self.config_text(body, module))
        return path


# -- the daemon --------------------------------------------------------------------
@dataclasses.dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    ready_seconds: float

    @classmethod
    def start(cls, config: Path, socket_path: Path, env: dict[str, str] | None = None) -> Daemon:
        """``tpp-agent serve``; READY=1 awaited on a real NOTIFY_SOCKET, timed from process start."""
        notify_path = config.parent / f"notify-{time.monotonic_ns()}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        log = (config.parent / "daemon.log").open("ab")
        started = time.monotonic()
        proc = subprocess.Popen([str(TPP_AGENT), "--config", str(config), "serve"], stderr=log,
                                env={**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify_path)})
        while True:
            try:
                if b"READY=1" in notify.recv(4096):
                    break
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() - started > 60:
                    proc.kill()
                    raise RuntimeError(f"daemon not ready; see {config.parent / 'daemon.log'}") from None
        ready = time.monotonic() - started
        notify.close()
        notify_path.unlink()
        log.close()
        return cls(proc, socket_path, ready)

    def pids(self) -> list[int]:
        """The daemon and its serving processes (``[daemon] processes`` > 1)."""
        pid = self.proc.pid
        return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        return total / CLOCK_TICK

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB of the largest process: now and the peak so far."""
        rss, peak = 0, 0
        for pid in self.pids():
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            rss, peak = max(rss, int(status["VmRSS"].split()[0])), max(peak, int(status["VmHWM"].split()[0]))
        return rss / 1024, peak / 1024

    def pss_mb(self) -> float:
        """Proportional set size of all its processes together, in MB: pages they share counted once."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        return total / 1024

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http_request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data


# -- load --------------------------------------------------------------------------
@dataclasses.dataclass
class Load:
    rate: float
    p50_ms: float
    p99_ms: float
    count: int
    cpu_seconds: float = 0.0  # the daemon's, over the measured window
    client_cpu_seconds: float = 0.0  # the load generator's, over the same window


def drive(spec: dict[str, Any], daemon: Daemon | None = None) -> Load:
    """Run ``bench.load`` in its own process; the daemon's CPU time is read around the measured window."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=REPO, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    go = proc.stdout.readline()
    cpu0 = daemon.cpu_seconds() if daemon else 0.0
    line = proc.stdout.readline()
    cpu1 = daemon.cpu_seconds() if daemon else 0.0
    proc.wait(60)
    if go.strip() != "go" or not line:
        raise RuntimeError(f"load generator failed (exit {proc.returncode})")
    result = json.loads(line)
    if result["errors"]:
        raise RuntimeError(f"load generator: {result['errors']}")
    return Load(result["rate"], result["p50_ms"], result["p99_ms"], result["count"], cpu1 - cpu0,
                result["client_cpu_seconds"])


def in_threads(threads: int, seconds: float, setup: Callable[[], Callable[[], object]],
               warmup: float = 0.3) -> tuple[float, float, float, float]:
    """Closed loop in this process: (ops/s, p50 ms, p99 ms, CPU seconds of this process per op)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    ready = threading.Barrier(threads + 1)
    begin: list[float] = []

    def loop(n: int) -> None:
        work = setup()
        ready.wait()
        start, end = begin[0], begin[0] + seconds
        own = latencies[n]
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                return
            work()
            if t0 >= start:
                own.append(time.monotonic() - t0)

    pool = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    begin.append(time.monotonic() + warmup)
    ready.wait()
    time.sleep(max(0.0, begin[0] - time.monotonic()))
    cpu0 = time.process_time()
    for thread in pool:
        thread.join()
    cpu = time.process_time() - cpu0
    merged = sorted(x for own in latencies for x in own)
    count = max(1, len(merged))
    return len(merged) / seconds, _pct(merged, 50) * 1000, _pct(merged, 99) * 1000, cpu / count


def median_run(runs: list[T], rate: Callable[[T], float]) -> T:
    """The run with the median rate: its rate, latencies and CPU are reported together. The machine's noise
    moves single runs by 5 to 10 percent; a median of alternating runs is steadier, and unlike the worst run it is not
    biased by the pick."""
    return sorted(runs, key=rate)[len(runs) // 2]


def _pct(values: list[float], pct: float) -> float:
    return values[min(len(values) - 1, int(len(values) * pct / 100))] if values else float("nan")
