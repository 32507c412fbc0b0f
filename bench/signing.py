"""Targets 1 and 4: signing over the socket against raw in-process token signing; start-up and footprint.

Baseline: python-pkcs11 in this process, one session per thread, ``min(clients, 8)`` threads. Agent:
``POST /v1/keys/{alias}/sign`` over the Unix socket from a separate load process (keep-alive, one connection per
client), audit trail on the same disk as the state, in two profiles (``PROFILES``): as installed, and as
config.example.toml suggests for throughput.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pkcs11
from pkcs11 import ObjectClass
from pkcs11.types import SignMixin

from agent import config as config_module
from agent.client import AgentClient
from agent.metrics.text import families
from agent.runtime import Runtime
from bench.common import (
    RATIO_NOTE,
    TURN_SECONDS,
    Check,
    Contender,
    Daemon,
    InProcess,
    LoadProcess,
    LoadProcesses,
    Measured,
    Outcome,
    Process,
    State,
    Table,
    compare_cells,
    daemon_table,
    drive,
    http_request,
    ratio_cell,
)
from pkcs11_backends.keys import KeySpec, SignatureScheme, sign_with
from tests.modules.p11kit import P11KitServer, p11kit_server

RAW_THREADS = 8  # the raw baseline signs on min(clients, 8) sessions/threads
P11KIT_CLIENTS = 8  # p11-kit remoting is measured up to this many clients (one process each)
CASES = (("rsa", "rsa:2048", "PS256", 0.75), ("ec", "ec:p256", "ES256", 0.30))
# A JWS signing input of the size a client assertion has.
SIGNING_INPUT = b"eyJhbGciOiJQUzI1NiIsImtpZCI6InNpZy0xIn0." + base64.urlsafe_b64encode(os.urandom(240))
# The agent as installed (every [daemon] setting at its default), and as config.example.toml suggests for
# throughput: one serving process per CPU, audit records written before each answer and synced every 20 ms, a log
# line only for failed requests (every key use is in the audit trail).
PROFILES = (("default", ""), ("throughput", 'processes = "auto"\naudit_sync = "interval"\nrequest_log = "failures"\n'))


def run(work: Path, seconds: float, clients: tuple[int, ...], repeat: int) -> Outcome:
    state = State.create(work / "signing", "bench")
    body = "".join(f'[keys.{alias}]\nuri = "pkcs11:token=bench;object={alias};type=private"\n'
                   f'algorithms = ["{alg}"]\nraw_sign = true\n' for alias, _, alg, _ in CASES)
    configs = {name: state.write_config(f"config-{name}.toml", body + daemon_table(
        state.dir / f"run-{name}" / "agent.sock", state.dir / "audit" / "audit.jsonl") + lines)
               for name, lines in PROFILES}
    runtime = Runtime(config_module.load(str(configs["default"])))
    for alias, spec, _, _ in CASES:
        runtime.keys.generate(alias, KeySpec.parse(spec))
    runtime.pool.start()
    outcome = Outcome()
    footprint = Table("Start-up and footprint (signing daemon: 2 keys, SoftHSM2)",
                      ["profile", "READY=1 after start (3 starts: min / median / max)", "RSS at rest",
                       "peak RSS under load", "all processes together (PSS) at rest"])
    footprint.notes.append("RSS: the largest process (with `processes` > 1 each serving process has its own "
                           "interpreter and token login); PSS counts the pages they share (forked from one "
                           "supervisor) once.")
    daemons: dict[str, Daemon] = {}
    try:
        for name, _ in PROFILES:
            ready_times, daemon = [], None
            for attempt in range(3):  # READY=1 timed from process start; the last one stays up for the load
                daemon = Daemon.start(configs[name], state.dir / f"run-{name}" / "agent.sock")
                ready_times.append(daemon.ready_seconds)
                if attempt < 2:
                    daemon.stop()
            assert daemon is not None
            daemons[name] = daemon
            time.sleep(0.5)
            rest_rss, _ = daemon.memory_mb()
            pss = daemon.pss_mb()
            ready_times.sort()
            footprint.rows.append([name, " / ".join(f"{t:.2f} s" for t in ready_times), f"{rest_rss:.1f} MB", "",
                                   f"{pss:.1f} MB"])
            outcome.data.setdefault("startup", {})[name] = {"ready_seconds": ready_times, "rss_rest_mb": rest_rss,
                                                            "pss_rest_mb": pss}
            outcome.checks += [Check(f"daemon READY=1, {name} (median of 3)", f"{ready_times[1]:.2f} s", "< 1 s",
                                     ready_times[1] < 1),
                               Check(f"daemon RSS at rest, {name}", f"{rest_rss:.0f} MB", "< 80 MB", rest_rss < 80)]
        with p11kit_server(config_module.default_module(), state.label, state.dir / "p11kit",
                           {"SOFTHSM2_CONF": str(state.softhsm_conf)}) as p11kit:
            _measure(outcome, daemons, runtime, seconds, clients, repeat, _P11Kit(p11kit, state))
        outcome.checks += [_scraped(name, daemon) for name, daemon in daemons.items()]
        for row, (name, _) in zip(footprint.rows, PROFILES, strict=True):
            _, peak = daemons[name].memory_mb()
            row[3] = f"{peak:.1f} MB"
            outcome.data["startup"][name]["rss_peak_mb"] = peak
            outcome.checks.append(Check(f"daemon peak RSS under signing load, {name}", f"{peak:.0f} MB", "< 80 MB",
                                        peak < 80))
    finally:
        for daemon in daemons.values():
            daemon.stop()
        runtime.close()
    outcome.tables.append(footprint)
    return outcome


def _scraped(profile: str, daemon: Daemon) -> Check:
    """The daemon's metrics after the loads, parsed by prometheus_client's own parser: the signatures counted
    (answered, and on the token) in every serving process."""
    client = AgentClient(daemon.socket_path, timeout=30)
    try:
        _, text = client.call("GET", "/v1/metrics")
    finally:
        client.close()
    found: dict[tuple[str, str], float] = {}
    for family in families(text.decode()):
        for sample in family.samples:
            key = sample.labels.get("operation", sample.labels.get("call", ""))
            if sample.labels.get("status", "200") == "200":
                found[(sample.name, key)] = found.get((sample.name, key), 0.0) + sample.value
    answered = found.get(("tpp_agent_requests_total", "sign"), 0.0)
    signed = found.get(("tpp_agent_hsm_call_duration_seconds_count", "sign"), 0.0)
    processes = int(found.get(("tpp_agent_serving_processes", ""), 0.0))
    return Check(f"metrics scraped after the loads, {profile}",
                 f"{answered:,.0f} signing requests answered, {signed:,.0f} signatures, {processes} process(es)",
                 "every signature counted", answered > 0 and signed >= answered and processes >= 1)


class _P11Kit:
    """p11-kit's server exporting the bench token, and the spec of one client process on p11-kit-client.so."""

    def __init__(self, server: P11KitServer, state: State) -> None:
        self.server = server
        self.state = state
        # The launcher's child: its CPU and that of each connection's p11-kit-remote are p11-kit's.
        self.cpu = Process(server._service.process.pid if server._service.process else 0)

    def load(self, clients: int, alias: str, alg: str) -> LoadProcesses:
        spec = {"mode": "pkcs11", "threads": 1, "module": self.server.module, "environment": self.server.environment,
                "token": self.state.label, "pin_file": str(self.state.dir / "softhsm" / "user.pin"), "key": alias,
                "alg": alg, "data_b64": base64.b64encode(SIGNING_INPUT).decode()}
        return LoadProcesses([spec] * clients, self.cpu)


def _measure(outcome: Outcome, daemons: dict[str, Daemon], runtime: Runtime, seconds: float,
             clients: tuple[int, ...], repeat: int, p11kit: _P11Kit) -> None:
    table = Table("Signing over the socket vs raw python-pkcs11 in-process",
                  ["alg", "clients", "raw sig/s", "raw p50 ms", "default: sig/s", "ratio", "p99 ms", "CPU µs/req",
                   "throughput: sig/s", "ratio", "p50 ms", "p99 ms", "CPU µs/req", "agent's own CPU µs/req"])
    table.notes.append("Endpoint: `POST /v1/keys/{alias}/sign`: the client sends a JWS signing input and gets the "
                       "raw signature, audited like every key use (`/jws` does the same token work and also "
                       "builds the JWS).")
    table.notes.append(f"Raw: python-pkcs11 in the bench process on min(clients, {RAW_THREADS}) sessions/threads, "
                       "key found once, nothing audited.")
    table.notes.append(f"Each cell: {repeat} runs of {seconds:g} s per load, raw and both agents taking turns "
                       f"in windows of {TURN_SECONDS:g} s (so that all meet the same drift of the machine's speed), "
                       f"added up; {RATIO_NOTE}. Every run is in results.json.")
    table.notes.append("default: `tpp-agent serve` with every [daemon] setting at its default (`processes` = "
                       "\"auto\": one serving process per CPU, workers = 1 each while requests compute; each audit "
                       "record fdatasync'ed on ext4 before the answer, one sync shared by what is in flight; a log "
                       "line per request). throughput: the same processes (set explicitly) and "
                       "`audit_sync = \"interval\"` (each record written before the answer, fdatasync'ed every "
                       "20 ms) and `request_log = \"failures\"` (a log line only for 4xx/5xx answers). The targets "
                       "are checked on the throughput profile; both are reported.")
    table.notes.append("CPU µs/req: all the daemon's processes, per request. Agent's own CPU = that minus the raw "
                       "in-process CPU time per signature at the same concurrency (both include SoftHSM2's signing).")
    sessions: list[pkcs11.Session] = []
    peaks: dict[str, float] = {}
    cells: dict[tuple[str, int], dict[str, Contender]] = {}
    for alias, _, alg, _ in CASES:
        scheme = SignatureScheme.from_jose(alg)
        request = base64.b64encode(http_request("POST", f"/v1/keys/{alias}/sign", {
            "alg": alg, "data_b64": base64.b64encode(SIGNING_INPUT).decode()})).decode()

        def raw_worker(alias: str = alias, scheme: SignatureScheme = scheme) -> Callable[[], object]:
            session = runtime.pool.token.open()
            sessions.append(session)
            key = cast(SignMixin, session.get_key(ObjectClass.PRIVATE_KEY, label=alias))
            return lambda: sign_with(key, SIGNING_INPUT, scheme)

        for n in clients:
            contenders: dict[str, Contender] = {"raw": InProcess(min(n, RAW_THREADS), raw_worker)}
            cells[alg, n] = contenders
            for name, _ in PROFILES:
                daemon = daemons[name]
                contenders[name] = LoadProcess({"mode": "unix", "socket": str(daemon.socket_path), "threads": n,
                                                "request_b64": request}, daemon)
            if n <= P11KIT_CLIENTS:
                contenders["p11kit"] = p11kit.load(n, alias, alg)
    results = compare_cells(cells, seconds, repeat)  # every cell's loads are up: the runs go round the table
    for _, _, alg, bound in CASES:
        ratios: dict[str, list[float]] = {name: [] for name, _ in PROFILES}
        for n in clients:
            measured = results[alg, n]
            raw = measured["raw"]
            raw_cpu = raw.total.cpu_us_per_request
            row = [alg, str(n), f"{raw.total.rate:,.0f}", f"{raw.total.p50_ms:.2f}"]
            record: dict[str, object] = {"alg": alg, "clients": n, "raw_rate": raw.total.rate, "raw_cpu_us": raw_cpu,
                                         "raw_rates": [r.rate for r in raw.runs]}
            for name, _ in PROFILES:
                load = measured[name].total
                ratio = measured[name].ratio(raw)
                ratios[name].append(ratio)
                shown = ratio_cell(ratio, measured[name].ratios(raw))
                if name == "default":
                    row += [f"{load.rate:,.0f}", shown, f"{load.p99_ms:.2f}", f"{load.cpu_us_per_request:,.0f}"]
                else:
                    peaks[alg] = max(peaks.get(alg, 0.0), load.rate)
                    row += [f"{load.rate:,.0f}", shown, f"{load.p50_ms:.2f}", f"{load.p99_ms:.2f}",
                            f"{load.cpu_us_per_request:,.0f}", f"{load.cpu_us_per_request - raw_cpu:,.0f}"]
                record[name] = {"rate": load.rate, "ratio": ratio, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
                                "cpu_us_per_request": load.cpu_us_per_request,
                                "rates": [r.rate for r in measured[name].runs],
                                "ratios": measured[name].ratios(raw)}
            table.rows.append(row)
            outcome.data.setdefault("signing", []).append(record)
        worst = min(ratios["throughput"])
        outcome.checks.append(Check(f"{alg} over the socket / raw, worst of {len(clients)} concurrencies "
                                    "(throughput profile)", f"{worst:.0%}", f"≥ {bound:.0%}", worst >= bound))
        outcome.checks.append(Check(f"{alg} over the socket / raw, worst (default profile)",
                                    f"{min(ratios['default']):.0%}", "report", True))
    outcome.tables.append(table)
    _against_p11kit(outcome, results, clients)

    throughput = daemons["throughput"]
    half = Table("Open loop at half the peak rate (throughput profile, 8 connections, latency from when each "
                 "request was due)", ["alg", "peak sig/s", "offered sig/s", "achieved sig/s", "p50 ms", "p99 ms"])
    half.notes.append(f"Each row: {repeat} windows of {seconds:g} s, their latencies together.")
    for alias, _, alg, _ in CASES:
        request = base64.b64encode(http_request("POST", f"/v1/keys/{alias}/sign", {
            "alg": alg, "data_b64": base64.b64encode(SIGNING_INPUT).decode()})).decode()
        offered = peaks[alg] / 2
        opened = drive({"mode": "unix", "socket": str(throughput.socket_path), "threads": 8, "rate": offered,
                        "request_b64": request}, seconds, throughput, repeat)
        half.rows.append([alg, f"{peaks[alg]:,.0f}", f"{offered:,.0f}", f"{opened.rate:,.0f}",
                          f"{opened.p50_ms:.2f}", f"{opened.p99_ms:.2f}"])
        outcome.data.setdefault("half_peak", []).append({"alg": alg, "offered": offered, "p50_ms": opened.p50_ms,
                                                         "p99_ms": opened.p99_ms})
        outcome.checks.append(Check(f"{alg} p99 at half the peak rate", f"{opened.p99_ms:.2f} ms", "< 5 ms",
                                    opened.p99_ms < 5))
    outcome.tables.append(half)

    for session in sessions:
        session.close()


def _against_p11kit(outcome: Outcome, results: dict[tuple[str, int], dict[str, Measured]],
                    clients: tuple[int, ...]) -> None:
    """The agent next to p11-kit remoting, the tool a user would pick instead, from the same runs."""
    table = Table("Signing through the agent vs p11-kit remoting (same token and keys, taking turns)",
                  ["alg", "clients", "p11-kit sig/s", "p50 ms", "CPU µs/sig", "default: sig/s", "ratio",
                   "CPU µs/sig", "throughput: sig/s", "ratio", "p50 ms", "CPU µs/sig", "raw CPU µs/sig"])
    table.notes.append("p11-kit: `p11-kit server` exporting the token over a Unix socket (a `p11-kit-remote` "
                       "process per connection, each with its own SoftHSM2), one client process per client on "
                       "`p11-kit-client.so` with its own session; three RPC round trips per signature "
                       "(C_SignInit, C_Sign for the length, C_Sign); no policy, no audit. PS256 is "
                       "CKM_RSA_PKCS_PSS over a SHA-256 taken in the client: p11-kit 0.24's RPC cannot carry "
                       "CKM_SHA256_RSA_PKCS_PSS's parameters. p50: the slowest client's.")
    table.notes.append("Agent: the same loads as in the table above (`POST /v1/keys/{alias}/sign`, policy, audit "
                       "record, JSON), in the same runs. CPU µs/sig: every process of the contender, server and "
                       f"clients (the agent's load generator included). {RATIO_NOTE}.")
    for _, _, alg, _ in CASES:
        worst = float("inf")
        for n in clients:
            if n > P11KIT_CLIENTS:
                continue
            measured = results[alg, n]
            p11kit = measured["p11kit"]
            row = [alg, str(n), f"{p11kit.total.rate:,.0f}", f"{p11kit.total.p50_ms:.2f}",
                   f"{p11kit.total.all_cpu_us_per_request:,.0f}"]
            record: dict[str, object] = {"alg": alg, "clients": n, "p11kit_rate": p11kit.total.rate,
                                         "p11kit_rates": [r.rate for r in p11kit.runs],
                                         "p11kit_cpu_us": p11kit.total.all_cpu_us_per_request,
                                         "raw_cpu_us": measured["raw"].total.all_cpu_us_per_request}
            for name, _ in PROFILES:
                agent = measured[name]
                ratio = agent.ratio(p11kit)
                shown = ratio_cell(ratio, agent.ratios(p11kit))
                row += [f"{agent.total.rate:,.0f}", shown]
                if name == "throughput":
                    worst = min(worst, ratio)
                    row.append(f"{agent.total.p50_ms:.2f}")
                row.append(f"{agent.total.all_cpu_us_per_request:,.0f}")
                record[name] = {"ratio": ratio, "ratios": agent.ratios(p11kit),
                                "cpu_us": agent.total.all_cpu_us_per_request}
            row.append(f"{measured['raw'].total.all_cpu_us_per_request:,.0f}")
            table.rows.append(row)
            outcome.data.setdefault("p11kit", []).append(record)
        if worst < float("inf"):
            outcome.checks.append(Check(f"{alg} through the agent / p11-kit remoting, worst of 1 to "
                                        f"{P11KIT_CLIENTS} clients (throughput profile)", f"{worst:.0%}", "≥ 100%",
                                        worst >= 1))
    outcome.tables.append(table)
