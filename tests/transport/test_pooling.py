"""Keep-alive pooling and session resumption: a token signature is not paid per request."""

from __future__ import annotations

import io
import json
import ssl
import uuid
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import log
from agent.runtime import Runtime
from agent.transport.client import open_transport
from tests.transport.conftest import TestCa, client_identity, server_context, settings_for


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_hundred_requests_cost_one_handshake_signature(shared_runtime: Runtime, bank_ca: TestCa, pki_dir: Path,
                                                       serve: Any, version: ssl.TLSVersion) -> None:
    key = client_identity(shared_runtime, bank_ca, "ec:p256")
    server = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path, max_version=version))
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, key)) as transport:
        ids = {transport.get(f"https://localhost:{server.port}/r{i}").json()["interaction_id"] for i in range(100)}
        # Each full handshake is one CertificateVerify signed by the token key; the server saw one.
        assert server.full_handshakes == 1 and server.resumed_handshakes == 0
        assert transport.stats.full == 1
        assert len(ids) == 100 and all(uuid.UUID(i).version == 4 for i in ids)

        # A new connection (the pool was emptied) resumes the TLS session: still no new signature.
        transport.close()
        assert transport.get(f"https://localhost:{server.port}/again").status == 200
        assert server.full_handshakes == 1 and server.resumed_handshakes == 1
        assert transport.stats.resumed == 1


def test_each_request_is_logged_once_without_secrets(shared_runtime: Runtime, bank_ca: TestCa, pki_dir: Path,
                                                     serve: Any) -> None:
    key = client_identity(shared_runtime, bank_ca)
    server = serve(server_context(*bank_ca.server_identity(pki_dir), bank_ca.pem_path))
    url = f"https://localhost:{server.port}/register"
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, key)) as transport, capture_logs() as logs:
        response = transport.post(url, json={"secret": "s3cr3t"}, interaction_id="caller-iid",
                                  headers={"Authorization": "Bearer t0ken"})
    assert response.json()["interaction_id"] == "caller-iid"
    assert response.json()["received"] == '{"secret":"s3cr3t"}'
    requests = [entry for entry in logs if entry["event"] == "http.request"]
    assert len(requests) == 1
    entry = requests[0]
    assert entry["method"] == "POST" and entry["url"] == url and entry["status"] == 200
    assert entry["interaction_id"] == "caller-iid" and entry["duration_ms"] > 0
    assert "s3cr3t" not in repr(logs) and "t0ken" not in repr(logs)


def test_json_log_lines_redact_secret_keys() -> None:
    out = io.StringIO()
    log.configure("json", stream=out)
    try:
        log.get_logger("test").info("login", pin="123456", headers={"Authorization": "Bearer x", "Accept": "a"},
                                    client_assertion="eyJ...", status=200)
    finally:
        log.configure("console")
    line = json.loads(out.getvalue())
    assert line["pin"] == log.REDACTED and line["client_assertion"] == log.REDACTED
    assert line["headers"] == {"Authorization": log.REDACTED, "Accept": "a"}
    assert line["status"] == 200 and line["component"] == "test" and line["level"] == "info"
    assert "123456" not in out.getvalue()
