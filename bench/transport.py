"""Quick transport figures: full mTLS handshakes/s (token key through each installed OpenSSL backend vs an
in-memory key), keep-alive requests/s.

    .venv/bin/python -m bench.transport [--seconds 3]

Client and server (Python ``ssl``, TLS 1.3) share this process and the machine's cores.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from agent import log
from agent.compat import pyopenssl_certificate, pyopenssl_private_key
from agent.runtime import Runtime
from agent.transport.client import BankTransport
from agent.transport.tls import TlsContext, TlsSettings, build_context
from pkcs11_backends.openssl import installed_backends
from tests.conftest import Token, _make_token
from tests.transport.conftest import TestCa, TlsHttpServer, client_identity, server_context


def rate(seconds: float, step: Callable[[], object]) -> float:
    count, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        step()
        count += 1
    return count / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    log.configure("console", level="warning")
    work = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    _make_token(work, "tpp-agent")
    token = Token(work, "tpp-agent", work / "config.toml")
    token.write_config()
    runtime = Runtime(token.config())
    ca = TestCa("bench", work)
    server = TlsHttpServer(server_context(*ca.server_identity(work), ca.pem_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://localhost:{server.port}/"
    settings = TlsSettings("bench", ca.pem_path, client_key=client_identity(runtime, ca, "rsa:2048"))
    on_token = {backend: build_context(runtime, settings, backend) for backend in installed_backends()}

    memory_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    in_memory = build_context(runtime, settings)  # same policy and certificate, then swap in a software key
    cert = ca.issue(memory_key.public_key(), "bench in-memory")
    in_memory.context.use_certificate(pyopenssl_certificate(cert))
    in_memory.context.use_privatekey(pyopenssl_private_key(memory_key))

    def handshake(tls: TlsContext) -> Callable[[], object]:
        return lambda: BankTransport(settings, tls).get(url)  # a fresh pool and session cache: a full handshake

    for backend, tls in on_token.items():
        print(f"full mTLS handshakes/s, TLS 1.3, RSA-2048, token key ({backend}): "
              f"{rate(args.seconds, handshake(tls)):.0f}")
    print(f"full mTLS handshakes/s, TLS 1.3, RSA-2048, in-memory key: {rate(args.seconds, handshake(in_memory)):.0f}")
    with BankTransport(settings, next(iter(on_token.values()))) as transport:
        requests = rate(args.seconds, lambda: transport.get(url))
        print(f"keep-alive requests/s on one connection (token key): {requests:.0f} "
              f"(full handshakes: {transport.stats.full})")
    server.shutdown()
    runtime.close()


if __name__ == "__main__":
    main()
