"""What an operator's shell and journald see: a closed pipe ends a command quietly, -q/-v set what stderr gets,
and log lines carry their syslog priority when stderr is the journal's stream."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import log
from agent.errors import ExitStatus
from tests.conftest import Token

TPP_AGENT = str(Path(sys.executable).parent / "tpp-agent")


@pytest.mark.parametrize("argv", [["doctor"], ["keys", "list"], ["--help"]])
def test_a_closed_pipe_ends_the_command_without_a_traceback(token: Token, argv: list[str]) -> None:
    token.cli("keys", "generate", "--label", "transport", "--type", "ec:p256", check=True)
    read, write = os.pipe()
    os.close(read)  # `| head -1` that has already gone: every write gets EPIPE
    try:
        result = subprocess.run([TPP_AGENT, *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                                env={**os.environ, "TPP_AGENT_CONFIG": str(token.config_path)}, check=False)
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.returncode == ExitStatus.BROKEN_PIPE, result.stderr


def test_head_gets_the_first_line_and_the_command_stops_quietly(token: Token) -> None:
    token.cli("keys", "generate", "--label", "transport", "--type", "ec:p256", check=True)
    pipeline = subprocess.run(f"{TPP_AGENT} doctor | head -n 1", shell=True, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "TPP_AGENT_CONFIG": str(token.config_path)},
                              check=False)
    assert pipeline.stdout.startswith("ok    config") and pipeline.stdout.count("\n") == 1
    assert "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr


def _journal_lines(mode: log.Mode, env_matches: bool) -> list[str]:
    """Log through a socket as systemd connects stderr to journald, JOURNAL_STREAM naming it (or not)."""
    ours, journald = socket.socketpair()
    stream = ours.makefile("w")
    info = os.fstat(ours.fileno())
    previous = os.environ.get("JOURNAL_STREAM")
    os.environ["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}" if env_matches else f"{info.st_dev}:1"
    try:
        log.configure(mode, "debug", stream=stream)
        logger = log.get_logger("test")
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        logger.error("e", pin="1234")
        stream.close()
        ours.close()
        data = b""
        while chunk := journald.recv(65536):
            data += chunk
    finally:
        journald.close()
        if previous is None:
            os.environ.pop("JOURNAL_STREAM", None)
        else:
            os.environ["JOURNAL_STREAM"] = previous
        log.configure("console")
    return data.decode().splitlines()


@pytest.mark.parametrize("mode", ["json", "console"])
def test_lines_to_the_journal_carry_their_syslog_priority(mode: log.Mode) -> None:
    lines = _journal_lines(mode, env_matches=True)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"], lines
    assert "1234" not in "".join(lines)  # redaction still applies
    plain = _journal_lines(mode, env_matches=False)  # stderr is not the journal's stream: no prefix
    assert len(plain) == 4 and not any(line.startswith("<") for line in plain)


def test_quiet_and_verbose_set_what_stderr_gets(token: Token, tmp_path: Path) -> None:
    """-q: warnings and errors only (the bank requests' info lines: tests/openfinance/test_cli_operator.py)."""
    result = token.cli("-q", "keys", "list", "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    both = token.cli("-q", "-v", "keys", "list")
    assert both.returncode == ExitStatus.USAGE and "not allowed with argument" in both.stderr


def test_with_no_configuration_file_the_cli_says_so_and_what_to_do(tmp_path: Path) -> None:
    if Path("/etc/tpp-agent/config.toml").exists():
        pytest.skip("this host has a system configuration")
    env = {name: value for name, value in os.environ.items() if name not in ("TPP_AGENT_CONFIG", "SOFTHSM2_CONF")}
    result = subprocess.run([TPP_AGENT, "keys", "list"], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path, check=False)
    assert result.returncode == ExitStatus.CONFIG, result.stderr
    [hint] = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
    assert "no configuration file was found (--config, $TPP_AGENT_CONFIG, /etc/tpp-agent/config.toml)" in hint
    assert "config.example.toml" in hint and "init_args" not in hint  # not the module's own guess


def test_doctor_exits_with_the_kind_of_its_first_failure(token: Token) -> None:
    config = token.config_path.read_text()
    token.config_path.write_text(config.replace(f'token = "{token.label}"', 'token = "no-such-token"'))
    away = token.cli("doctor", "--json")
    assert away.returncode == ExitStatus.UNAVAILABLE, away.stdout  # the HSM's token is not there: 69
    report = json.loads(away.stdout)
    assert report["exit_status"] == ExitStatus.UNAVAILABLE and not report["ok"]
    assert [c["check"] for c in report["checks"] if c["status"] == "FAIL"] == ["token"]
    token.config_path.write_text(config.replace("[pkcs11]\n", "[pkcs11]\nmax_sessions = 0\n"))
    assert token.cli("doctor").returncode == ExitStatus.CONFIG
    token.config_path.write_text(config)
    assert token.cli("doctor").returncode == ExitStatus.OK
