"""Exit statuses: one table (agent/errors.py), every error class in it, docs/cli.md equal to it, real commands."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import agent
import pkcs11_backends
from agent.errors import AGENT_CODES, EXIT_STATUS, AgentError, ExitStatus, exit_status
from pkcs11_backends.errors import Pkcs11Error
from tests.conftest import REPO, Token

TPP_AGENT = str(Path(sys.executable).parent / "tpp-agent")
BASES = {"agent.errors.AgentError", "pkcs11_backends.errors.Pkcs11Error"}


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _all_error_classes() -> list[type[BaseException]]:
    for package in (agent, pkcs11_backends):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [AgentError, Pkcs11Error]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [cls for cls in found if cls.__module__.startswith(("agent.", "pkcs11_backends."))]


def test_every_row_names_a_real_error_class() -> None:
    for name in EXIT_STATUS:
        module, _, qualname = name.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname)
        assert issubclass(cls, AgentError | Pkcs11Error), name


def test_every_error_class_of_the_code_base_has_its_kind() -> None:
    unclassified = []
    for cls in _all_error_classes():
        row = next(_name(c) for c in cls.__mro__ if _name(c) in EXIT_STATUS)
        if row in BASES and _name(cls) not in BASES:
            unclassified.append(_name(cls))
    assert unclassified == [], f"add these to EXIT_STATUS in agent/errors.py and docs/cli.md: {unclassified}"


def test_the_most_specific_class_wins() -> None:
    from agent.openfinance.banks import UnknownBankError
    from agent.transport.errors import ClientCertRejectedError, ReadTimeoutError
    from pkcs11_backends.errors import PinIncorrectError, TokenTimeoutError

    assert exit_status(UnknownBankError("x")) is ExitStatus.CONFIG
    assert exit_status(ReadTimeoutError("x", bank="b", url="u", interaction_id="i")) is ExitStatus.TEMPFAIL
    assert exit_status(ClientCertRejectedError("x", bank="b", url="u", interaction_id="i")) is ExitStatus.PROTOCOL
    assert exit_status(TokenTimeoutError("x")) is ExitStatus.UNAVAILABLE
    assert exit_status(PinIncorrectError("x")) is ExitStatus.CONFIG
    assert exit_status(RuntimeError("x")) is ExitStatus.FAILURE


def test_every_error_the_agent_answers_maps_like_its_error() -> None:
    """The daemon turns errors into stable codes (agent/daemon/routing.py): each has its status here."""
    from agent.client import AgentRequestError

    source = (REPO / "agent" / "daemon" / "routing.py").read_text()
    codes = set(re.findall(r'return HttpError\(\s*[^,]+,\s*"([a-z_]+)"', source))
    assert codes and codes <= set(AGENT_CODES), sorted(codes - set(AGENT_CODES))
    refused = AgentRequestError(403, "forbidden", "uid 1000 may not sign", "", "id")
    assert exit_status(refused) is ExitStatus.NOPERM


def test_docs_cli_md_is_the_table() -> None:
    doc = (REPO / "docs" / "cli.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", doc, re.MULTILINE)
    assert rows == [(str(int(s)), s.name, s.description) for s in ExitStatus]
    assert "RestartPreventExitStatus=78" in (REPO / "packaging" / "systemd" / "tpp-agent.service").read_text()


@pytest.mark.parametrize("argv", [["--no-such-option"], ["keys"], ["no-such-command"], ["csr", "--alg", "md5"]])
def test_usage_errors_exit_64(argv: list[str]) -> None:
    result = subprocess.run([TPP_AGENT, *argv], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 64, result.stderr  # EX_USAGE
    assert "usage: tpp-agent" in result.stderr and "error:" in result.stderr and "Traceback" not in result.stderr


def test_a_configuration_error_exits_78_on_every_command(token: Token, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pkcs11]\nno_such_setting = 1\n")
    for argv in (["keys", "list"], ["doctor"], ["serve", "--socket", str(tmp_path / "s.sock")]):
        result = token.cli("--config", str(bad), *argv)
        if argv == ["doctor"]:  # doctor reports every check, FAIL among them, and exits as the first FAIL
            assert result.returncode == ExitStatus.CONFIG and "FAIL  config" in result.stdout, result.stdout
            continue
        assert result.returncode == ExitStatus.CONFIG, (argv, result.stderr)
        assert "no_such_setting" in result.stderr


def test_serve_tells_an_hsm_that_is_away_from_a_wrong_module(token: Token, tmp_path: Path) -> None:
    """systemd restarts on 69 (the token may come back), not on 78 (RestartPreventExitStatus=78)."""
    socket_path = str(tmp_path / "agent.sock")
    cases = {"no-such-token": ExitStatus.UNAVAILABLE, "/nonexistent/libnope.so": ExitStatus.CONFIG}
    for value, status in cases.items():
        setting = "module" if value.startswith("/") else "token"
        config = token.config_path.read_text()
        if setting == "token":
            config = config.replace(f'token = "{token.label}"', f'token = "{value}"')
        else:
            config = config.replace("[pkcs11]\n", f'[pkcs11]\nmodule = "{value}"\n', 1)
            config = "\n".join(line for line in config.splitlines()
                                if not (line.startswith("module = ") and value not in line))
        other = tmp_path / f"{setting}.toml"
        other.write_text(config)
        result = token.cli("--config", str(other), "serve", "--socket", socket_path)
        assert result.returncode == status and value in result.stderr, (value, result.stderr)
