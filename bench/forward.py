"""Target 2: mTLS calls through the agent's forward endpoint against a plain urllib3 client with its key in memory.

Both send ``GET /.well-known/openid-configuration`` to the model bank (its own process) over keep-alive
connections. The daemon runs on the fault-injection PKCS#11 module (tests/faults/pkcs11_shim.c) in pass-through
mode, which counts every real ``C_Sign``: that is how the token signatures per 1,000 calls are counted.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from agent import config as config_module
from agent.runtime import Runtime
from bench.bank import DISCOVERY_PATH, Bank
from bench.common import REPO, Check, Daemon, Outcome, State, Table, drive, http_request
from bench.load import unix_sender

CLIENTS = (1, 4)  # the bank transport keeps at most 4 connections per bank (TlsSettings.max_connections)
CALLS = 1000


def build_shim(work: Path) -> Path:
    out = work / "pkcs11_shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-I/usr/include/p11-kit-1", "-o", str(out),
                    str(REPO / "tests" / "faults" / "pkcs11_shim.c"), "-ldl"], check=True, timeout=120)
    return out


def signs(stats: Path) -> int:
    if not stats.exists():
        return 0
    return int(dict(line.split("=") for line in stats.read_text().split()).get("signs", 0))


def run(work: Path, seconds: float) -> Outcome:
    with Bank.start(work / "bank") as bank:
        return _run(work, seconds, bank)


def _run(work: Path, seconds: float, bank: Bank) -> Outcome:
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
            f'ca_bundle = "{bank.ca_bundle}"\nclient_key = "{key_uri}"\n'
            f'[daemon]\nsocket = "{state.dir}/run/agent.sock"\naudit_file = "{state.dir}/audit/audit.jsonl"\n')
    config_path = state.write_config("config.toml", body, module=str(shim))
    shm = Path(tempfile.mkdtemp(prefix="tpp-bench-", dir="/dev/shm"))
    tmpfs_config = state.write_config("config-tmpfs.toml", body.replace(f"{state.dir}/audit", str(shm))
                                      .replace("/run/", "/run-tmpfs/"), module=str(shim))
    request = base64.b64encode(http_request("POST", "/v1/banks/mb/forward",
                                            {"method": "GET", "path": DISCOVERY_PATH})).decode()
    target = urlsplit(bank.url)
    outcome = Outcome()
    table = Table("mTLS calls to the model bank: through the agent vs plain urllib3 with the key in memory",
                  ["clients", "urllib3 req/s", "agent req/s", "ratio", "agent p50 ms", "agent p99 ms",
                   "urllib3 p50 ms", "daemon CPU µs/req", "token signatures", "audit on tmpfs: req/s", "ratio"])
    table.notes.append("Agent: `POST /v1/banks/mb/forward` over the Unix socket; the agent's urllib3 pool to the "
                       "bank keeps connections alive and resumes TLS sessions. Baseline: urllib3 "
                       "`HTTPSConnectionPool` with cert/key files (stdlib ssl), one pool per client thread. Every "
                       "forwarded call is audited (fdatasync'ed) before it is answered; 'audit on tmpfs' is the "
                       "same daemon with its audit file in /dev/shm.")
    ratios = []
    with (Daemon.start(config_path, state.dir / "run" / "agent.sock", shim_env) as daemon,
          Daemon.start(tmpfs_config, state.dir / "run-tmpfs" / "agent.sock", shim_env) as in_memory):
        for n in CLIENTS:
            base = drive({"mode": "https", "host": target.hostname, "port": target.port, "path": DISCOVERY_PATH,
                          "cert": str(cert_path), "key": str(key_path), "ca": str(bank.ca_bundle), "threads": n,
                          "seconds": seconds})
            before = signs(stats)
            agent = drive({"mode": "unix", "socket": str(daemon.socket_path), "threads": n, "seconds": seconds,
                           "request_b64": request}, daemon)
            used = signs(stats) - before
            fast = drive({"mode": "unix", "socket": str(in_memory.socket_path), "threads": n, "seconds": seconds,
                          "request_b64": request}, in_memory)
            ratio = agent.rate / base.rate
            ratios.append(ratio)
            table.rows.append([str(n), f"{base.rate:,.0f}", f"{agent.rate:,.0f}", f"{ratio:.0%}",
                               f"{agent.p50_ms:.2f}", f"{agent.p99_ms:.2f}", f"{base.p50_ms:.2f}",
                               f"{agent.cpu_seconds / max(1, agent.count) * 1e6:,.0f}", str(used),
                               f"{fast.rate:,.0f}", f"{fast.rate / base.rate:.0%}"])
            outcome.data.setdefault("forward", []).append({"clients": n, "urllib3_rate": base.rate,
                                                           "agent_rate": agent.rate, "ratio": ratio,
                                                           "tmpfs_audit_rate": fast.rate})
        _, peak_rss = daemon.memory_mb()
    shutil.rmtree(shm, ignore_errors=True)
    outcome.checks.append(Check("forward through the agent / urllib3 in memory, worst", f"{min(ratios):.0%}",
                                "≥ 50%", min(ratios) >= 0.5))

    # 1,000 calls on a freshly started agent: every token signature they cause is counted by the shim.
    with Daemon.start(config_path, state.dir / "run" / "agent.sock", shim_env) as daemon:
        before = signs(stats)
        send = unix_sender({"socket": str(daemon.socket_path), "request_b64": request})()
        started = time.monotonic()
        for _ in range(CALLS):
            send()
        elapsed = time.monotonic() - started
        used = signs(stats) - before
        peak_rss = max(peak_rss, daemon.memory_mb()[1])
    table.notes.append(f"{CALLS:,} sequential calls on a freshly started agent took {elapsed:.2f} s and "
                       f"{used} token signature(s) (real `C_Sign` calls counted by the PKCS#11 shim); "
                       f"the throughput rows' last column counts the same way.")
    table.notes.append(f"Forward daemon peak RSS (VmHWM): {peak_rss:.1f} MB.")
    outcome.tables.append(table)
    outcome.data["signatures_per_1000_calls"] = used
    outcome.data["forward_peak_rss_mb"] = peak_rss
    outcome.checks += [Check(f"token signatures for {CALLS:,} calls to one bank", str(used), "≤ 2", used <= 2),
                       Check("forward daemon peak RSS", f"{peak_rss:.0f} MB", "< 80 MB", peak_rss < 80)]
    return outcome
