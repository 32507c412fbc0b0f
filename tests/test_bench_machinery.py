"""The benchmarks' own machinery on real modules: p11-kit clients as a load, the network-HSM benchmark end to end.

No figure is checked here (that is the benchmark's job): only that each piece measures what it says.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as config_module
from agent.runtime import Runtime
from bench.common import LoadProcesses, Process
from pkcs11_backends.keys import KeySpec
from tests.conftest import Token
from tests.modules.p11kit import p11kit_server

REPO = Path(__file__).resolve().parent.parent


def test_p11kit_clients_sign_through_the_server_one_process_each(token: Token, runtime: Runtime,
                                                                 tmp_path: Path) -> None:
    runtime.keys.generate("ec", KeySpec.parse("ec:p256"))
    runtime.keys.generate("rsa", KeySpec.parse("rsa:2048"))
    with p11kit_server(config_module.default_module(), token.label, tmp_path / "p11kit",
                       {"SOFTHSM2_CONF": str(token.softhsm_conf)}) as server:
        assert server._service.process is not None
        for alias, alg in (("ec", "ES256"), ("rsa", "PS256")):
            spec = {"mode": "pkcs11", "threads": 1, "module": server.module, "environment": server.environment,
                    "token": token.label, "pin_file": str(token.user_pin_file), "key": alias, "alg": alg,
                    "data_b64": base64.b64encode(b"header.payload").decode()}
            load = LoadProcesses([spec, spec], Process(server._service.process.pid))
            try:
                # Long enough for the clock ticks /proc counts CPU in (10 ms) to see the remotes' work.
                window = load.window(0.05, 1.0)
                p50, p99 = load.finish()
            finally:
                load.close()
            assert window.count > 0  # both clients signed; an error in either raises
            assert window.cpu_seconds > 0  # p11-kit's server and its remotes did the token work
            assert 0 < p50 <= p99


def test_the_network_hsm_benchmark_reports_the_ideal_and_both_profiles(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "network-hsm", "--seconds", "0.25",
                           "--repeat", "1", "--hsm-delay-us", "1000", "--hsm-clients", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: a target missed on a busy machine
    assert (out / "results.json").exists(), done.stderr[-3000:]  # else the benchmark itself failed
    results = json.loads((out / "results.json").read_text())["results"]["network-hsm"]
    rows = results["data"]["network_hsm"]
    assert {(row["alg"], row["clients"]) for row in rows} == {("PS256", 2), ("ES256", 2)}
    for row in rows:
        assert row["sessions"] == 2  # min(clients, the HSM's sessions)
        assert row["latency_ms"] >= 1.0  # the shim's delay is in every signature
        assert row["ideal"] == pytest.approx(row["sessions"] / (row["latency_ms"] / 1000))
        for profile in ("default", "throughput"):
            assert row[profile]["rate"] > 0
            assert len(row[profile]["runs_of_ideal"]) == 1
    assert [c["name"] for c in results["checks"]] == [
        "network HSM (1 ms), ES256 at 2 clients, default profile / sessions ÷ latency",
        "network HSM (1 ms), ES256 at 2 clients, throughput profile / sessions ÷ latency"]
    assert "A network HSM: 1 ms added to every signature" in (out / "results.md").read_text()
