"""Signatures per second: in-process KeyStore vs the daemon's socket, 1 and 8 clients; READY time; RSS.

    .venv/bin/python -m bench.daemon_sign [--seconds 3]

Creates its own SoftHSM2 token in a temp dir (RSA-2048, PS256). Numbers go to docs/performance.md by hand.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rate(work: Callable[[], None], threads: int, seconds: float) -> float:
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(n: int) -> None:
        while time.monotonic() < deadline:
            work()
            counts[n] += 1

    pool = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--audit-dir", help="where the audit trail goes (its fsync per signature is the cost)")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="tpp-bench-"))
    subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(state),
                    "--label", "bench"], check=True, capture_output=True)
    os.environ["SOFTHSM2_CONF"] = str(state / "softhsm" / "softhsm2.conf")
    from agent import config as config_module
    from agent.client import AgentClient
    from agent.runtime import Runtime
    from pkcs11_backends.keys import KeySpec, SignatureScheme

    config_path = state / "config.toml"
    config_path.write_text(
        f'[state]\ndir = "{state}"\n[pkcs11]\ntoken = "bench"\npin_file = "{state}/softhsm/user.pin"\n'
        f'[pkcs11.environment]\nSOFTHSM2_CONF = "{state}/softhsm/softhsm2.conf"\n'
        f'[keys.signing]\nuri = "pkcs11:token=bench;object=signing;type=private"\nalgorithms = ["PS256"]\n'
        f'[daemon]\nsocket = "{state}/run/agent.sock"\naudit_file = "{args.audit_dir or state}/audit.jsonl"\n'
        f'workers = 8\nlog_level = "warning"\n[policy]\nadmin_users = [{os.getuid()}]\n')
    runtime = Runtime(config_module.load(str(config_path)))
    runtime.keys.generate("signing", KeySpec.parse("rsa:2048"))
    data = b"x" * 200
    for threads in (1, 8):
        per_s = rate(lambda: runtime.keys.sign("signing", data, SignatureScheme.RSA_PSS_SHA256), threads,
                     args.seconds)
        print(f"in-process  {threads} thread(s): {per_s:8.0f} signatures/s")
    runtime.close()

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(state / "notify.sock"))
    started = time.monotonic()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tpp-agent"), "--config", str(config_path), "serve"],
                            env={**os.environ, "NOTIFY_SOCKET": str(state / "notify.sock")})
    while b"READY=1" not in notify.recv(4096):
        pass
    print(f"daemon READY after {time.monotonic() - started:.2f}s (process start to READY=1)")
    client = AgentClient(state / "run" / "agent.sock")  # one keep-alive connection per thread

    def over_socket() -> None:
        client.sign("signing", data, "PS256")

    for threads in (1, 8):
        print(f"over socket {threads} client(s): {rate(over_socket, threads, args.seconds):8.0f} signatures/s")
    rss = next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    print(f"daemon {rss.replace('	', ' ')}")
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


if __name__ == "__main__":
    main()
