"""A second, independent TLS stack: nginx from Debian with ``ssl_verify_client on`` and the FAPI suites."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.runtime import Runtime
from agent.transport import errors
from agent.transport.client import open_transport
from agent.transport.tls import FAPI_TLS12_CIPHERS
from tests.transport.conftest import TestCa, client_identity, settings_for
from tests.transport.nginx import free_port, needs_nginx, running_nginx

pytestmark = needs_nginx


class Nginx:
    def __init__(self, tls12_port: int, tls13_port: int, keep_alive_port: int) -> None:
        self.tls12_port = tls12_port
        self.tls13_port = tls13_port
        self.keep_alive_port = keep_alive_port  # keepalive_timeout 2s, announced as Keep-Alive: timeout=2


@pytest.fixture(scope="module")
def nginx(bank_ca: TestCa, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    root = tmp_path_factory.mktemp("nginx")
    cert, key = bank_ca.server_identity(root)
    ports = Nginx(free_port(), free_port(), free_port())
    tls = (f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_client_certificate {bank_ca.pem_path}; "
           "ssl_verify_client on;")
    reply = ('location / { default_type application/json; '
             'return 200 \'{"client":"$ssl_client_s_dn","protocol":"$ssl_protocol","cipher":"$ssl_cipher",'
             '"interaction_id":"$http_x_fapi_interaction_id","connection_requests":"$connection_requests"}\'; }')
    servers = f"""
    server {{
        listen 127.0.0.1:{ports.tls12_port} ssl;
        server_name localhost;
        ssl_protocols TLSv1.2;
        ssl_ciphers {":".join(FAPI_TLS12_CIPHERS)};
        {tls}
        {reply}
    }}
    server {{
        listen 127.0.0.1:{ports.tls13_port} ssl;
        server_name localhost;
        ssl_protocols TLSv1.3;
        {tls}
        {reply}
    }}
    server {{
        listen 127.0.0.1:{ports.keep_alive_port} ssl;
        server_name localhost;
        keepalive_timeout 2s 2s;
        {tls}
        {reply}
    }}
"""
    with running_nginx(root, servers, ports.tls13_port):
        yield ports


@pytest.mark.parametrize("spec", ["rsa:2048", "ec:p256"])
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_mtls_to_nginx(shared_runtime: Runtime, bank_ca: TestCa, nginx: Nginx, spec: str, version: str) -> None:
    key = client_identity(shared_runtime, bank_ca, spec)
    port = nginx.tls12_port if version == "TLSv1.2" else nginx.tls13_port
    with open_transport(shared_runtime, settings_for("nginx", bank_ca, key)) as transport:
        for _ in range(3):
            response = transport.get(f"https://localhost:{port}/")
        seen = response.json()
        assert response.status == 200 and seen["protocol"] == version
        assert seen["client"].startswith("CN=tpp transport-")
        assert seen["interaction_id"] == response.interaction_id
        assert seen["connection_requests"] == "3"  # keep-alive: one connection, one handshake
        assert transport.stats.full == 1
        if version == "TLSv1.2":
            assert seen["cipher"] in FAPI_TLS12_CIPHERS


def test_nginx_refuses_a_certificate_from_another_ca(shared_runtime: Runtime, bank_ca: TestCa, rogue_ca: TestCa,
                                                     nginx: Nginx) -> None:
    key = client_identity(shared_runtime, rogue_ca)
    with open_transport(shared_runtime, settings_for("nginx", bank_ca, key)) as transport:
        # nginx finishes the handshake and answers 400 "The SSL certificate error" (it does not send an alert).
        response = transport.get(f"https://localhost:{nginx.tls12_port}/")
    assert response.status == 400


def test_tls13_only_server_with_tls12_only_client(shared_runtime: Runtime, bank_ca: TestCa, nginx: Nginx) -> None:
    key = client_identity(shared_runtime, bank_ca)
    settings = settings_for("nginx", bank_ca, key, tls13=False)
    with open_transport(shared_runtime, settings) as transport, pytest.raises(errors.HandshakeFailedError):
        transport.get(f"https://localhost:{nginx.tls13_port}/")


def test_nginx_keep_alive_timeout_is_honoured(shared_runtime: Runtime, bank_ca: TestCa, nginx: Nginx) -> None:
    """nginx closes a connection idle for keepalive_timeout; the agent stops reusing it a margin before."""
    key = client_identity(shared_runtime, bank_ca)
    url = f"https://localhost:{nginx.keep_alive_port}/"
    with open_transport(shared_runtime, settings_for("nginx", bank_ca, key)) as transport:
        first = transport.get(url)
        assert first.headers["keep-alive"] == "timeout=2"
        time.sleep(0.3)
        assert transport.get(url).json()["connection_requests"] == "2"  # reused within the limit
        time.sleep(1.3)  # past 2 s less the margin, within nginx's 2 s: the bank might close it as we write
        assert transport.get(url).json()["connection_requests"] == "1"  # a new connection (before: the old one)
        assert transport.stats.total == 2
