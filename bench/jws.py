"""JWS per second on a SoftHSM2 token: PS256 (RSA 2048) and ES256 (P-256), one and two threads.

    python -m bench.jws [--seconds 3]

Uses a throw-away token in a temporary state directory. ``resolved`` signs with a key resolved once
(what a daemon holding a key does); ``by name`` resolves the alias on every call (token lookups included);
``client assertion`` is the full claims + checks + signature path.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from agent import config as config_module
from agent.jose import client_assertion, resolve, sign_jws
from agent.runtime import Runtime
from pkcs11_backends.keys import KeySpec

REPO = Path(__file__).resolve().parent.parent


def rate(work: Callable[[], object], seconds: float, threads: int) -> float:
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(n: int) -> None:
        while time.monotonic() < deadline:
            work()
            counts[n] += 1

    pool = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    started = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(state),
                        "--label", "bench"], check=True, capture_output=True)
        raw = tomllib.loads(
            f'[state]\ndir = "{state}"\n[pkcs11]\ntoken = "bench"\n'
            f'[pkcs11.environment]\nSOFTHSM2_CONF = "{state}/softhsm/softhsm2.conf"\n'
            '[keys.ps]\nuri = "pkcs11:token=bench;object=ps;type=private"\n'
            '[keys.es]\nuri = "pkcs11:token=bench;object=es;type=private"\n')
        config = config_module.parse(raw, state / "config.toml")
        runtime = Runtime(config)
        store = runtime.keys
        store.generate("ps", KeySpec.parse("rsa:2048"))
        store.generate("es", KeySpec.parse("ec:p256"))
        payload = b'{"iss":"client","aud":"https://bank.example","iat":1700000000}'
        print(f"{'case':<34} {'1 thread':>10} {'2 threads':>10}")
        for name, alg in (("ps", "PS256"), ("es", "ES256")):
            key = resolve(store, config, name)
            cases: dict[str, Callable[[], object]] = {
                f"{alg} resolved": lambda key=key: sign_jws(store, config, key, payload),
                f"{alg} by name": lambda name=name: sign_jws(store, config, name, payload),
                f"{alg} client assertion": lambda key=key: client_assertion(
                    store, config, key, "client", "https://bank.example"),
            }
            for case, work in cases.items():
                one, two = rate(work, args.seconds, 1), rate(work, args.seconds, 2)
                print(f"{case:<34} {one:>8.0f}/s {two:>8.0f}/s", flush=True)
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
