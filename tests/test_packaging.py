"""The packaging's parts that run in `make test` (the package itself: `make deb-check`, docs/packaging.md).

systemd-analyze verify on the units as shipped, with ExecStart pointed at this checkout's entry point (what the
Debian package installs as /usr/bin/tpp-agent); the template units derived from them; the man page and the shell
completion generated from the real parser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.errors import ExitStatus
from tests.conftest import REPO

UNITS = REPO / "packaging" / "systemd"
ENTRY_POINT = Path(sys.executable).parent / "tpp-agent"


def units_in(directory: Path, entry_point: Path = ENTRY_POINT) -> Path:
    """The main units and their templates in ``directory``, running ``entry_point``."""
    for name in ("tpp-agent.service", "tpp-agent.socket"):
        shutil.copy(UNITS / name, directory / name)
    subprocess.run([sys.executable, str(REPO / "scripts" / "instance-units"), str(directory)], check=True,
                   timeout=60)
    for service in directory.glob("*.service"):
        text = service.read_text()
        assert "ExecStart=/usr/bin/tpp-agent " in text
        service.write_text(text.replace("/usr/bin/tpp-agent", str(entry_point)))
    return directory


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=paths[0].parent)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_and_a_second_instance_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = units_in(tmp_path)
    # Instances by name: verify finds their template beside them.
    result = verify(units / "tpp-agent.service", units / "tpp-agent.socket", units / "tpp-agent@second.service",
                    units / "tpp-agent@second.socket")
    assert result.returncode == 0, result.stderr
    assert "tpp-agent" not in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_catches_a_missing_entry_point(tmp_path: Path) -> None:
    """The failure the issue reported (/usr/bin/tpp-agent not executable) is what this check would show."""
    units = units_in(tmp_path, tmp_path / "missing" / "tpp-agent")
    result = verify(units / "tpp-agent@second.service")
    assert result.returncode != 0 and "is not executable" in result.stderr


def test_the_template_is_the_main_unit_per_application(tmp_path: Path) -> None:
    units = units_in(tmp_path)
    main = (units / "tpp-agent.service").read_text().splitlines()
    template = (units / "tpp-agent@.service").read_text().splitlines()[1:]  # after the "generated" line
    assert len(main) == len(template)
    changed = {a: b for a, b in zip(main, template, strict=True) if a != b}
    assert changed.pop(f"ExecStart={ENTRY_POINT} --config /etc/tpp-agent/config.toml serve") == \
        f"ExecStart={ENTRY_POINT} --config /etc/tpp-agent/%i/config.toml serve"
    assert changed.pop("StateDirectory=tpp-agent") == "StateDirectory=tpp-agent/%i"
    assert changed.pop("LoadCredential=tpp-agent-pin:/etc/tpp-agent/user.pin") == \
        "LoadCredential=tpp-agent-pin:/etc/tpp-agent/%i/user.pin"
    assert all("%i" in new for new in changed.values()), changed  # every other difference names the instance
    socket = (units / "tpp-agent@.socket").read_text()
    assert "ListenStream=/run/tpp-agent/%i.sock\n" in socket and "SocketGroup=tpp-agent-clients\n" in socket


def test_a_main_unit_change_the_template_would_miss_fails_the_generator(tmp_path: Path) -> None:
    shutil.copytree(REPO / "packaging", tmp_path / "packaging")
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "instance-units", tmp_path / "scripts")
    service = tmp_path / "packaging" / "systemd" / "tpp-agent.service"
    service.write_text(service.read_text().replace("StateDirectory=tpp-agent\n", "StateDirectory=tpp\n"))
    result = subprocess.run([sys.executable, str(tmp_path / "scripts" / "instance-units"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "'StateDirectory=tpp-agent' exactly once" in result.stderr


def test_the_man_page_has_every_command_and_exit_status() -> None:
    page = subprocess.run([sys.executable, str(REPO / "scripts" / "manpage")], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    # argparse-manpage 1.2 (Debian 12) writes ".TH tpp-agent", 4.x (Debian 13) ".TH TPP\-AGENT".
    assert re.match(r'\.TH tpp\\?-agent "1"', page, re.IGNORECASE), page.splitlines()[0]
    commands = [name for action in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
                for name in action.choices]  # type: ignore[union-attr]
    assert "serve" in commands and "doctor" in commands
    for name in commands:
        assert f"\n.B tpp\\-agent {name.replace('-', chr(92) + '-')}" in page, name
    exit_section = page.split(".SH EXIT STATUS\n")[1].split(".SH ")[0]
    assert [int(line[3:]) for line in exit_section.splitlines() if line.startswith(".B ")] == \
        [int(status) for status in ExitStatus]


@pytest.mark.skipif(shutil.which("register-python-argcomplete") is None, reason="python3-argcomplete not installed")
def test_completion_offers_commands_and_their_options(tmp_path: Path) -> None:
    def complete(line: str) -> list[str]:
        out = tmp_path / "completions"
        env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
        subprocess.run([str(ENTRY_POINT)], env=env, capture_output=True, timeout=60, check=True)
        return [word.strip() for word in out.read_text().split("\n")]

    assert {"keys", "doctor"} <= set(complete("tpp-agent "))
    assert "generate" in complete("tpp-agent keys ")
    assert "--label" in complete("tpp-agent keys generate --la")
