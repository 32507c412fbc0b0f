"""``--json`` on every command that prints a result, and the global options after the command.

The parser is walked: every command but ``serve`` takes ``--json``, and each is run with it (before the command
or after it, in turn) on the session's SoftHSM2 token against a model bank, and its stdout parsed as one JSON
document. A command added to the CLI without a row in ``RUNS`` fails the first test: give it one.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11 import Attribute, KeyType

from agent.cli import build_parser
from agent.cli.options import NO_RESULT, commands
from agent.errors import ExitStatus
from agent.runtime import Runtime
from modelbank import ModelBank
from tests.lifecycle.participants_data import organisation, server
from tests.openfinance.conftest import BANK, Tpp, signing_identity
from tests.openfinance.test_cli_and_demo import cli


@dataclass
class World:
    config: Path
    files: Path
    transport_pem: Path
    signing_label: str
    runtime: Runtime


# Each command's arguments (besides --json), and the exit statuses that are results, not failures: these
# commands exit non-zero by design for an answer (needs-renewal: 1 "not due"; banks sync: 1 "they differ").
RUNS: dict[tuple[str, ...], tuple[Callable[[World], list[str]], frozenset[int]]] = {
    ("keys", "generate"): (lambda w: ["--label", f"json-{uuid.uuid4().hex[:8]}", "--type", "ec:p256"],
                           frozenset({0})),
    ("keys", "list"): (lambda w: [], frozenset({0})),
    ("keys", "public"): (lambda w: ["transport"], frozenset({0})),
    ("csr",): (lambda w: ["--key", "transport", "--subject", "CN=json,O=Test TPP,C=AE"], frozenset({0})),
    ("cert", "import"): (lambda w: ["--key", "transport", str(w.transport_pem)], frozenset({0})),
    ("cert", "show"): (lambda w: ["--key", "transport"], frozenset({0})),
    ("doctor",): (lambda w: [], frozenset({0})),
    ("config", "check"): (lambda w: [], frozenset({0})),
    ("discover",): (lambda w: [BANK], frozenset({0})),
    ("register",): (lambda w: [BANK], frozenset({0})),
    ("jwks",): (lambda w: [], frozenset({0})),
    ("sign-jws",): (lambda w: ["--key", "signing", "--payload", str(w.files / "payload.json")], frozenset({0})),
    ("client-assertion",): (lambda w: [BANK], frozenset({0})),
    ("token",): (lambda w: [BANK, "--scope", "accounts"], frozenset({0})),
    ("par",): (lambda w: [BANK, "--scope", "openid accounts", "--redirect-uri", "https://tpp.example/cb"],
               frozenset({0})),
    ("audit", "verify"): (lambda w: [], frozenset({0})),
    ("registrations",): (lambda w: [], frozenset({0})),
    ("certs", "needs-renewal"): (lambda w: ["--key", "transport"], frozenset({0, 1})),
    ("banks", "sync"): (lambda w: ["--participants", str(w.files / "participants.json")], frozenset({0, 1})),
    ("status",): (lambda w: [], frozenset({0})),
}


def test_every_command_that_prints_a_result_takes_json_and_has_a_run_here() -> None:
    leaves = dict(commands(build_parser()))
    for words, parser in leaves.items():
        assert ("--json" in parser._option_string_actions) == (words not in NO_RESULT), words
        for option in ("--config", "--direct", "-q", "-v"):
            assert option in parser._option_string_actions, (words, option)
    assert set(RUNS) == set(leaves) - NO_RESULT, "give every command that prints a result a row in RUNS"


@pytest.fixture
def world(tpp: Tpp, bank: ModelBank, tmp_path: Path) -> Iterator[World]:
    """The transport key of ``tpp`` (registered nowhere yet) and a signing key, both with certificates from the
    bank's CA, configured by alias; the bank knows the signing key's JWKS."""
    transport = tpp.runtime.keys.info(tpp.key_uri).certificate
    assert transport is not None
    identity = signing_identity(tpp, bank)
    config = tpp.write_config(bank)
    config.write_text(config.read_text() + identity.keys_toml(tpp) + textwrap.dedent(f"""
        [daemon]
        audit_file = "{tpp.state_dir / 'audit.jsonl'}"
        socket = "{tmp_path / 'no-agent' / 'agent.sock'}"
        """))
    files = tmp_path / "files"
    files.mkdir()
    (files / "payload.json").write_text('{"hello": "bank"}')
    (files / "participants.json").write_text(json.dumps([organisation("org-mb", "Model Bank PJSC", [
        {**server("Model Bank", bank.issuer, "as-mb"), "OpenIDDiscoveryDocument": bank.discovery_url}])]))
    transport_pem = files / "transport.pem"
    transport_pem.write_bytes(x509.load_der_x509_certificate(transport.der).public_bytes(Encoding.PEM))
    yield World(config, files, transport_pem, identity.key.label, tpp.runtime)


def test_each_command_prints_one_json_document_with_json_before_or_after_it(world: World) -> None:
    for number, (words, (arguments, results)) in enumerate(RUNS.items()):
        before = number % 2 == 0
        argv = ["--json", *words, *arguments(world)] if before else [*words, *arguments(world), "--json"]
        done = cli(world.config, *argv)
        assert done.returncode in results, (argv, done.returncode, done.stderr)
        try:
            parsed = json.loads(done.stdout)
        except ValueError as exc:
            raise AssertionError(f"tpp-agent {' '.join(argv)} printed no JSON document: {exc}\n{done.stdout}") from exc
        assert isinstance(parsed, dict | list) and parsed, (argv, done.stdout)
        assert "Traceback" not in done.stderr, (argv, done.stderr)


def test_the_results_say_what_a_user_checks(world: World, bank: ModelBank) -> None:
    status = json.loads(cli(world.config, "status", "--json").stdout)
    assert status["agent"]["running"] is False and status["keys"]["via"] == "token"
    by_alias = {key["alias"]: key for key in status["keys"]["keys"]}
    assert by_alias["transport"]["purpose"] == "tls" and by_alias["signing"]["purpose"] == "jws"
    assert 390 < by_alias["transport"]["certificate"]["days_left"] <= 397  # 13 months from the bank's CA
    assert [b["bank"] for b in status["banks"]["banks"]] == [BANK] and status["pool"]["state"] == "ready"

    public = json.loads(cli(world.config, "keys", "public", "signing", "--json").stdout)
    assert public["pem"].startswith("-----BEGIN PUBLIC KEY-----")
    csr = json.loads(cli(world.config, "csr", "--key", "signing", "--subject", "CN=a,C=AE", "--json").stdout)
    assert csr["subject"] == "CN=a,C=AE" and csr["pem"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    again = json.loads(cli(world.config, "cert", "import", "--key", "transport", str(world.transport_pem),
                           "--json").stdout)
    assert again["already_present"] is True and again["certificate"]["days_left"] > 390
    checked = json.loads(cli(world.config, "config", "check", "--json").stdout)
    assert checked == {"file": str(world.config), "ok": True, "exit_status": 0, "problems": []}


def test_global_options_work_after_the_command(world: World, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(world.config.read_text())
    missing = tmp_path / "missing.toml"
    after = cli(missing, "keys", "list", "--config", str(elsewhere), "-q", "--direct")
    before = cli(missing, "--config", str(elsewhere), "-q", "--direct", "keys", "list")
    assert after.returncode == before.returncode == 0, after.stderr
    assert after.stdout == before.stdout and "transport" in after.stdout
    assert after.stderr == before.stderr == ""  # -q after the command too
    verbose = cli(world.config, "keys", "list", "-v")
    assert verbose.returncode == 0
    # Before the command and after it disagree: the one after it wins, as for any option of the command.
    assert cli(elsewhere, "--config", str(missing), "keys", "list", "--config", str(elsewhere)).returncode == 0
    refused = cli(world.config, "serve", "--json")
    assert refused.returncode == ExitStatus.USAGE and "unrecognized arguments: --json" in refused.stderr
    refused = cli(world.config, "--json", "serve")
    assert refused.returncode == ExitStatus.USAGE and "serve prints no result" in refused.stderr


def test_a_key_is_named_by_its_token_label(world: World) -> None:
    """`keys generate --label X` then `csr --key X`: no alias, no URI needed."""
    label = f"plain-{uuid.uuid4().hex[:8]}"
    assert cli(world.config, "keys", "generate", "--label", label).returncode == 0
    made = cli(world.config, "csr", "--key", label, "--subject", "CN=plain,C=AE")
    assert made.returncode == 0 and made.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----"), made.stderr
    assert cli(world.config, "keys", "public", label).stdout.startswith("-----BEGIN PUBLIC KEY-----")
    # A configured key's label names the configured key (its purpose applies): sign-jws by the signing key's label.
    signed = cli(world.config, "sign-jws", "--key", world.signing_label, "--payload", str(world.files / "payload.json"))
    assert signed.returncode == 0 and signed.stdout.count(".") == 2, signed.stderr
    refused = cli(world.config, "sign-jws", "--key", label, "--payload", str(world.files / "payload.json"))
    assert refused.returncode == ExitStatus.NOINPUT and f"no key {label!r} is configured" in refused.stderr
    # Two keys of one label (`keys generate` refuses to make them: another tool did): which one is not guessed.
    with world.runtime.pool.session() as pooled:
        pooled.session.generate_keypair(KeyType.RSA, 2048, label=label, id=b"other", store=True)
    twice = cli(world.config, "csr", "--key", label, "--subject", "CN=plain,C=AE")
    assert twice.returncode == ExitStatus.DATAERR and f"2 keys on the token are labelled {label!r}" in twice.stderr
    assert "pkcs11: URI with its id" in twice.stderr
    unknown = cli(world.config, "csr", "--key", "no-such-label", "--subject", "CN=x,C=AE")
    assert unknown.returncode == ExitStatus.NOINPUT and "the label of a key on the token" in unknown.stderr
    # pkcs11: URIs keep working.
    uri = json.loads(cli(world.config, "keys", "list", "--json").stdout)[0]["uri"]
    assert cli(world.config, "keys", "public", uri).returncode == 0
    with world.runtime.pool.session() as pooled:  # the session's token is shared: leave no twin labels on it
        for obj in list(pooled.session.get_objects({Attribute.LABEL: label})):
            obj.destroy()
