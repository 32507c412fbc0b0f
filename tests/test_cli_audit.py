"""Signing on the token from the CLI (no agent, or ``--direct``) leaves the same audit records as the agent."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import csr, pem

from agent.audit import KeyUse, anchor_on, own_trail
from agent.errors import ExitStatus
from agent.runtime import Runtime
from tests.conftest import Token

KEY = "pkcs11:object=transport"
SIGNER = f'[keys.signer]\nuri = "{KEY}"\n'  # JWS needs a configured key (with its purpose: jws by default)


@pytest.fixture
def audited_token(token: Token, tmp_path: Path) -> Token:
    token.write_config(f'[daemon]\naudit_file = "{tmp_path / "trail" / "audit.jsonl"}"\n{SIGNER}')
    token.cli("keys", "generate", "--label", "transport", "--type", "rsa:2048", check=True)
    token.cli("keys", "generate", "--label", "audit", "--type", "ec:p256", check=True)  # signs checkpoints
    return token


def records(tmp_path: Path) -> list[dict[str, Any]]:
    """The key uses in the trail (checkpoints left out)."""
    lines = (tmp_path / "trail" / "audit.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["operation"] != "checkpoint"]


def test_csr_and_direct_jws_are_audited_as_the_operator(audited_token: Token, tmp_path: Path) -> None:
    made = audited_token.cli("csr", "--key", KEY, "--subject", "CN=audited", check=True)
    signed = audited_token.cli("--direct", "sign-jws", "--key", KEY, "--alg", "PS256", "--payload", "-",
                               input='{"hello":"world"}', check=True)

    request = csr.CertificationRequest.load(pem.unarmor(made.stdout.encode())[2])
    jws = signed.stdout.strip()
    csr_record, jws_record = records(tmp_path)
    assert (csr_record["operation"], csr_record["algorithm"], csr_record["result"]) == ("csr", "RS256", "ok")
    assert csr_record["input_sha256"] == hashlib.sha256(request["certification_request_info"].dump()).hexdigest()
    # The record names the operation, as for the same JWS made through the agent.
    assert (jws_record["operation"], jws_record["algorithm"], jws_record["result"]) == ("jws", "PS256", "ok")
    assert jws_record["input_sha256"] == hashlib.sha256(jws.rsplit(".", 1)[0].encode()).hexdigest()
    assert base64.urlsafe_b64decode(jws.split(".")[1] + "==") == b'{"hello":"world"}'
    for record in (csr_record, jws_record):
        assert "object=transport" in record["key"]
        assert record["uid"] == os.getuid() and record["pid"] != os.getpid()
    assert csr_record["interaction_id"] != jws_record["interaction_id"]

    verified = audited_token.cli("audit", "verify", check=True)
    # Each command checkpointed the trail when it started signing and when it ended.
    assert "6 record(s), chain intact, checkpoints verified" in verified.stdout


def test_reading_keys_needs_no_trail_but_signing_refuses_without_one(token: Token, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    token.write_config(f'[daemon]\naudit_file = "{blocker / "audit.jsonl"}"\n{SIGNER}')
    token.cli("keys", "generate", "--label", "transport", "--type", "ec:secp256r1", check=True)
    token.cli("keys", "public", KEY, check=True)

    refused = token.cli("--direct", "sign-jws", "--key", KEY, "--payload", "-", input="{}")
    assert refused.returncode == ExitStatus.CANTCREAT and refused.stdout == ""
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    [hint] = [line for line in refused.stderr.splitlines() if line.startswith("hint: ")]
    assert f"cannot open the audit trail {blocker / 'audit.jsonl'}" in error and "nothing was signed" in error
    assert "[daemon] audit_file" in hint and "--direct" in hint


def test_verify_checks_every_serving_process_trail_and_names_the_damaged_one(audited_token: Token,
                                                                             tmp_path: Path) -> None:
    audited_token.cli("csr", "--key", KEY, "--subject", "CN=audited", check=True)  # the shared audit.jsonl
    runtime = Runtime(audited_token.config())
    try:
        trails = [own_trail(tmp_path / "trail" / "audit.jsonl") for _ in range(2)]  # as two serving processes
        for n, trail in enumerate(trails):
            trail.anchor(anchor_on(runtime.keys, "pkcs11:object=audit"), None)
            for _ in range(n + 2):
                trail.record(KeyUse(0, 1, KEY, "sign", "ES256", b"x", "ok", "id"))
            trail.close()
    finally:
        runtime.close()
    intact = audited_token.cli("audit", "verify", check=True)
    assert [line.split(": ", 1)[1] for line in intact.stdout.splitlines()[:3]] == [
        f"{n} record(s), chain intact, checkpoints verified" for n in (3, 4, 5)]

    damaged = trails[1].path
    lines = damaged.read_text().splitlines()
    damaged.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    refused = audited_token.cli("audit", "verify")
    assert refused.returncode == ExitStatus.DATAERR
    assert f"{damaged}:2: removed: record 2 missing" in refused.stdout
    assert f"audit trail {trails[0].path}: 4 record(s), chain intact, checkpoints verified" in refused.stdout
    assert f"audit trail {damaged}: 1 problem(s) in 4 line(s)" in refused.stderr
