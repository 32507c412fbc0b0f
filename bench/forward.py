"""Target 2: mTLS calls through the agent's forward endpoint against a plain urllib3 client with its key in memory.

Both send ``GET /.well-known/openid-configuration`` to the model bank (its own process) over keep-alive
connections. The daemon runs on the fault-injection PKCS#11 module (tests/faults/pkcs11_shim.c) in pass-through
mode, which counts every real ``C_Sign`` (all processes together): that is how the token signatures per
1,000 calls are counted. The agent runs in the two profiles of the signing benchmark.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from agent import config as config_module
from agent.runtime import Runtime
from bench.bank import DISCOVERY_PATH, Bank
from bench.common import (
    RATIO_NOTE,
    TURN_SECONDS,
    Check,
    Contender,
    Daemon,
    Load,
    LoadProcess,
    Outcome,
    State,
    Table,
    build_shim,
    compare_cells,
    daemon_table,
    http_request,
    ratio_cell,
)
from bench.load import answered
from bench.signing import PROFILES

CLIENTS = (1, 4)  # the bank transport keeps at most 4 connections per bank (TlsSettings.max_connections)
CALLS = 1000


def signs(stats: Path) -> int:
    """Token signatures so far, all processes together (the shim adds up into one file)."""
    if not stats.exists():
        return 0
    return int(dict(line.split("=") for line in stats.read_text().split()).get("signs", 0))


class Counted:
    """A contender whose windows also count what ``counter`` counts (token signatures)."""

    def __init__(self, contender: Contender, counter: Callable[[], int]) -> None:
        self._contender, self._counter = contender, counter
        self.counted = 0

    def window(self, warmup: float, seconds: float) -> Load:
        before = self._counter()
        load = self._contender.window(warmup, seconds)
        self.counted += self._counter() - before
        return load

    def finish(self) -> tuple[float, float]:
        return self._contender.finish()

    def close(self) -> None:
        self._contender.close()


def run(work: Path, seconds: float, repeat: int) -> Outcome:
    with Bank.start(work / "bank") as bank:
        return _run(work, seconds, repeat, bank)


def _run(work: Path, seconds: float, repeat: int, bank: Bank) -> Outcome:
    state = State.create(work / "forward", "fwd")
    shim = build_shim(work)
    stats = work / "shim.stats"
    shim_env = {"TPP_SHIM_TARGET": config_module.default_module(), "TPP_SHIM_CONTROL": str(work / "shim.control"),
                "TPP_SHIM_STATS": str(stats)}
    runtime = Runtime(config_module.load(str(state.write_config("setup.toml", ""))))
    key_uri = bank.token_identity(runtime)
    runtime.close()
    _, cert_path, key_path = bank.memory_identity(work)
    body = (f'[banks.mb]\nissuer = "{bank.url}"\ndiscovery_url = "{bank.discovery_url}"\n'
            f'ca_bundle = "{bank.ca_bundle}"\nclient_key = "{key_uri}"\n')
    configs = {name: state.write_config(f"config-{name}.toml", body + daemon_table(
        state.dir / f"run-{name}" / "agent.sock", state.dir / "audit" / "audit.jsonl") + lines,
                                        module=str(shim))
               for name, lines in PROFILES}
    request = base64.b64encode(http_request("POST", "/v1/banks/mb/forward",
                                            {"method": "GET", "path": DISCOVERY_PATH})).decode()
    target = urlsplit(bank.url)
    outcome = Outcome()
    table = Table("mTLS calls to the model bank: through the agent vs plain urllib3 with the key in memory",
                  ["clients", "urllib3 req/s", "urllib3 p50 ms", "default: req/s", "ratio", "p99 ms",
                   "throughput: req/s", "ratio", "p50 ms", "p99 ms", "CPU µs/req", "token signatures"])
    table.notes.append("Agent: `POST /v1/banks/mb/forward` over the Unix socket; the agent's urllib3 pool to the "
                       "bank keeps connections alive and resumes TLS sessions; every forwarded call is audited. "
                       "Baseline: urllib3 `HTTPSConnectionPool` with cert/key files (stdlib ssl), one pool per "
                       "client thread. Profiles as in the signing table; the target is checked on the throughput "
                       f"profile. Token signatures: the throughput profile's during its windows. Each cell: {repeat} "
                       f"runs of {seconds:g} s per load, the three taking turns in windows of {TURN_SECONDS:g} s, "
                       f"added up; {RATIO_NOTE}.")
    ratios: dict[str, list[float]] = {name: [] for name, _ in PROFILES}
    peak_rss = 0.0
    daemons = {name: Daemon.start(configs[name], state.dir / f"run-{name}" / "agent.sock", shim_env)
               for name, _ in PROFILES}
    try:
        cells: dict[int, dict[str, Contender]] = {}
        counted: dict[tuple[int, str], Counted] = {}
        for n in CLIENTS:
            cells[n] = {"urllib3": LoadProcess({"mode": "https", "host": target.hostname, "port": target.port,
                                                "path": DISCOVERY_PATH, "cert": str(cert_path), "key": str(key_path),
                                                "ca": str(bank.ca_bundle), "threads": n})}
            for name, _ in PROFILES:
                cells[n][name] = counted[n, name] = Counted(
                    LoadProcess({"mode": "unix", "socket": str(daemons[name].socket_path), "threads": n,
                                 "request_b64": request}, daemons[name]), lambda: signs(stats))
        results = compare_cells(cells, seconds, repeat)
        for n in CLIENTS:
            measured = results[n]
            base = measured["urllib3"]
            row = [str(n), f"{base.total.rate:,.0f}", f"{base.total.p50_ms:.2f}"]
            record: dict[str, object] = {"clients": n, "urllib3_rate": base.total.rate,
                                         "urllib3_rates": [r.rate for r in base.runs]}
            for name, _ in PROFILES:
                agent = measured[name].total
                ratio = measured[name].ratio(base)
                ratios[name].append(ratio)
                shown = ratio_cell(ratio, measured[name].ratios(base))
                if name == "default":
                    row += [f"{agent.rate:,.0f}", shown, f"{agent.p99_ms:.2f}"]
                else:
                    row += [f"{agent.rate:,.0f}", shown, f"{agent.p50_ms:.2f}", f"{agent.p99_ms:.2f}",
                            f"{agent.cpu_us_per_request:,.0f}", str(counted[n, name].counted)]
                record[name] = {"rate": agent.rate, "ratio": ratio, "p99_ms": agent.p99_ms,
                                "rates": [r.rate for r in measured[name].runs],
                                "ratios": measured[name].ratios(base)}
            table.rows.append(row)
            outcome.data.setdefault("forward", []).append(record)
        peak_rss = max(daemon.memory_mb()[1] for daemon in daemons.values())
    finally:
        for daemon in daemons.values():
            daemon.stop()
    outcome.checks.append(Check("forward through the agent / urllib3 in memory, worst (throughput profile)",
                                f"{min(ratios['throughput']):.0%}", "≥ 50%", min(ratios["throughput"]) >= 0.5))
    outcome.checks.append(Check("forward through the agent / urllib3 in memory, worst (default profile)",
                                f"{min(ratios['default']):.0%}", "report", True))

    # 1,000 calls on a freshly started agent: every token signature they cause is counted by the shim.
    with Daemon.start(configs["throughput"], state.dir / "run-throughput" / "agent.sock", shim_env) as daemon:
        before = signs(stats)
        started = time.monotonic()
        raw = base64.b64decode(request)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(daemon.socket_path))
            for _ in range(CALLS):
                sock.sendall(raw)
                buffer = bytearray()
                while not answered(buffer):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError("the agent closed the connection")
                    buffer += chunk
        elapsed = time.monotonic() - started
        used = signs(stats) - before
        peak_rss = max(peak_rss, daemon.memory_mb()[1])
    table.notes.append(f"{CALLS:,} sequential calls on a freshly started agent (throughput profile) took "
                       f"{elapsed:.2f} s and "
                       f"{used} token signature(s) (real `C_Sign` calls counted by the PKCS#11 shim); "
                       f"the throughput rows' last column counts the same way.")
    table.notes.append(f"Forward daemon peak RSS (VmHWM, largest process): {peak_rss:.1f} MB.")
    outcome.tables.append(table)
    outcome.data["signatures_per_1000_calls"] = used
    outcome.data["forward_peak_rss_mb"] = peak_rss
    outcome.checks += [Check(f"token signatures for {CALLS:,} calls to one bank", str(used), "≤ 2", used <= 2),
                       Check("forward daemon peak RSS", f"{peak_rss:.0f} MB", "< 80 MB", peak_rss < 80)]
    return outcome
