"""The fault-injection module's delay mode (a network HSM): calls take longer, and sessions wait side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from agent import config as config_module
from tests.conftest import Token

SIGN_DELAY = 0.3  # s: long beside what a signature or a thread's start takes on a busy machine
OTHER_DELAY = 0.1
SESSIONS = 4

# In a child process: the shim reads its environment once, when the module is loaded.
PROGRAM = textwrap.dedent(f"""
    import json, sys, threading, time
    from pkcs11 import KeyType, Mechanism, ObjectClass
    from pkcs11_backends.module import Module
    # Threads on one module: initialised with CKF_OS_LOCKING_OK (python-pkcs11's own C_Initialize tells
    # SoftHSM2 there is one thread, and four signing at once then hang or crash it).
    token = Module.load(sys.argv[1]).lib.get_token(token_label=sys.argv[2])
    with open(sys.argv[3]) as pin_file:
        pin = pin_file.read().strip()
    started = time.monotonic()
    first = token.open(rw=True, user_pin=pin)
    opened = time.monotonic() - started
    first.generate_keypair(KeyType.RSA, 2048, store=False, label="k")
    ready = threading.Barrier({SESSIONS})
    spans = []
    def sign():  # each on its own session: PKCS#11 runs one operation at a time per session
        session = token.open()
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="k")
        ready.wait()
        began = time.monotonic()
        key.sign(b"x" * 32, mechanism=Mechanism.SHA256_RSA_PKCS)
        spans.append((began, time.monotonic()))
    threads = [threading.Thread(target=sign) for _ in range({SESSIONS})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    signed = [end - began for began, end in spans]
    together = max(end for _, end in spans) - min(began for began, _ in spans)
    print(json.dumps({{"opened": opened, "signed": signed, "all": together}}))
""")


def test_delay_mode_adds_the_round_trip_and_calls_overlap(shim_library: Path, token: Token) -> None:
    env = {**os.environ, "SOFTHSM2_CONF": str(token.softhsm_conf), "TPP_SHIM_TARGET": config_module.default_module(),
           "TPP_SHIM_DELAY_US": str(int(SIGN_DELAY * 1e6)), "TPP_SHIM_DELAY_OTHER_US": str(int(OTHER_DELAY * 1e6))}
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(shim_library), token.label, str(token.user_pin_file)],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    measured = json.loads(done.stdout)
    assert measured["opened"] >= 2 * OTHER_DELAY  # C_OpenSession, then C_Login: round trips too
    assert len(measured["signed"]) == SESSIONS
    assert min(measured["signed"]) >= SIGN_DELAY + OTHER_DELAY  # C_SignInit, then C_Sign with the buffer
    # The sleeps hold no lock: four in a row would take at least four times as long as one.
    assert measured["all"] < SESSIONS * (SIGN_DELAY + OTHER_DELAY)
