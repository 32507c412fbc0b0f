"""Every bad input: one ``error:`` line (plus a ``hint:``), its kind's exit status, and the token exactly as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pkcs11.constants import TokenFlag

from agent.errors import ExitStatus
from tests.conftest import Token
from tests.x509_helpers import CLIENT_ID, DAY, NOW, ORG_ID, TestCA, foreign_public_key, pem_of, token_objects

KEY = "pkcs11:object=transport"


@pytest.fixture
def cli_token(token: Token) -> Token:
    token.cli("keys", "generate", "--label", "transport", "--type", "ec:p256", check=True)
    return token


def token_state(tok: Token) -> tuple[dict[str, str], str]:
    return token_objects(tok.state_dir), tok.cli("keys", "list", "--json", check=True).stdout


def token_flags(tok: Token) -> TokenFlag:
    """The token's flags as a fresh process sees them (SoftHSM2 keeps them in its token file)."""
    code = ("import sys; from pkcs11_backends.module import Module, TokenSelector; from agent.config import "
            "default_module; print(int(Module.load(default_module()).find_token(TokenSelector(label=sys.argv[1]))"
            ".flags))")
    out = subprocess.run([sys.executable, "-c", code, tok.label], capture_output=True, text=True, check=True,
                         env={**os.environ, "SOFTHSM2_CONF": str(tok.softhsm_conf)}, timeout=60).stdout
    return TokenFlag(int(out))


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str, status: ExitStatus) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    errors = [n for n, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    first = errors[0]
    # Before it only a progress line (`keys generate` on a pipe); after it at most the hint.
    assert all(line.endswith("…") for line in lines[:first]), result.stderr
    rest = lines[first + 1:]
    assert rest == [] or (len(rest) == 1 and rest[0].startswith("hint: ")), result.stderr
    assert needle in lines[first], lines[first]
    assert "Traceback" not in result.stderr


def cert_file(tok: Token, tmp_path: Path, make: Callable[[bytes], bytes]) -> str:
    pem = tok.cli("keys", "public", KEY, check=True).stdout.encode()
    spki = serialization.load_pem_public_key(pem).public_bytes(serialization.Encoding.DER,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "cert.pem"
    path.write_bytes(make(spki))
    return str(path)


def other_config(tok: Token, tmp_path: Path, **pkcs11: str) -> dict[str, str]:
    lines = [f'{name} = "{value}"' for name, value in {"token": tok.label, "pin_file": str(tok.user_pin_file),
                                                        **pkcs11}.items()]
    path = tmp_path / "other.toml"
    path.write_text(f'[state]\ndir = "{tok.state_dir}"\n[pkcs11]\n' + "\n".join(lines) +
                    f'\n[pkcs11.environment]\nSOFTHSM2_CONF = "{tok.softhsm_conf}"\n')
    return {"TPP_AGENT_CONFIG": str(path)}


CA = TestCA()
CASES: dict[str, Callable[[Token, Path], tuple[tuple[str, ...], dict[str, str], str]]] = {
    "missing module": lambda t, p: (("keys", "list"), other_config(t, p, module="/nonexistent/libnope.so"),
                                    "PKCS#11 module not found: /nonexistent/libnope.so"),
    "unknown token": lambda t, p: (("keys", "list"), other_config(t, p, token="no-such-token"),
                                   "no token 'no-such-token'"),
    "duplicate label": lambda t, p: (("keys", "generate", "--label", "transport", "--type", "rsa:2048"), {},
                                     "already has an object with label 'transport'"),
    "malformed subject": lambda t, p: (("csr", "--key", KEY, "--subject", "CN=a,,C=AE"), {}, "empty RDN"),
    "non-UUID client id": lambda t, p: (("csr", "--key", KEY, "--org-name", "Acme", "--org-id", ORG_ID,
                                         "--client-id", "client-1"), {}, "client id 'client-1' is not a UUID"),
    "csr for an unknown key": lambda t, p: (("csr", "--key", "pkcs11:object=nope", "--subject", f"CN={CLIENT_ID}"),
                                            {}, "matches pkcs11:object=nope"),
    "cert for another key": lambda t, p: (
        ("cert", "import", "--key", KEY, cert_file(t, p, lambda _: pem_of(CA.issue(foreign_public_key())))), {},
        "is for another key, not 'transport'"),
    "expired cert": lambda t, p: (
        ("cert", "import", "--key", KEY, cert_file(t, p, lambda k: pem_of(CA.issue(k, NOW - 90 * DAY, NOW - DAY)))),
        {}, "expired on"),
    "garbage file": lambda t, p: (("cert", "import", "--key", KEY, cert_file(t, p, lambda _: os.urandom(300))), {},
                                  "is neither a PEM nor a DER X.509 certificate"),
    "missing file": lambda t, p: (("cert", "import", "--key", KEY, str(p / "absent.pem")), {},
                                  "certificate file not found"),
}


# sysexits: the configuration, the HSM, a malformed value, a key that is not there (docs/cli.md).
STATUS = {"missing module": ExitStatus.CONFIG, "unknown token": ExitStatus.UNAVAILABLE,
          "csr for an unknown key": ExitStatus.NOINPUT}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(cli_token: Token, tmp_path: Path, case: str) -> None:
    args, env, needle = CASES[case](cli_token, tmp_path)
    before = token_state(cli_token)
    result = cli_token.cli(*args, env=env)
    assert_one_line_error(result, needle, STATUS.get(case, ExitStatus.DATAERR))
    assert "generating" not in result.stderr  # refused before any progress line
    assert token_state(cli_token) == before


def test_wrong_pin_is_tried_once_and_the_token_stays_usable(cli_token: Token, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    before = token_state(cli_token)
    assert not token_flags(cli_token) & TokenFlag.USER_PIN_COUNT_LOW

    result = cli_token.cli("csr", "--key", KEY, "--subject", f"CN={CLIENT_ID}",
                           env=other_config(cli_token, tmp_path, pin_file=str(wrong)))
    assert_one_line_error(result, "wrong user PIN", ExitStatus.CONFIG)
    assert "tried once, not retried" in result.stderr
    flags = token_flags(cli_token)
    assert flags & TokenFlag.USER_PIN_COUNT_LOW  # the one wrong try reached the token
    assert not flags & (TokenFlag.USER_PIN_FINAL_TRY | TokenFlag.USER_PIN_LOCKED)

    assert token_state(cli_token) == before  # the right PIN still works, nothing changed
    assert not token_flags(cli_token) & TokenFlag.USER_PIN_COUNT_LOW
