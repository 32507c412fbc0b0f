"""8 threads making CSRs and signing at once on one token: no crash, every signature verifies.

The issue asks for 30 s; ``make test`` runs 10 s to keep the suite short. Set
``TPP_AGENT_STRESS_SECONDS=30`` for the full run.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from cryptography import x509

from agent.runtime import Runtime
from agent.x509.csr import build_csr
from agent.x509.signatures import CsrAlgorithm
from agent.x509.subject import directory_subject
from pkcs11_backends.keys import KeySpec, SignatureScheme
from tests.test_keys import public_key, verify
from tests.x509_helpers import ARABIC_NAME, ORG_ID, openssl_verify_csr

DURATION = float(os.environ.get("TPP_AGENT_STRESS_SECONDS", "10"))
THREADS = 8


@pytest.mark.slow
def test_eight_threads_make_csrs_and_sign_concurrently(runtime: Runtime) -> None:
    keys = {spec: str(runtime.keys.generate(spec, KeySpec.parse(spec)).uri) for spec in ("rsa:2048", "ec:p256",
                                                                                           "ec:p384")}
    csr_work = [(keys["rsa:2048"], None), (keys["rsa:2048"], CsrAlgorithm.RSA_PSS), (keys["ec:p256"], None),
                (keys["ec:p384"], None)]
    sign_work = [(keys["rsa:2048"], SignatureScheme.RSA_PSS_SHA256),
                 (keys["rsa:2048"], SignatureScheme.RSA_PKCS1_SHA256),
                 (keys["ec:p256"], SignatureScheme.ECDSA_SHA256), (keys["ec:p384"], SignatureScheme.ECDSA_SHA384)]
    publics = {uri: public_key(runtime, uri) for uri in keys.values()}
    failures: list[BaseException] = []
    csrs = [0] * THREADS
    signatures = [0] * THREADS
    last_pem: list[str] = [""] * THREADS
    deadline = time.monotonic() + DURATION

    def make_csrs(n: int) -> None:
        key, alg = csr_work[n // 2]
        while time.monotonic() < deadline:
            client_id = f"00000000-0000-4000-8000-{n:04d}{csrs[n]:08d}"
            signed = build_csr(runtime.keys, key, directory_subject(ARABIC_NAME, ORG_ID, client_id), alg)
            loaded = x509.load_der_x509_csr(signed.der)
            assert loaded.is_signature_valid
            assert loaded.subject.rfc4514_string().startswith(f"CN={client_id},")
            last_pem[n] = signed.pem
            csrs[n] += 1

    def sign(n: int) -> None:
        key, scheme = sign_work[n // 2]
        while time.monotonic() < deadline:
            data = f"thread {n} message {signatures[n]}".encode()
            verify(publics[key], runtime.keys.sign(key, data, scheme), data, scheme)
            signatures[n] += 1

    def run(n: int) -> None:
        try:
            (make_csrs if n % 2 == 0 else sign)(n)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,), name=f"stress-{n}") for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DURATION + 120)
    assert not failures, failures[:3]
    assert all(c > 0 for c in csrs[0::2]) and all(s > 0 for s in signatures[1::2])
    for pem in last_pem[0::2]:
        assert openssl_verify_csr(pem).returncode == 0
    print(f"\n{THREADS} threads, {DURATION:.0f}s: {sum(csrs)} CSRs and {sum(signatures)} signatures, all verified")
