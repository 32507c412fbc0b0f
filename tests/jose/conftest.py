"""One token with signing keys for the JOSE tests, made once per module.

Keys: ``signing`` (RSA 2048, with a certificate from a throw-away test CA, as the directory would issue it),
``bare`` (RSA 2048, no certificate), ``es`` (EC P-256), ``es384`` (EC P-384). Tests that need another key
policy build a :class:`Config` with :func:`config_for` and pass it with the same ``KeyStore``: one runtime (one
login) per token at a time, because closing a session pool logs the whole application out.
"""

from __future__ import annotations

import datetime
import itertools
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import config as config_module
from agent.config import Config
from agent.runtime import Runtime
from pkcs11_backends.certificates import store_certificate
from pkcs11_backends.keys import KeySpec, KeyStore
from pkcs11_backends.module import Module
from pkcs11_backends.provisioning import init_token
from tests.conftest import Token

CLIENT_ID = "2f6c6a7e-3f0e-4c4e-9a57-6d2b0d8a11c1"
_labels = itertools.count()

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass
class JoseToken:
    token: Token
    runtime: Runtime

    @property
    def store(self) -> KeyStore:
        return self.runtime.keys

    @property
    def config(self) -> Config:
        return self.runtime.config

    def public_key(self, name: str) -> PublicKey:
        """The public key as read from the token, for the independent verifier."""
        key = serialization.load_der_public_key(self.store.public_key_info(name).dump())
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return key

    def pyjwt_jwk(self, name: str) -> dict[str, Any]:
        """The public JWK as PyJWT writes it, from the key read from the token."""
        key = self.public_key(name)
        if isinstance(key, rsa.RSAPublicKey):
            return jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
        return jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)

    def certificate_der(self, name: str) -> bytes:
        cert = self.store.info(name).certificate
        assert cert is not None
        return cert.der


def key_tables(token_label: str, extra: str = "") -> str:
    """``[keys.*]`` for the four test keys; ``extra`` is appended (more tables, or [jose]…)."""
    tables = "".join(f'[keys.{name}]\nuri = "pkcs11:token={token_label};object={name};type=private"\n'
                     for name in ("signing", "bare", "es", "es384"))
    return tables + extra


def config_for(jt: JoseToken, keys_toml: str) -> Config:
    """A config for the same token with other ``[keys]``/``[jose]`` tables."""
    base = jt.token.config_path.read_text().split("[keys.", 1)[0]
    return config_module.parse(tomllib.loads(base + keys_toml), jt.token.config_path)


def issue_certificate(public_key: PublicKey, common_name: str) -> bytes:
    """A signing certificate from a throw-away CA (its key is test data, made in memory and dropped)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "JOSE test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "AE"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def jose_token(softhsm_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JoseToken]:
    state = softhsm_state
    label = f"jose{next(_labels)}-{os.getpid()}"
    pins = state / "softhsm"
    init_token(Module.load(config_module.default_module()), label,
               (pins / "so.pin").read_bytes().strip(), (pins / "user.pin").read_bytes().strip())
    token = Token(state, label, tmp_path_factory.mktemp("jose") / "config.toml")
    token.write_config(key_tables(label))
    runtime = Runtime(token.config())
    jt = JoseToken(token, runtime)
    store = runtime.keys
    for name, spec in (("signing", "rsa:2048"), ("bare", "rsa:2048"), ("es", "ec:p256"), ("es384", "ec:p384")):
        store.generate(name, KeySpec.parse(spec))
    der = issue_certificate(jt.public_key("signing"), CLIENT_ID)
    with runtime.pool.session() as pooled:
        store_certificate(pooled.session, der, "signing", store.info("signing").id)
    yield jt
    runtime.close()
