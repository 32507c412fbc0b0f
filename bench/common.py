"""What the benchmarks share: a throw-away token, a daemon started the way systemd starts it, load, results."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench.windows import ClosedLoopThreads, Window, Work, measure, p50_p99_ms

REPO = Path(__file__).resolve().parent.parent
# BENCH_AGENT: another build's ``tpp-agent`` to compare against (e.g. a wrapper setting PYTHONPATH to a checkout).
TPP_AGENT = Path(os.environ.get("BENCH_AGENT") or Path(sys.executable).parent / "tpp-agent")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
# The longest a load generator may stay silent when it owes the bench a line (ready, go, end, a result). A window
# is seconds long and a set-up a login; past this the agent (or the token behind p11-kit) has stopped answering,
# and the benchmark fails with that instead of waiting for ever (a run once hung for two hours in `signing`).
SILENCE_SECONDS = 120.0


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

    def config_text(self, body: str, module: str | None = None, pkcs11: str = "") -> str:
        """A configuration for this token: ``body`` after it, ``pkcs11`` lines in its [pkcs11] table."""
        module_line = f'module = "{module}"\n' if module else ""
        return (f'[state]\ndir = "{self.dir}"\n'
                f'[pkcs11]\n{module_line}token = "{self.label}"\npin_file = "{self.dir}/softhsm/user.pin"\n'
                f'{pkcs11}[pkcs11.environment]\nSOFTHSM2_CONF = "{self.softhsm_conf}"\n'
                f'[policy]\nadmin_users = [{os.getuid()}]\n' + body)

    def write_config(self, name: str, body: str, module: str | None = None, pkcs11: str = "") -> Path:
        path = self.dir / name
        path.write_text(self.config_text(body, module, pkcs11))
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
        return with_children(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

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


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of these processes so far, all their threads, user and system."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICK


class CpuSource(Protocol):
    """What serves a load (the daemon, p11-kit's server): its CPU time is read around each window."""

    def cpu_seconds(self) -> float: ...


def with_children(pid: int) -> list[int]:
    """``pid`` and its child processes (a daemon's serving processes, p11-kit's remote per connection)."""
    return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


@dataclasses.dataclass
class Process:
    """A server process of ours and its children, by pid."""

    pid: int

    def cpu_seconds(self) -> float:
        return cpu_seconds(with_children(self.pid))


def build_shim(work: Path) -> Path:
    """The fault-injection PKCS#11 module (tests/faults/pkcs11_shim.c), compiled into ``work``."""
    out = work / "pkcs11_shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-I/usr/include/p11-kit-1", "-o", str(out),
                    str(REPO / "tests" / "faults" / "pkcs11_shim.c"), "-ldl"], check=True, timeout=120)
    return out


def daemon_table(socket_path: Path, audit_file: Path) -> str:
    """The start of a benchmark daemon's [daemon] table (a profile's settings follow it)."""
    # Every load of a benchmark comes from this one uid, and a table's loads are all open at once (1 + 2 + 8 + 32
    # connections per algorithm and profile): more than a caller's default share (connections_per_uid = 64).
    return f'[daemon]\nsocket = "{socket_path}"\naudit_file = "{audit_file}"\nconnections_per_uid = 1024\n'


def http_request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data


# -- load --------------------------------------------------------------------------
# Loads that are compared take turns in windows this long (plus a warm-up each): the speed of this kind of VM
# drifts in phases a few hundred ms long (libcrypto's ECDSA here: up to 1.6x between phases, while a Python
# loop and file syscalls keep their pace), so a baseline and an agent measured one after the other for
# seconds each could meet different phases; taking short turns, both meet the same mix.
TURN_SECONDS = 0.25
TURN_WARMUP = 0.05
WARMUP = 0.3  # before a single long window
Cell = TypeVar("Cell")  # what names a cell of a table: (alg, clients), clients…


@dataclasses.dataclass
class Load:
    """What one or more windows of a load measured, added up."""

    count: int = 0  # requests completed inside the windows
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the daemon's (all its processes) or, for an in-process load, this process's
    client_cpu_seconds: float = 0.0  # the load generator's
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / max(1, self.count) * 1e6

    @property
    def all_cpu_us_per_request(self) -> float:
        """Server and clients together: what a signature costs the machine."""
        return (self.cpu_seconds + self.client_cpu_seconds) / max(1, self.count) * 1e6

    def add(self, other: Load) -> None:
        self.count += other.count
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds
        self.client_cpu_seconds += other.client_cpu_seconds


class Contender(Protocol):
    """A load that can be driven window by window, idle in between."""

    def window(self, warmup: float, seconds: float) -> Load:
        """Drive one window (after ``warmup`` seconds not counted); what completed inside it."""

    def finish(self) -> tuple[float, float]:
        """End the load: (p50, p99) in ms over every window."""

    def close(self) -> None:
        """Release what the load holds, finished or not (idempotent)."""


class LoadProcess:
    """``bench.load`` in its own process; the server's CPU time is read when each window opens and closes."""

    def __init__(self, spec: dict[str, Any], daemon: CpuSource | None = None) -> None:
        self._daemon = daemon
        self._mode = spec["mode"]
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.load"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=REPO, text=True)
        # Its lines come through a thread so that each wait for one has a deadline (a read on the pipe has none).
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send(spec)
        self._expect("ready")

    def window(self, warmup: float, seconds: float) -> Load:
        self.open(warmup, seconds)
        self._expect("go")
        cpu = self._daemon.cpu_seconds() if self._daemon else 0.0
        self._expect("end")
        cpu = (self._daemon.cpu_seconds() if self._daemon else 0.0) - cpu
        return self.counted(seconds, cpu)

    # A window in steps, for a group of processes that run theirs together (:class:`LoadProcesses`).
    def open(self, warmup: float, seconds: float) -> None:
        self._send({"warmup": warmup, "seconds": seconds})

    def opened(self) -> None:
        self._expect("go")

    def closed(self) -> None:
        self._expect("end")

    def counted(self, seconds: float, cpu: float) -> Load:
        result = self._result()
        return Load(result["count"], seconds, cpu, result["client_cpu_seconds"])

    def finish(self) -> tuple[float, float]:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        result = self._result()
        self._proc.wait(60)
        return result["p50_ms"], result["p99_ms"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed under it by close()
            for line in self._proc.stdout:
                self._lines.put(line)
        self._lines.put("")  # end of output

    def _line(self) -> str:
        try:
            line = self._lines.get(timeout=SILENCE_SECONDS)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"{self._mode} load generator silent for {SILENCE_SECONDS:g} s: its server stopped "
                               "answering (the daemon's log is next to its config)") from None
        if not line:
            raise RuntimeError(f"load generator ended (exit {self._proc.wait(60)})")
        return line.strip()

    def _expect(self, word: str) -> None:
        line = self._line()
        if line != word:
            raise RuntimeError(f"load generator said {line[:200]!r}, expected {word!r}")

    def _result(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._line())
        if result["errors"]:
            raise RuntimeError(f"load generator: {result['errors']}")
        return result


class LoadProcesses:
    """``bench.load`` in several processes that drive their windows together (one PKCS#11 application each:
    p11-kit's clients); the server's CPU time is read around each window, the latencies are pooled."""

    def __init__(self, specs: list[dict[str, Any]], server: CpuSource) -> None:
        self._server = server
        self._procs: list[LoadProcess] = []
        try:  # one after the other: SoftHSM2 instances logging in at once in p11-kit's remotes can fail
            for spec in specs:
                self._procs.append(LoadProcess(spec))
        except BaseException:
            self.close()
            raise

    def window(self, warmup: float, seconds: float) -> Load:
        for proc in self._procs:
            proc.open(warmup, seconds)
        for proc in self._procs:
            proc.opened()
        cpu = self._server.cpu_seconds()
        for proc in self._procs:
            proc.closed()
        cpu = self._server.cpu_seconds() - cpu
        total = Load(seconds=seconds, cpu_seconds=cpu)
        for proc in self._procs:
            load = proc.counted(seconds, 0.0)
            total.count += load.count
            total.client_cpu_seconds += load.client_cpu_seconds
        return total

    def finish(self) -> tuple[float, float]:
        """The largest p50 and p99 of the processes (each is one client: the slowest is what a client meets)."""
        results = [proc.finish() for proc in self._procs]
        return max(r[0] for r in results), max(r[1] for r in results)

    def close(self) -> None:
        for proc in self._procs:
            proc.close()


class InProcess:
    """A closed loop on threads of this process (the raw baselines); CPU is this process's."""

    def __init__(self, threads: int, setup: Callable[[], Work]) -> None:
        self._threads = ClosedLoopThreads(threads, setup)
        self._closed = False

    def window(self, warmup: float, seconds: float) -> Load:
        before = len(self._threads.latencies)
        cpu = measure(Window.after(warmup, seconds), self._threads.run)
        if self._threads.errors:
            raise RuntimeError(f"in-process load: {self._threads.errors[:3]}")
        return Load(len(self._threads.latencies) - before, seconds, cpu)

    def finish(self) -> tuple[float, float]:
        self.close()
        return p50_p99_ms(self._threads.latencies)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._threads.close()


@dataclasses.dataclass
class Measured:
    total: Load  # every run together, with the latency percentiles
    runs: list[Load]

    def ratio(self, baseline: Measured) -> float:
        """The median of the runs' ratios: what a target is checked on (one odd run cannot carry it)."""
        return statistics.median(self.ratios(baseline))

    def ratios(self, baseline: Measured) -> list[float]:
        """Run by run: how much the ratio moves."""
        return [mine.rate / theirs.rate if theirs.rate else 0.0
                for mine, theirs in zip(self.runs, baseline.runs, strict=True)]


RATIO_NOTE = "ratio: the median of the runs' ratios (lowest and highest run); a target is met when the median clears it"


def ratio_cell(ratio: float, per_run: list[float]) -> str:
    """``77% (74% to 80%)``: the median of the runs, then the lowest and highest run (one run: the ratio alone)."""
    if len(per_run) < 2:
        return f"{ratio:.0%}"
    return f"{ratio:.0%} ({min(per_run):.0%} to {max(per_run):.0%})"


def compare_cells(cells: dict[Cell, dict[str, Contender]], seconds: float,
                  runs: int) -> dict[Cell, dict[str, Measured]]:
    """Each cell's contenders for ``seconds`` per run, ``runs`` times, taking turns within the cell
    (:data:`TURN_SECONDS`; the order rotates each turn). Run by run: the first run of every cell, then the
    second… so that a cell's runs are spread over the whole benchmark. This VM also has slow stretches of tens
    of seconds that weigh on the agent at one client more than on its baseline (a cell's three runs measured
    in one go agreed with each other and not with the next benchmark's: ES256 at 1 client 29.2 to 30.2% in one,
    33.5 to 35.0% in another); spread out, a cell meets the same mix as the others. All contenders are closed at
    the end."""
    loads: dict[Cell, dict[str, list[Load]]] = {cell: {name: [] for name in contenders}
                                                 for cell, contenders in cells.items()}
    try:
        for _ in range(runs):
            for cell, contenders in cells.items():
                for name, load in _one_run(contenders, seconds).items():
                    loads[cell][name].append(load)
        measured: dict[Cell, dict[str, Measured]] = {}
        for cell, contenders in cells.items():
            measured[cell] = {}
            for name, contender in contenders.items():
                total = Load()
                for load in loads[cell][name]:
                    total.add(load)
                total.p50_ms, total.p99_ms = contender.finish()
                measured[cell][name] = Measured(total, loads[cell][name])
        return measured
    finally:
        for contenders in cells.values():
            for contender in contenders.values():
                contender.close()


def _one_run(contenders: dict[str, Contender], seconds: float) -> dict[str, Load]:
    """One run: the contenders take turns for ``seconds`` each in all, the order rotating every turn."""
    names = list(contenders)
    turns = max(1, round(seconds / TURN_SECONDS))
    run = {name: Load() for name in names}
    for turn in range(turns):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            run[name].add(contenders[name].window(TURN_WARMUP, seconds / turns))
    return run


def single(contender: Contender, seconds: float, runs: int = 1) -> Load:
    """``runs`` windows of ``seconds`` each, added up (an open loop keeps its schedule through a window)."""
    try:
        total = Load()
        for _ in range(runs):
            total.add(contender.window(WARMUP, seconds))
        total.p50_ms, total.p99_ms = contender.finish()
        return total
    finally:
        contender.close()


def drive(spec: dict[str, Any], seconds: float, daemon: Daemon | None = None, runs: int = 1) -> Load:
    """``bench.load`` with ``spec`` for ``runs`` windows of ``seconds``."""
    return single(LoadProcess(spec, daemon), seconds, runs)


def in_threads(threads: int, seconds: float, setup: Callable[[], Work]) -> Load:
    """A closed loop on ``threads`` threads of this process for one window of ``seconds``."""
    return single(InProcess(threads, setup), seconds)
