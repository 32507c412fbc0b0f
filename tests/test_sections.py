"""The configuration loaded whole: every section parsed at load, every problem named with its file and key, key
purposes checked against the banks and rules that use them, and `tpp-agent config check` printing them all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import sections
from agent.config import KeyPurpose
from agent.errors import ExitStatus
from agent.sections import ConfigProblems
from tests.daemon.conftest import TPP_AGENT

BANK = textwrap.dedent("""\
    [banks.mb]
    discovery_url = "https://bank.example/.well-known/openid-configuration"
    issuer = "https://bank.example"
    ca_bundle = "ca.pem"
    client_key = "transport"
    """)
KEYS = textwrap.dedent("""\
    [keys.transport]
    uri = "pkcs11:object=transport"
    [keys.signing]
    uri = "pkcs11:object=signing"
    raw_sign = true
    """)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigProblems) as raised:
        sections.load(str(write(tmp_path, text)))
    return [str(p) for p in raised.value.problems]


def test_a_whole_file_loads_into_typed_sections_with_resolved_purposes(tmp_path: Path) -> None:
    loaded = sections.load(str(write(tmp_path, KEYS + BANK + '[tokens]\nclient_id = "c1"\n')))
    assert loaded.config.keys["transport"].purpose is KeyPurpose.TLS  # a bank's client_key: tls unless stated
    assert loaded.config.keys["signing"].purpose is KeyPurpose.JWS
    assert loaded.banks["mb"].issuer == "https://bank.example" and loaded.tokens.client_id == "c1"
    assert loaded.daemon.audit_file.name == "audit.jsonl" and loaded.certificates.expiry_warning_days == 30


@pytest.mark.parametrize("text,expected", [
    ("[bankz.mb]\nissuer = 'x'\n", "unknown section [bankz] in {file}"),
    (BANK + "use_mtls_alias = true\n", "unknown setting(s) use_mtls_alias in [banks.mb] of {file}"),
    ("[state]\ndir = '~nouser-of-this-host/x'\n", "state.dir = '~nouser-of-this-host/x' in {file}: no such user"),
    (BANK.replace("https://bank.example/.well-known", "https://[x/.well-known"),
     "[banks.mb] discovery_url must be an https:// URL in {file}"),
    ("[pkcs11]\ncall_timeout = nan\n", "pkcs11.call_timeout = nan in {file} is not a finite number"),
    (BANK + "read_timeout = inf\n", "banks.mb.read_timeout = inf in {file} is not a finite number"),
    (BANK + "discovery_ttl = -inf\n", "banks.mb.discovery_ttl = -inf in {file} is not a finite number"),
    ("[daemon]\nrequest_timeout = nan\n", "daemon.request_timeout = nan in {file} is not a finite number"),
    (BANK + 'api_origins = ["https://api.bank.example/v1"]\n', "api_origins must hold origins"),
])
def test_each_mistake_is_named_with_its_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected.format(file=tmp_path / "config.toml") in p for p in found), found


@pytest.mark.parametrize("extra,expected", [
    # The attack of issue 17: a service granted sign on the transport key made TLS handshakes without the agent.
    ('[policy.rules.r]\nusers = [0]\noperations = ["sign"]\nkeys = ["transport"]\n',
     "[policy.rules.r] grants 'sign' on key 'transport', but its purpose is 'tls'"),
    ('[policy.rules.r]\nusers = [0]\noperations = ["jws"]\nkeys = ["transport"]\n',
     "grants 'jws' on key 'transport', but its purpose is 'tls'"),
    ('[keys.bare]\nuri = "pkcs11:object=bare"\n[policy.rules.r]\nusers = [0]\noperations = ["sign"]\n'
     'keys = ["bare"]\n', "grants 'sign' on key 'bare', but it does not declare raw_sign = true"),
    ('[keys.transport]\nuri = "pkcs11:object=transport"\npurpose = "jws"\n',
     "[keys.transport] purpose = 'jws', but it is the client_key of [banks.mb]"),
    ('[keys.transport]\nuri = "pkcs11:object=transport"\nraw_sign = true\n',
     "[keys.transport] raw_sign = true, but its purpose is 'tls'"),
    ('[keys.transport]\nuri = "pkcs11:object=transport"\n[tokens]\nsigning_key = "transport"\n',
     "[tokens] signing_key 'transport' is a tls key"),
    ('[keys.transport]\nuri = "pkcs11:object=transport"\n[keys.alias]\nuri = "pkcs11:object=transport"\n',
     "[keys.alias] and [keys.transport] name the same key"),
    ('[keys.x]\nuri = "pkcs11:object=x"\npurpose = "signing"\n', "purpose must be one of tls, jws, encryption, audit"),
    ('[keys.cp]\nuri = "pkcs11:object=cp"\npurpose = "audit"\n[policy.rules.r]\nusers = [0]\noperations = ["jws"]\n'
     'keys = ["cp"]\n', "grants 'jws' on key 'cp', but its purpose is 'audit'"),
    ('[policy.rules.r]\nusers = [0]\noperations = ["jws"]\nkeys = ["singing"]\n',
     "[policy.rules.r] names key 'singing', which is not configured"),
    ('[policy.rules.r]\nusers = [0]\noperations = ["token"]\nbanks = ["bm"]\n',
     "[policy.rules.r] names bank 'bm', which is not configured"),
])
def test_purposes_and_rules_are_checked_at_load(tmp_path: Path, extra: str, expected: str) -> None:
    base = BANK if "[keys.transport]" in extra else BANK + '[keys.transport]\nuri = "pkcs11:object=transport"\n'
    found = problems(tmp_path, base + extra)
    assert any(expected in p for p in found), found


def test_a_rule_may_restrict_the_scopes(tmp_path: Path) -> None:
    loaded = sections.load(str(write(tmp_path, KEYS + BANK + '[policy.rules.r]\nusers = [4242]\n'
                                     'operations = ["token"]\nbanks = ["mb"]\nscopes = ["accounts"]\n')))
    from agent.daemon.policy import Peer

    peer = Peer(4242, 4242, 1, frozenset({4242}))
    assert loaded.policy.scopes(peer, "token", "mb") == frozenset({"accounts"})
    assert loaded.policy.scopes(Peer(0, 0, 1, frozenset()), "token", "mb") == frozenset()


def test_config_check_prints_every_problem_at_once_and_fails(tmp_path: Path) -> None:
    path = write(tmp_path, "[bankz]\n" + BANK + "typo = 1\n[pkcs11]\nmax_sessions = 0\n[daemon]\nworkerz = 2\n")
    checked = subprocess.run([TPP_AGENT, "config", "check", "--config", str(path)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == ExitStatus.CONFIG, checked.stderr
    lines = checked.stdout.splitlines()
    assert f"{path}: unknown section [bankz] in {path}" in lines
    assert any("max_sessions" in line for line in lines) and any("workerz" in line for line in lines)
    assert any("unknown setting(s) typo in [banks.mb]" in line for line in lines)
    assert lines[-1] == f"4 problem(s) in {path}" and "Traceback" not in checked.stderr

    write(tmp_path, KEYS + BANK)
    good = subprocess.run([TPP_AGENT, "config", "check", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert good.returncode == 0 and good.stdout == f"{path}: every section and setting is valid\n"


def test_the_cli_finds_socket_and_audit_file_without_the_daemon_server(tmp_path: Path) -> None:
    path = write(tmp_path, KEYS + BANK)
    probe = ("import sys\nfrom agent.cli.context import CliContext\n"
             f"ctx = CliContext({str(path)!r})\nprint(ctx.sections.daemon.socket, ctx.sections.daemon.audit_file)\n"
             "print('agent.daemon.server' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines()[-1] == "False", out.stdout
