"""A network HSM: every signature waits out a round trip (issue 22). Do the default settings keep the token busy?

The daemons and the raw baseline load the fault-injection module (tests/faults/pkcs11_shim.c) in front of
SoftHSM2, in its delay mode: each ``C_Sign`` that makes a signature sleeps ``delay`` first, holding no lock, as a
call to a network HSM waits for its answer. The HSM gives this host :data:`HSM_SESSIONS` sessions: the default
profile has them all in its one process (``max_sessions`` = 8, the default); the throughput profile shares them
among its serving processes (``max_sessions`` = 8 / processes each: ``max_sessions * processes`` must fit what
the HSM allows). At most ``min(clients, sessions)`` signatures can be under way, each taking one signature's
latency (measured in the same run: one thread signing through the same module), so that many per latency is
the ideal; what each profile makes of it, with nothing set by hand for the latency, is the figure.
"""

from __future__ import annotations

import base64
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pkcs11
from pkcs11 import ObjectClass
from pkcs11.types import SignMixin

from agent import config as config_module
from agent.runtime import Runtime
from bench.common import (
    RATIO_NOTE,
    TURN_SECONDS,
    Check,
    Contender,
    Daemon,
    InProcess,
    LoadProcess,
    Outcome,
    State,
    Table,
    build_shim,
    compare_cells,
    daemon_table,
    http_request,
    in_threads,
    ratio_cell,
)
from bench.signing import CASES, PROFILES, SIGNING_INPUT
from pkcs11_backends.keys import KeySpec, SignatureScheme, sign_with

HSM_SESSIONS = 8  # the sessions the HSM gives this host
TARGET = 0.90  # of the ideal, at every concurrency and in both profiles
CHECKED = "ES256"  # PS256 is reported: on 2 CPUs its ideal needs more CPU than there is (see the table's note)


def run(work: Path, seconds: float, repeat: int, delay_us: int, clients: tuple[int, ...]) -> Outcome:
    state = State.create(work / "nethsm", "nethsm")
    shim = build_shim(work)
    # The shim reads these when it is loaded: in this process (the raw baseline) and in the daemons.
    shim_env = {"TPP_SHIM_TARGET": config_module.default_module(), "TPP_SHIM_DELAY_US": str(delay_us)}
    os.environ.update(shim_env)
    processes = len(os.sched_getaffinity(0))  # what processes = "auto" (both profiles) starts
    per_process = {name: max(1, HSM_SESSIONS // processes) for name, _ in PROFILES}
    in_all = {name: sessions * processes for name, sessions in per_process.items()}
    body = "".join(f'[keys.{alias}]\nuri = "pkcs11:token=nethsm;object={alias};type=private"\n'
                   f'algorithms = ["{alg}"]\nraw_sign = true\n' for alias, _, alg, _ in CASES)
    configs = {name: state.write_config(f"config-{name}.toml", body + daemon_table(
        state.dir / f"run-{name}" / "agent.sock", state.dir / f"audit-{name}" / "audit.jsonl") + lines,
                                        module=str(shim), pkcs11=f"max_sessions = {per_process[name]}\n")
               for name, lines in PROFILES}
    runtime = Runtime(config_module.load(str(configs["default"])))
    sessions: list[pkcs11.Session] = []
    try:
        for alias, spec, _, _ in CASES:
            runtime.keys.generate(alias, KeySpec.parse(spec))
        runtime.pool.start()
        daemons: dict[str, Daemon] = {}
        try:
            for name, _ in PROFILES:
                daemons[name] = Daemon.start(configs[name], state.dir / f"run-{name}" / "agent.sock", shim_env)
            return _measure(runtime, sessions, daemons, in_all, seconds, repeat, delay_us, clients)
        finally:
            for daemon in daemons.values():
                daemon.stop()
    finally:
        for session in sessions:
            session.close()
        runtime.close()


def _measure(runtime: Runtime, sessions: list[pkcs11.Session], daemons: dict[str, Daemon], in_all: dict[str, int],
             seconds: float, repeat: int, delay_us: int, clients: tuple[int, ...]) -> Outcome:
    outcome = Outcome()
    table = Table(f"A network HSM: {delay_us / 1000:g} ms added to every signature, {HSM_SESSIONS} sessions for "
                  "this host",
                  ["alg", "clients", "sessions", "latency ms", "ideal sig/s", "raw sig/s", "default: sig/s",
                   "of ideal", "p50 ms", "p99 ms", "throughput: sig/s", "of ideal", "p50 ms", "p99 ms"])
    table.notes.append(f"Module: tests/faults/pkcs11_shim.c in front of SoftHSM2, `TPP_SHIM_DELAY_US={delay_us}`: "
                       "each C_Sign that makes a signature sleeps that long first, holding no lock. Latency: one "
                       "signature through it, one thread alone (median of 50). Sessions: signatures under way at "
                       "most, min(clients, the HSM's sessions for this host); ideal = sessions / latency.")
    processes = len(os.sched_getaffinity(0))
    table.notes.append(f"The HSM's {HSM_SESSIONS} sessions: both profiles run {processes} serving process(es) "
                       f"(`processes` = \"auto\"), each with `max_sessions` = {in_all['default'] // processes}. "
                       "Nothing else is set for the latency: the workers follow how long requests "
                       "block (`[daemon] workers` = \"auto\"). Raw: python-pkcs11 in the bench process through the "
                       "same module on `sessions` threads, nothing audited.")
    table.notes.append(f"Each cell: {repeat} runs of {seconds:g} s per load, raw and both agents taking turns in "
                       f"windows of {TURN_SECONDS:g} s; rates: all runs together; of ideal: the median of the runs "
                       f"(lowest and highest run). Target: ≥ {TARGET:.0%} of the ideal for {CHECKED}. PS256 is "
                       "reported: its ideal (8 RSA-2048 signatures per ~2.7 ms) needs ~1.9 CPUs for SoftHSM2's RSA "
                       f"alone, more than this machine has beside the agent. {RATIO_NOTE}.")
    latency: dict[str, float] = {}
    cells: dict[tuple[str, int], dict[str, Contender]] = {}
    for alias, _, alg, _ in CASES:
        scheme = SignatureScheme.from_jose(alg)

        def worker(alias: str = alias, scheme: SignatureScheme = scheme) -> Callable[[], object]:
            session = runtime.pool.token.open()
            sessions.append(session)
            key = cast(SignMixin, session.get_key(ObjectClass.PRIVATE_KEY, label=alias))
            return lambda: sign_with(key, SIGNING_INPUT, scheme)

        alone = in_threads(1, max(0.5, 50 * (delay_us / 1e6 + 0.001)), worker)
        latency[alg] = alone.p50_ms / 1000
        request = base64.b64encode(http_request("POST", f"/v1/keys/{alias}/sign", {
            "alg": alg, "data_b64": base64.b64encode(SIGNING_INPUT).decode()})).decode()
        for n in clients:
            contenders: dict[str, Contender] = {"raw": InProcess(min(n, HSM_SESSIONS), worker)}
            for name, _ in PROFILES:
                contenders[name] = LoadProcess({"mode": "unix", "socket": str(daemons[name].socket_path),
                                                "threads": n, "request_b64": request}, daemons[name])
            cells[alg, n] = contenders
    results = compare_cells(cells, seconds, repeat)
    for _, _, alg, _ in CASES:
        for n in clients:
            measured = results[alg, n]
            under_way = min(n, HSM_SESSIONS)
            ideal = under_way / latency[alg]
            row = [alg, str(n), str(under_way), f"{latency[alg] * 1000:.2f}", f"{ideal:,.0f}",
                   f"{measured['raw'].total.rate:,.0f}"]
            record: dict[str, object] = {"alg": alg, "clients": n, "sessions": under_way, "latency_ms":
                                         latency[alg] * 1000, "ideal": ideal, "raw_rate": measured["raw"].total.rate}
            for name, _ in PROFILES:
                load = measured[name]
                of_ideal = [run.rate / ideal for run in load.runs]
                median = statistics.median(of_ideal)
                row += [f"{load.total.rate:,.0f}", ratio_cell(median, of_ideal), f"{load.total.p50_ms:.2f}",
                        f"{load.total.p99_ms:.2f}"]
                record[name] = {"rate": load.total.rate, "of_ideal": median, "runs_of_ideal": of_ideal,
                                "p50_ms": load.total.p50_ms, "p99_ms": load.total.p99_ms,
                                "cpu_us_per_request": load.total.cpu_us_per_request}
                if alg == CHECKED:
                    outcome.checks.append(Check(f"network HSM ({delay_us / 1000:g} ms), {alg} at {n} clients, {name} "
                                                "profile / sessions ÷ latency", f"{median:.0%}", f"≥ {TARGET:.0%}",
                                                median >= TARGET))
            table.rows.append(row)
            outcome.data.setdefault("network_hsm", []).append(record)
    outcome.tables.append(table)
    return outcome
