"""The model bank in its own process, and two client identities its CA issued: one on the token, one in memory.

The in-memory key is the *baseline's* test data (a plain client's key file); the agent's key stays on the token.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.runtime import Runtime
from agent.x509.certificates import import_certificate
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from bench.common import REPO
from modelbank.ca import TestCA
from pkcs11_backends.keys import KeySpec

DISCOVERY_PATH = "/.well-known/openid-configuration"


@dataclasses.dataclass
class Bank:
    proc: subprocess.Popen[str]
    state_dir: Path
    url: str
    discovery_url: str
    ca_bundle: Path

    @classmethod
    def start(cls, state_dir: Path) -> Bank:
        proc = subprocess.Popen([sys.executable, "-m", "modelbank", "serve", "--state-dir", str(state_dir)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        fields: dict[str, str] = {}
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            key, _, value = line.partition(": ")
            fields[key] = value.strip()
        return cls(proc, state_dir, fields["url"], fields["discovery_url"], Path(fields["ca_bundle"]))

    @property
    def ca(self) -> TestCA:
        return TestCA(self.state_dir / "ca")

    def token_identity(self, runtime: Runtime) -> str:
        """An RSA-2048 key on the token with the bank CA's certificate imported next to it; its URI."""
        info = runtime.keys.generate(f"transport-{uuid.uuid4().hex[:8]}", KeySpec.parse("rsa:2048"))
        subject = directory_subject("Bench TPP L.L.C.", "org-bench", str(uuid.uuid4()))
        csr = build_csr(runtime.keys, str(info.uri), subject)
        import_certificate(runtime.keys, str(info.uri), self.ca.issue_from_csr(csr.pem.encode()), "bench")
        return str(info.uri)

    def memory_identity(self, directory: Path) -> tuple[rsa.RSAPrivateKey, Path, Path]:
        """An RSA-2048 key in memory (also as a PEM file, for urllib3) and its certificate: (key, cert, key file)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "AE"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench TPP L.L.C."),
                          x509.NameAttribute(NameOID.COMMON_NAME, str(uuid.uuid4()))])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        cert_path, key_path = directory / "memory-client.pem", directory / "memory-client.key"
        cert_path.write_bytes(self.ca.issue_from_csr(csr.public_bytes(serialization.Encoding.PEM)))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return key, cert_path, key_path

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
