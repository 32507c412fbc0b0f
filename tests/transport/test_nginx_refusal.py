"""nginx in front of a bank refuses our client certificate with an HTTP 400 page, not a TLS alert: the CLI says
what the page says (its title) and names the client certificate, at discovery and at registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as config_module
from agent.errors import ExitStatus
from agent.runtime import Runtime
from agent.transport.errors import CLIENT_CERTIFICATE_REFUSED, answer_summary, refusal_hint
from tests.transport.conftest import TestCa, client_identity
from tests.transport.nginx import free_port, needs_nginx, running_nginx

pytestmark = needs_nginx
TPP_AGENT = str(Path(sys.executable).parent / "tpp-agent")


@pytest.fixture(scope="module")
def front_end(bank_ca: TestCa, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx that asks for a client certificate and lets the application decide (optional_no_ca, as in front of
    a bank): /strict/ refuses an untrusted one with its 400 page; /open/ serves discovery to anyone but refuses
    registration."""
    root = tmp_path_factory.mktemp("nginx-refusal")
    cert, key = bank_ca.server_identity(root)
    port = free_port()
    base = f"https://localhost:{port}"
    document = json.dumps({"issuer": base, "registration_endpoint": f"{base}/open/tpp-registration"})
    refuse = "if ($ssl_client_verify != SUCCESS) { return 495; }"
    servers = f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_client_certificate {bank_ca.pem_path}; ssl_verify_client optional_no_ca;
        location /strict/ {{ {refuse} default_type application/json; return 200 '{document}'; }}
        location = /open/.well-known/openid-configuration {{ default_type application/json; return 200 '{document}'; }}
        location /open/ {{ {refuse} return 204; }}
    }}
"""
    with running_nginx(root, servers, port, worker_connections=16):
        yield base


def cli_config(tmp_path: Path, softhsm_state: Path, base: str, ca: TestCa, key: str) -> dict[str, str]:
    pins = softhsm_state / "softhsm"
    banks = "".join(f'[banks.{name}]\ndiscovery_url = "{base}/{name}/.well-known/openid-configuration"\n'
                    f'issuer = "{base}"\nca_bundle = "{ca.pem_path}"\nclient_key = "{key}"\n'
                    for name in ("strict", "open"))
    path = tmp_path / "config.toml"
    path.write_text(f'[state]\ndir = "{tmp_path}"\n[pkcs11]\nmodule = "{config_module.default_module()}"\n'
                    f'token = "tpp-agent"\npin_file = "{pins / "user.pin"}"\n'
                    f'[pkcs11.environment]\nSOFTHSM2_CONF = "{pins / "softhsm2.conf"}"\n{banks}')
    return {**os.environ, "TPP_AGENT_CONFIG": str(path)}


def test_a_front_end_refusing_the_client_certificate_is_named(shared_runtime: Runtime, softhsm_state: Path,
                                                              bank_ca: TestCa, rogue_ca: TestCa, front_end: str,
                                                              tmp_path: Path) -> None:
    env = cli_config(tmp_path, softhsm_state, front_end, bank_ca, client_identity(shared_runtime, rogue_ca))
    for argv in (["discover", "strict"], ["register", "open"]):
        result = subprocess.run([TPP_AGENT, "--direct", *argv], capture_output=True, text=True, env=env,
                                timeout=120, check=False)
        assert result.returncode == ExitStatus.PROTOCOL, result.stderr
        [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        [hint] = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
        assert "HTTP 400: 400 The SSL certificate error" in error and "<html>" not in error, error
        assert hint.startswith(f"hint: {CLIENT_CERTIFICATE_REFUSED}"), hint
        assert "discovery_url" not in hint and "subject" not in hint


def test_answer_summary_reads_json_html_and_text() -> None:
    assert answer_summary(b'{"errorCode": "invalid_client", "errorMessage": "no"}') == "invalid_client \u2014 no"
    page = b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n<body>...</body>"
    assert answer_summary(page) == "400 No required SSL certificate was sent"
    assert refusal_hint(400, page) == CLIENT_CERTIFICATE_REFUSED
    assert refusal_hint(400, b"<title>400 Bad Request</title>") is None  # a plain 400 stays the bank's
    assert refusal_hint(502, page) is None
    assert answer_summary(b"\n  plain words\nmore") == "plain words"
    assert answer_summary(b"<title>A &amp; B\n  C</title>") == "A & B C"
