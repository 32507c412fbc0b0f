"""The operator's view: the console script against the model bank, and ``make demo`` end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ExitStatus
from demo.run import main as demo_main
from modelbank import Behaviour, ModelBank
from tests.conftest import REPO
from tests.openfinance.conftest import BANK, Tpp


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TPP_AGENT_CONFIG": str(config)}
    env.pop("SOFTHSM2_CONF", None)
    return subprocess.run([str(Path(sys.executable).parent / "tpp-agent"), *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_cli_discover_register_and_list(tpp: Tpp, bank: ModelBank) -> None:
    config = tpp.write_config(bank, use_mtls_aliases=True)
    [unknown] = json.loads(cli(config, "registrations", "--json").stdout)
    assert (unknown["state"], unknown["endpoint"]) == ("unknown", None)
    assert unknown["problem"] == f"registration endpoint not known: discover it with `tpp-agent discover {BANK}`"
    missing = cli(config, "registrations", "--bank", "nosuchbank")
    assert missing.returncode == ExitStatus.DATAERR  # a --bank filter naming no configured bank
    assert "error: no bank 'nosuchbank' in the configuration (configured: mb)" in missing.stderr

    shown = cli(config, "discover", BANK)
    assert shown.returncode == 0, shown.stderr
    assert f"issuer {bank.issuer}" in shown.stdout and "/mtls/tpp-registration  (mTLS alias)" in shown.stdout
    as_json = json.loads(cli(config, "discover", BANK, "--json").stdout)
    assert as_json["document"]["issuer"] == bank.issuer and as_json["fetched_now"] is False

    before = cli(config, "registrations")
    assert before.returncode == 0 and f"{BANK:<16} not registered" in before.stdout

    bank.behaviour = Behaviour.failing("500")
    failed = cli(config, "register", BANK)
    assert failed.returncode == ExitStatus.TEMPFAIL  # a 5xx: the bank may or may not have recorded it
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    hint = [line for line in failed.stderr.splitlines() if line.startswith("hint: ")]
    assert len(error) == 1 and "HTTP 500" in error[0] and f"bank {BANK!r}" in error[0]
    assert len(hint) == 1 and "x-fapi-interaction-id" in hint[0]

    bank.behaviour = Behaviour()
    done = cli(config, "register", BANK)
    assert done.returncode == 0, done.stderr
    assert "HTTP 204" in done.stdout
    [registration] = bank.registrations
    assert f"x-fapi-interaction-id: {registration.interaction_id}" in done.stdout
    assert registration.path == "/mtls/tpp-registration" and registration.subject == tpp.subject

    again = cli(config, "register", BANK)
    assert again.returncode == 0 and "already registered" in again.stdout and "--force" in again.stdout
    assert len(bank.registrations) == 1

    listed = json.loads(cli(config, "registrations", "--attempts", "--json").stdout)
    assert [(a["outcome"], a["status"]) for a in listed] == [("failed", 500), ("registered", 204)]
    assert listed[1]["interaction_id"] == registration.interaction_id
    assert listed[1]["cert_sha256"] == registration.sha256
    table = cli(config, "registrations", "--attempts").stdout
    assert "registered" in table and registration.interaction_id in table

    [status] = json.loads(cli(config, "registrations", "--json").stdout)
    assert (status["bank"], status["state"], status["certificate_sha256"]) == (BANK, "registered", registration.sha256)
    assert status["endpoint"] == bank.url + "/mtls/tpp-registration"
    assert status["attempt"]["interaction_id"] == registration.interaction_id
    view = cli(config, "registrations")
    assert view.returncode == 0 and f"{BANK:<16} registered" in view.stdout


def test_cli_unknown_bank(tpp: Tpp, bank: ModelBank) -> None:
    result = cli(tpp.write_config(bank), "register", "nosuchbank")
    assert result.returncode == ExitStatus.CONFIG
    assert "error: no bank 'nosuchbank' in the configuration (configured: mb)" in result.stderr


def test_make_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "demo"
    assert demo_main(["--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    for step in range(1, 15):
        assert f"\n[{step}] " in out
    assert "registered with modelbank: HTTP 204" in out and "x-fapi-interaction-id: " in out
    assert "[model bank] registered: subject=CN=" in out
    assert "Bearer token for modelbank: scope 'accounts', expires in " in out
    bound = re.search(r"\[model bank\] issued token: .* cnf\.x5t#S256=(\S+)", out)
    assert bound and f"transport certificate x5t#S256: {bound.group(1)}" in out
    assert "no PEM or DER private key in any of them" in out
    assert "CKA_EXTRACTABLE = False" in out
    # The consent: the bank redirected back with state and iss, the agent verified the id_token, the refresh token
    # rotated into its file (0600), and no token reached the terminal.
    assert re.search(r"the browser comes back to: https://tpp\.example/consents/callback\?state=\S+&iss=", out)
    assert "id_token: verified" in out and "refresh token (new) kept in" in out
    kept = state / "consent.refresh"
    assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_text().strip() not in out
    # Idempotent: a second run reuses the token and the key.
    assert demo_main(["--state-dir", str(state)]) == 0
    again = capsys.readouterr().out
    assert "key 'transport' already exists (re-run): reused" in again and "key 'signing' already exists" in again
    assert "the token is bound to the transport certificate" in again
    assert "not scanned: the model bank's own test CA and server keys" in again

    # Afterwards the demo's bank can be started again, and every bank command works on the demo's config.
    bank = subprocess.Popen([sys.executable, "-m", "demo", "--serve-bank", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        assert bank.stdout is not None
        banner = []
        for line in bank.stdout:
            banner.append(line)
            if line.startswith("ready"):
                break
        assert any("tpp-agent register modelbank --force" in line for line in banner), banner
        config = state / "config.toml"
        for argv in (["discover", "modelbank", "--refresh"], ["register", "modelbank", "--force"],
                     ["token", "modelbank", "--scope", "accounts"]):
            done = cli(config, *argv)
            assert done.returncode == 0, (argv, done.stderr)
    finally:
        bank.terminate()
        assert bank.wait(timeout=30) == 0


def test_cli_direct_register_audits_the_transport_key(tpp: Tpp, bank: ModelBank) -> None:
    config = tpp.write_config(bank)
    done = cli(config, "--direct", "register", BANK)
    assert done.returncode == 0, done.stderr
    [registration] = bank.registrations

    trail = tpp.state_dir / "audit.jsonl"
    calls = [json.loads(line) for line in trail.read_text().splitlines()]
    uses = [c for c in calls if c["operation"] != "checkpoint"]  # the command's start and stop checkpoints aside
    # One interaction id for the command (docs/api.md): its discovery fetch and its registration carry it alike.
    registered = [c for c in uses if c["interaction_id"] == registration.interaction_id]
    assert registered == uses and len(uses) == 2
    fetched, call = registered
    assert fetched["result"] == f"http 200 from {bank.issuer}"
    assert (call["operation"], call["algorithm"], call["key"]) == ("register", "tls-client-auth", tpp.key_uri)
    assert call["uid"] == os.getuid() and call["result"] == f"http 204 from {bank.issuer}"
    assert {c["operation"] for c in uses} == {"register"} and len(calls) == len(uses) + 2
    verified = cli(config, "audit", "verify")
    assert verified.returncode == 0 and f"{len(calls)} record(s), chain intact" in verified.stdout
