"""A model bank per test, a transport key on the session's token with a certificate from the
bank's CA, and a configuration naming both (state dir: the test's own).

Keys live on the session's first token (``shared_runtime``): libp11's engine only sees
tokens that existed when it loaded its first key.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent import audit, jose, sections
from agent import config as config_module
from agent.audit import AuditTrail
from agent.config import Config
from agent.openfinance.service import OpenFinance
from agent.operations.core import Core
from agent.runtime import Runtime
from agent.x509.certificates import import_certificate
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank import ModelBank, TestCA
from pkcs11_backends.keys import KeyInfo, KeySpec

BANK = "mb"


class BankSite(Protocol):
    """What a TPP's configuration and certificates need of a bank: the model bank, or another authorization
    server (tests/interop) whose TLS and directory certificates come from a :class:`TestCA`."""

    @property
    def issuer(self) -> str: ...

    @property
    def discovery_url(self) -> str: ...

    @property
    def ca_bundle(self) -> Path: ...

    @property
    def ca(self) -> TestCA: ...


@dataclasses.dataclass
class Tpp:
    runtime: Runtime
    key_uri: str
    subject: str
    state_dir: Path
    softhsm_state: Path

    def config(self, bank: BankSite, **settings: object) -> Config:
        """The configuration a TPP would write for ``bank``; ``settings`` add to or override [banks.mb]."""
        table: dict[str, object] = {"discovery_url": bank.discovery_url, "issuer": bank.issuer,
                                    "ca_bundle": str(bank.ca_bundle), "client_key": self.key_uri, **settings}
        raw = {"state": {"dir": str(self.state_dir)}, "banks": {BANK: table}}
        return config_module.parse(raw, self.state_dir / "config.toml")

    def service(self, bank: ModelBank, **settings: object) -> OpenFinance:
        """The banks of :meth:`config` as the agent runs them: every signature and bank call audited."""
        config = self.config(bank, **settings)
        trail = AuditTrail(self.state_dir / "audit.jsonl")
        return Core(sections.parse(config.raw, config.path), self.runtime, lambda: trail).banks

    def write_config(self, bank: BankSite, database: str | None = None, **settings: object) -> Path:
        """The same as a TOML file, for the console script (token and PIN of the session's token);
        ``database``: ``[state] database``."""
        state = f'dir = "{self.state_dir}"' + (f'\ndatabase = "{database}"' if database else "")
        lines = [f'[state]\n{state}\n',
                 f'[pkcs11]\nmodule = "{config_module.default_module()}"\ntoken = "tpp-agent"',
                 f'pin_file = "{self.softhsm_state / "softhsm" / "user.pin"}"\n',
                 f'[pkcs11.environment]\nSOFTHSM2_CONF = "{self.softhsm_state / "softhsm" / "softhsm2.conf"}"\n',
                 f"[banks.{BANK}]"]
        table = {"discovery_url": bank.discovery_url, "issuer": bank.issuer, "ca_bundle": str(bank.ca_bundle),
                 "client_key": self.key_uri, **settings}
        for key, value in table.items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
        path = self.state_dir / "config.toml"
        path.write_text("\n".join(lines).replace("'", '"') + "\n")
        return path


@pytest.fixture
def bank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelBank]:
    with ModelBank(tmp_path_factory.mktemp("modelbank")) as running:
        yield running


def issue_identity(runtime: Runtime, bank: BankSite, *, expired: bool = False) -> tuple[str, str, bytes]:
    """A new RSA key on the token, its CSR in the directory's profile, a certificate from the bank's CA.

    Returns (key URI, subject, certificate PEM); the certificate is imported unless expired
    (import refuses expired certificates: tests hand those to the transport as a PEM file).
    """
    label = f"transport-{uuid.uuid4().hex[:10]}"
    info = runtime.keys.generate(label, KeySpec.parse("rsa:2048"))
    subject = directory_subject("Test TPP L.L.C.", "org-0001", str(uuid.uuid4()))
    csr = build_csr(runtime.keys, str(info.uri), subject)
    if expired:
        not_before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        pem = bank.ca.issue_from_csr(csr.pem.encode(), days=10, not_before=not_before)
    else:
        pem = bank.ca.issue_from_csr(csr.pem.encode())
        import_certificate(runtime.keys, str(info.uri), pem, "test")
    return str(info.uri), x509.load_pem_x509_certificate(pem).subject.rfc4514_string(), pem


@dataclasses.dataclass(frozen=True)
class SigningIdentity:
    client_id: str  # the transport certificate's CN
    key: KeyInfo

    def keys_toml(self, tpp: Tpp) -> str:
        """``[keys.transport]`` and ``[keys.signing]`` for a configuration."""
        return (f'[keys.transport]\nuri = "{tpp.key_uri}"\n'
                f'[keys.signing]\nuri = "{self.key.uri}"\nalgorithms = ["PS256"]\n\n')


def signing_identity(tpp: Tpp, bank: ModelBank) -> SigningIdentity:
    """A signing key for ``tpp``'s client assertions, its certificate in the directory's profile for the client id
    of the transport certificate, and the bank told its JWKS."""
    identity = signing_key(tpp, bank)
    keys = jose.jwks(tpp.runtime.keys, tpp.config(bank), [str(identity.key.uri)])
    bank.tokens.register_client(identity.client_id, keys)
    return identity


def signing_key(tpp: Tpp, bank: BankSite) -> SigningIdentity:
    """A signing key for ``tpp``'s client assertions and its certificate from the bank's CA, in the directory's
    profile for the client id of the transport certificate (no bank told of it)."""
    store = tpp.runtime.keys
    transport = store.info(tpp.key_uri).certificate
    assert transport is not None
    client_id = str(x509.load_der_x509_certificate(transport.der).subject
                    .get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    signing = store.generate(f"signing-{uuid.uuid4().hex[:10]}", KeySpec.parse("rsa:2048"))
    subject = directory_subject("Test TPP L.L.C.", "org-0001", client_id)
    pem = bank.ca.issue_from_csr(build_csr(store, str(signing.uri), subject).pem.encode())
    import_certificate(store, str(signing.uri), pem, "signing.pem")
    return SigningIdentity(client_id, signing)


@pytest.fixture
def tpp(shared_runtime: Runtime, bank: ModelBank, tmp_path: Path, softhsm_state: Path) -> Tpp:
    uri, subject, _ = issue_identity(shared_runtime, bank)
    state = tmp_path / "tpp-state"
    state.mkdir()
    return Tpp(shared_runtime, uri, subject, state, softhsm_state)


@pytest.fixture(autouse=True)
def _audited_caller() -> Iterator[None]:
    """Key uses in these tests are the test's, as the CLI's are the operator's (the audit trail needs a caller)."""
    with audit.on_behalf_of(os.getuid(), os.getpid(), "test", str(uuid.uuid4())):
        yield


@pytest.fixture
def service(tpp: Tpp, bank: ModelBank) -> Iterator[OpenFinance]:
    of = tpp.service(bank)
    yield of
    of.close()
