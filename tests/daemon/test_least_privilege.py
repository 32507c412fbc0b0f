"""Least privilege: the shipped unit's sandbox, and a local user with socket access but no policy
entry, who gets 403 from every endpoint and learns nothing from the two open ones."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.daemon.conftest import NOBODY, Daemon
from tests.daemon.test_policy import SIGN, as_user

UNIT = REPO / "packaging" / "systemd" / "tpp-agent.service"
STRANGER = 4242  # a uid in the socket's group (nogroup) that no [policy] rule names

GUARDED = [
    ("GET", "/v1/keys", ""),
    ("GET", "/v1/keys/signing/public", ""),
    ("POST", "/v1/keys/signing/sign", SIGN),
    ("POST", "/v1/keys/ecsign/sign", json.dumps({"alg": "ES256", "data_b64": "aGk="})),
    ("POST", "/v1/keys/signing/csr", json.dumps({"subject": "CN=x,OU=y,O=z,C=AE"})),
    ("GET", "/v1/banks/mb/discovery", ""),
    ("POST", "/v1/banks/mb/registration", "{}"),
    ("POST", "/v1/banks/mb/forward", json.dumps({"method": "GET", "path": "/"})),
]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_shipped_unit_scores_ok_in_systemd_analyze_security(tmp_path: Path) -> None:
    # --offline reads the unit file itself; exposure must stay at or below 2.0 ("OK").
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager",
                             str(UNIT)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for tpp-agent.service" in result.stdout


def test_unit_runs_as_its_own_user_without_capabilities() -> None:
    directives = [line.strip() for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")]
    for expected in ("User=tpp-agent", "NoNewPrivileges=yes", "CapabilityBoundingSet=", "AmbientCapabilities=",
                     "ProtectSystem=strict", "ProtectHome=yes", "PrivateDevices=yes", "RestartPreventExitStatus=78",
                     "LoadCredential=tpp-agent-pin:/etc/tpp-agent/user.pin", "UMask=0077"):
        assert expected in directives, expected
    assert not any(d.startswith(("Environment=", "PassEnvironment=")) and "PIN" in d.upper() for d in directives)


def test_stranger_gets_403_everywhere_and_no_secret_anywhere(daemon: Daemon) -> None:
    pin = Path(daemon.config_path.read_text().split('pin_file = "')[1].split('"')[0]).read_text().strip()
    for method, path, body in GUARDED:
        answer = as_user(daemon, STRANGER, NOBODY, method, path, body)
        error = json.loads(str(answer["body"]))
        assert answer["status"] == 403 and error["code"] == "forbidden", (method, path, answer)
        assert "may not" in error["message"] and "names this user" in error["message"]
    # The two open endpoints: liveness and readiness, nothing about keys' contents, PINs or other callers.
    for path in ("/v1/health", "/v1/ready"):
        answer = as_user(daemon, STRANGER, NOBODY, "GET", path)
        assert answer["status"] == 200
        text = str(answer["body"])
        assert pin not in text and "PRIVATE KEY" not in text and "interaction" not in text
    # Another caller's request (root signs) leaves no trace a stranger can read over the socket.
    daemon.client().sign("signing", b"root's secret payload", "PS256")
    for path in ("/v1/health", "/v1/ready", "/v1/audit", "/v1/requests"):
        text = str(as_user(daemon, STRANGER, NOBODY, "GET", path)["body"])
        assert "secret payload" not in text and "cm9vdCdz" not in text
