"""Signs in a loop from 4 threads and records what callers see; run by test_recovery.py.

    python recovery_worker.py STATE_DIR SECONDS

Prints one JSON object: per outcome counts, the error messages seen, the pool
states seen, and the number of recoveries.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from agent.config import parse
from agent.runtime import Runtime
from pkcs11_backends.errors import TokenUnavailableError
from pkcs11_backends.keys import KeySpec, SignatureScheme


def main() -> None:
    state, seconds = Path(sys.argv[1]), float(sys.argv[2])
    runtime = Runtime(parse({"state": {"dir": str(state)}}))
    uri = str(runtime.keys.generate("recovery", KeySpec.parse("ec:p256")).uri)
    outcomes: Counter[str] = Counter()
    messages: set[str] = set()
    states: set[str] = set()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    print("ready", flush=True)

    def work() -> None:
        while time.monotonic() < deadline:
            try:
                runtime.keys.sign(uri, b"payload", SignatureScheme.ECDSA_SHA256)
                outcome = "ok"
            except TokenUnavailableError as exc:
                outcome = "unavailable"
                with lock:
                    messages.add(str(exc)[:120])
                time.sleep(0.01)
            except Exception as exc:  # anything else is a bug the test must see
                outcome = f"unexpected:{type(exc).__name__}:{exc}"
            with lock:
                outcomes[outcome] += 1
                states.add(runtime.pool.health.state.value)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = runtime.keys.sign(uri, b"final", SignatureScheme.ECDSA_SHA256)
    print(json.dumps({"outcomes": outcomes, "messages": sorted(messages), "states": sorted(states),
                      "recoveries": runtime.pool.health.recoveries, "final_ok": len(last) == 64,
                      "final_state": runtime.pool.health.state.value}), flush=True)


if __name__ == "__main__":
    main()
