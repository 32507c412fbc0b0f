"""Access tokens and JWS over the daemon's socket, against the model bank on 127.0.0.1.

    .venv/bin/python -m bench.daemon_tokens [--seconds 3] [--fresh 20]

Own SoftHSM2 token and model bank in a temp dir; transport and signing keys (RSA-2048) with certificates from the
bank's CA. Reports: a cached token's round trip over the socket, a fresh one's (``refresh``: client assertion
signed on the token + audit fsync + POST /token over pooled mTLS), and JWS per second from one client.
Numbers go to docs/performance.md by hand.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import in_threads

REPO = Path(__file__).resolve().parent.parent
CLIENT_ID = "3f3c2c52-8a43-4f5e-9d0b-6b1a2c3d4e5f"


def timed_ms(work: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--fresh", type=int, default=20, help="fresh tokens to time")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="tpp-bench-"))
    subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(state),
                    "--label", "bench"], check=True, capture_output=True)
    os.environ["SOFTHSM2_CONF"] = str(state / "softhsm" / "softhsm2.conf")
    from agent import config as config_module
    from agent import jose
    from agent.client import AgentClient
    from agent.runtime import Runtime
    from agent.x509.certificates import import_certificate
    from agent.x509.csr import build_csr
    from agent.x509.subject import directory_subject
    from modelbank import ModelBank
    from pkcs11_backends.keys import KeySpec

    with ModelBank(state / "bank") as bank:
        config_path = state / "config.toml"
        config_path.write_text(
            f'[state]\ndir = "{state}"\n[pkcs11]\ntoken = "bench"\npin_file = "{state}/softhsm/user.pin"\n'
            f'[pkcs11.environment]\nSOFTHSM2_CONF = "{state}/softhsm/softhsm2.conf"\n'
            '[keys.transport]\nuri = "pkcs11:token=bench;object=transport;type=private"\n'
            '[keys.signing]\nuri = "pkcs11:token=bench;object=signing;type=private"\nalgorithms = ["PS256"]\n'
            f'[banks.mb]\ndiscovery_url = "{bank.discovery_url}"\nissuer = "{bank.issuer}"\n'
            f'ca_bundle = "{bank.ca_bundle}"\nclient_key = "transport"\n'
            f'[daemon]\nsocket = "{state}/run/agent.sock"\naudit_file = "{state}/audit.jsonl"\n'
            f'log_level = "warning"\n[policy]\nadmin_users = [{os.getuid()}]\n')
        runtime = Runtime(config_module.load(str(config_path)))
        subject = directory_subject("Bench TPP", "org-1", CLIENT_ID)
        for key in ("transport", "signing"):
            runtime.keys.generate(key, KeySpec.parse("rsa:2048"))
            import_certificate(runtime.keys, key, bank.ca.issue_from_csr(
                build_csr(runtime.keys, key, subject).pem.encode()), f"{key}.pem")
        bank.tokens.register_client(CLIENT_ID, jose.jwks(runtime.keys, runtime.config, ["signing"]))
        runtime.close()

        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(state / "notify.sock"))
        proc = subprocess.Popen([str(Path(sys.executable).parent / "tpp-agent"), "--config", str(config_path),
                                 "serve"], env={**os.environ, "NOTIFY_SOCKET": str(state / "notify.sock")})
        while b"READY=1" not in notify.recv(4096):
            pass
        try:
            client = AgentClient(state / "run" / "agent.sock")
            client.register("mb")
            first = timed_ms(lambda: client.token("mb", "accounts"), 1)[0]
            print(f"first token (discovery fetch, mTLS handshake, assertion, POST /token): {first:6.1f} ms")
            fresh = timed_ms(lambda: client.token("mb", "accounts", refresh=True), args.fresh)
            print(f"fresh token over the socket: median {statistics.median(fresh):6.1f} ms, "
                  f"max {max(fresh):6.1f} ms ({args.fresh} tokens)")
            cached = timed_ms(lambda: client.token("mb", "accounts"), 500)
            print(f"cached token over the socket: median {statistics.median(cached):6.2f} ms")
            payload = b'{"amount":"10.00"}'
            def jws() -> None:
                client.jws("signing", payload, "PS256")

            per_s = in_threads(1, args.seconds, lambda: jws).rate
            print(f"JWS PS256 over the socket, 1 client: {per_s:6.0f}/s")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
