"""A daemon on a token of its own (own SoftHSM2 directory) with a transport key whose certificate
comes from a model bank's CA: the set-up for faults that must not touch the session's token.

Everything on the token is made with the operator's commands (``tpp-agent keys generate``,
``csr``, ``cert import``) in child processes, so this pytest process never loads the token
and moving its directory away affects the daemon alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from modelbank import ModelBank
from tests.conftest import REPO
from tests.daemon.conftest import TPP_AGENT, Daemon, launch

BANK = "mb"
TOKEN = "tpp-agent"


@dataclass
class IsolatedTpp:
    state: Path
    config: Path

    @property
    def tokens(self) -> Path:
        return self.state / "softhsm" / "tokens"

    def cli(self, *args: str) -> str:
        env = {**os.environ, "TPP_AGENT_CONFIG": str(self.config)}
        env.pop("SOFTHSM2_CONF", None)  # the config names this token's own directory
        result = subprocess.run([TPP_AGENT, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        if result.returncode != 0:
            raise AssertionError(f"tpp-agent {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout


def isolated_tpp(state: Path, bank: ModelBank) -> IsolatedTpp:
    """A token with an RSA transport key and a signing key, the transport certificate from ``bank``'s CA."""
    subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(state),
                    "--label", TOKEN], check=True, capture_output=True, timeout=60)
    softhsm = state / "softhsm"
    config = state / "config.toml"
    config.write_text(textwrap.dedent(f"""\
        [state]
        dir = "{state}"

        [pkcs11]
        token = "{TOKEN}"
        pin_file = "{softhsm / "user.pin"}"

        [pkcs11.environment]
        SOFTHSM2_CONF = "{softhsm / "softhsm2.conf"}"
        """))
    tpp = IsolatedTpp(state, config)
    tpp.cli("keys", "generate", "--label", "transport", "--type", "rsa:2048")
    tpp.cli("keys", "generate", "--label", "signing", "--type", "ec:p256")
    csr = state / "transport.csr"
    tpp.cli("csr", "--key", f"pkcs11:token={TOKEN};object=transport;type=private",
            "--subject", "CN=6f1c3c2e-2a53-4f0e-9a7b-2d4c1b0e9f11,OU=org-0001,O=Test TPP,C=AE", "--out", str(csr))
    cert = state / "transport.pem"
    cert.write_bytes(bank.ca.issue_from_csr(csr.read_bytes()))
    tpp.cli("cert", "import", "--key", f"pkcs11:token={TOKEN};object=transport;type=private", str(cert))
    return tpp


def daemon_on(tpp: IsolatedTpp, bank: ModelBank, public_dir: Path, extra: str = "") -> Daemon:
    """``tpp-agent serve`` for ``tpp`` with ``bank`` configured; root may do everything."""
    tpp.config.write_text(tpp.config.read_text() + textwrap.dedent(f"""
        [keys.transport]
        uri = "pkcs11:token={TOKEN};object=transport;type=private"
        algorithms = ["PS256"]

        [keys.signing]
        uri = "pkcs11:token={TOKEN};object=signing;type=private"
        algorithms = ["ES256"]
        raw_sign = true

        [banks.{BANK}]
        discovery_url = "{bank.discovery_url}"
        issuer = "{bank.issuer}"
        ca_bundle = "{bank.ca_bundle}"
        client_key = "transport"
        read_timeout = 5
        connect_timeout = 5

        [daemon]
        socket = "{public_dir}/run/agent.sock"
        socket_group = "nogroup"
        audit_file = "{tpp.state}/audit.jsonl"
        health_interval = 0.3

        [policy]
        admin_users = ["root"]
        """) + extra)
    return launch(tpp.config, public_dir)
