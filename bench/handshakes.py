"""Target 3: full mTLS handshakes per second, the token key (libp11) against the same client with a key in memory.

Each handshake is a fresh ``BankTransport`` (new pool, empty session cache) doing one GET against the model bank
(its own process). With ``--profile``, py-spy samples this process (native frames included) during the token
loop and the samples are summed by where they were: SoftHSM2, libp11, OpenSSL, Python.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from agent import config as config_module
from agent import log
from agent.compat import pyopenssl_certificate, pyopenssl_private_key
from agent.runtime import Runtime
from agent.transport.client import BankTransport
from agent.transport.tls import TlsContext, TlsSettings, build_context
from bench.bank import DISCOVERY_PATH, Bank
from bench.common import Check, Outcome, State, Table
from pkcs11_backends.openssl import installed_backends


def rate(seconds: float, step: Callable[[], object]) -> tuple[float, float]:
    """(operations/s, CPU ms of this process per operation)."""
    count, start, cpu = 0, time.monotonic(), time.process_time()
    while time.monotonic() - start < seconds:
        step()
        count += 1
    return count / (time.monotonic() - start), (time.process_time() - cpu) / count * 1000


def run(work: Path, seconds: float, profile: bool) -> Outcome:
    log.configure("console", level="warning")
    bank = Bank.start(work / "bank-hs")
    state = State.create(work / "handshakes", "hs")
    runtime = Runtime(config_module.load(str(state.write_config("config.toml", ""))))
    settings = TlsSettings("mb", bank.ca_bundle, client_key=bank.token_identity(runtime))
    on_token = {backend: build_context(runtime, settings, backend) for backend in installed_backends()}
    memory_key, cert_path, _ = bank.memory_identity(work)
    in_memory = build_context(runtime, settings)  # same policy, then a software key and its certificate
    in_memory.context.use_certificate(pyopenssl_certificate(x509.load_pem_x509_certificate(cert_path.read_bytes())))
    in_memory.context.use_privatekey(pyopenssl_private_key(memory_key))
    url = bank.url + DISCOVERY_PATH

    def handshake(tls: TlsContext) -> Callable[[], object]:
        def once() -> None:
            with BankTransport(settings, tls) as transport:
                transport.get(url)
                assert transport.stats.full == 1
        return once

    token_rates = {backend: rate(seconds, handshake(tls)) for backend, tls in on_token.items()}
    memory_rate, memory_cpu = rate(seconds, handshake(in_memory))
    outcome = Outcome()
    table = Table("Full mTLS handshakes (TLS 1.3, RSA-2048 client key, fresh pool each)",
                  ["client key", "handshakes/s", "ratio to in-memory", "client CPU ms/handshake"])
    for backend, (token_rate, token_cpu) in token_rates.items():
        ratio = token_rate / memory_rate
        table.rows.append([f"token ({backend})", f"{token_rate:,.0f}", f"{ratio:.0%}", f"{token_cpu:.2f}"])
        outcome.data.setdefault("handshakes", []).append({"backend": backend, "token": token_rate,
                                                          "memory": memory_rate, "ratio": ratio})
        outcome.checks.append(Check(f"fresh handshakes/s, token key ({backend}) / in-memory key (reported)",
                                    f"{ratio:.0%}", "report", True))
    table.rows.append(["in memory", f"{memory_rate:,.0f}", "100%", f"{memory_cpu:.2f}"])
    table.notes.append("Client (this process) and the model bank (its own process) share the machine's cores.")
    outcome.tables.append(table)
    if profile:
        backend, tls = next(iter(on_token.items()))
        outcome.tables.append(_profile(work, seconds, handshake(tls), backend))
    runtime.close()
    bank.stop()
    return outcome


def _profile(work: Path, seconds: float, step: Callable[[], object], backend: str) -> Table:
    table = Table(f"Where a token-key handshake's time goes ({backend}; py-spy, native frames, client process)",
                  ["place", "share of samples"])
    spy = shutil.which("py-spy")
    if spy is None:
        table.notes.append("py-spy not on PATH: install it in a throw-away venv and put it on PATH to profile.")
        return table
    out = work / "handshakes.pyspy"
    proc = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--native", "--threads", "--idle",
                             "--format", "raw", "--rate", "250", "--duration", str(int(seconds) + 1),
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        step()
    proc.wait(60)
    shares: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue  # only the handshaking thread
        shares[_place(frames)] += int(count)
    total = sum(shares.values()) or 1
    table.rows += [[place, f"{n / total:.0%}"] for place, n in shares.most_common()]
    table.notes.append("Samples of the handshaking thread only; waiting in poll/recv is the bank's turn (the model "
                       "bank, a separate Python process, verifies our certificate and signs its own handshake).")
    return table


def _place(frames: list[str]) -> str:
    """The outermost library that explains a sample: the token's signature runs inside libssl and libp11."""
    stack = ";".join(frames)
    if "libsofthsm2" in stack:
        return "SoftHSM2 signing (C_Sign, its own OpenSSL RSA inside)"
    if "(pkcs11.so)" in stack or "libp11" in stack:
        return "libp11 engine / pkcs11-provider (PKCS#11 glue)"
    if any(mark in frames[-1] for mark in ("poll", "read", "recv", "select")):
        return "waiting for the bank (socket)"
    if "libssl" in stack or "libcrypto" in stack:
        return "OpenSSL (key exchange, X.509 verification, TLS records)"
    return "Python (urllib3, pyOpenSSL, agent transport)"
